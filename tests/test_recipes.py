"""Training recipes: optimisers, schedules, decay groups, label smoothing, augmentation."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_experiment import Tiny, _blobs
from torch import nn

from bnmove import BnmoveError
from bnmove.study import Training
from bnmove.study.experiment import experiment
from bnmove.study.recipes import RECIPES, WARMUP, Recipe, augment_batch, split_decay


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_trains_an_epoch(name: str) -> None:
    recipe = Recipe(name)
    result = experiment(Tiny(), _blobs(), seeds=1, training=Training(epochs=1, batch_size=16, recipe=recipe))
    assert len(result.records) == 2 and all(math.isfinite(r.train_loss) for r in result.records)
    payload = result.to_dict()["recipe"]
    assert payload["name"] == name and payload["lr"] == {"adam": 1e-3, "sgd": 0.1, "adamw": 1e-3}[name]
    optimizer = recipe.optimizer(Tiny())
    kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
    assert type(optimizer) is kind
    if name == "sgd":
        assert optimizer.defaults["momentum"] == 0.9 and optimizer.defaults["nesterov"]


def test_warm_up_then_cosine_to_zero() -> None:
    recipe = Recipe("sgd", lr=0.2)
    optimizer = recipe.optimizer(Tiny())
    total = 200
    scheduler = recipe.scheduler(optimizer, total)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = round(WARMUP * total)
    assert lrs[0] == pytest.approx(0.2 / warmup)
    assert lrs[warmup - 1] == pytest.approx(0.2) and max(lrs) == pytest.approx(0.2)
    assert all(a <= b for a, b in pairwise(lrs[:warmup]))  # rising
    assert all(a >= b for a, b in pairwise(lrs[warmup - 1 :]))  # then falling
    middle = warmup + (total - warmup) // 2
    assert lrs[middle] == pytest.approx(0.1, rel=0.02) and lrs[-1] < 1e-3
    assert Recipe("adam").scheduler(optimizer, total) is None


def test_weight_decay_spares_norm_parameters_and_biases() -> None:
    model = Tiny()
    decay, rest = split_decay(model)
    assert {id(p) for p in decay} == {id(model.fc1.weight), id(model.fc2.weight)}
    assert {id(p) for p in rest} == {
        id(model.fc1.bias),
        id(model.fc2.bias),
        id(model.bn.weight),
        id(model.bn.bias),
    }
    groups = Recipe("adamw").optimizer(model).param_groups
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert Recipe("sgd", weight_decay=1e-3).optimizer(model).param_groups[0]["weight_decay"] == 1e-3


def test_label_smoothing_is_the_smoothed_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    scores, target = torch.randn(6, 3, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    logp = scores.log_softmax(1)
    want = (0.9 * -logp[torch.arange(6), target] + 0.1 * -logp.mean(1)).mean()
    assert Recipe("adam", label_smoothing=0.1).loss(scores, target) == pytest.approx(float(want))
    plain = experiment(Tiny(), _blobs(), seeds=[4], training=Training(epochs=1, batch_size=16))
    smooth = experiment(
        Tiny(),
        _blobs(),
        seeds=[4],
        training=Training(epochs=1, batch_size=16, recipe=Recipe(label_smoothing=0.2)),
    )
    assert smooth.records[0].train_loss > plain.records[0].train_loss  # smoothing keeps the loss up


def test_augmentation_crops_and_flips_each_sample_alike_for_every_variant() -> None:
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)
    # Replay the draws: each sample is a window of the zero-padded input, flipped or not.
    g = torch.Generator().manual_seed(0)
    dy, dx = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = F.pad(x, (1, 1, 1, 1))
    for i in range(2):
        window = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        torch.testing.assert_close(out[i], window.flip(-1) if flip[i] else window)
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(0)), out)
    flat = torch.randn(4, 6)
    assert augment_batch(flat, torch.Generator()) is flat  # not an image batch: unchanged

    class Conv(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.bn(self.conv(x))).mean((2, 3)))

    data = _blobs()
    images = type(data)(
        type(data.train)(data.train.x[:, :4].repeat(1, 16).reshape(-1, 1, 8, 8), data.train.y),
        type(data.val)(data.val.x[:, :4].repeat(1, 16).reshape(-1, 1, 8, 8), data.val.y),
        "images",
    )
    result = experiment(
        Conv(), images, seeds=[1], training=Training(epochs=1, batch_size=16, recipe=Recipe(augment=True))
    )
    assert result.start_digests["before/seed1"] == result.start_digests["after/seed1"]
    assert result.batch_digests["before/seed1"] == result.batch_digests["after/seed1"]
    plain = experiment(Conv(), images, seeds=[1], training=Training(epochs=1, batch_size=16))
    assert result.records[0].train_loss != plain.records[0].train_loss


def test_bad_recipe_settings() -> None:
    with pytest.raises(BnmoveError, match="unknown recipe 'rmsprop'"):
        Recipe("rmsprop")
    with pytest.raises(BnmoveError, match="label smoothing"):
        Recipe(label_smoothing=1.0)
    with pytest.raises(BnmoveError, match="learning rate"):
        Recipe(lr=-1)


def test_cli_recipe_options(tmp_path: Path, digits_study: list[str]) -> None:
    import json

    from click.testing import CliRunner

    from bnmove.cli import main

    args = [*digits_study, "--seeds", "1"]
    res = CliRunner().invoke(
        main,
        [
            *args,
            "--recipe",
            "sgd",
            "--label-smoothing",
            "0.1",
            "--weight-decay",
            "1e-4",
            "-o",
            str(tmp_path / "r"),
        ],
    )
    assert res.exit_code == 0, res.output
    header = " ".join(res.stdout.split())  # the table title wraps
    assert "(sgd lr 0.1, weight decay 0.0001, warm-up + cosine, label smoothing 0.1; float32)" in header
    recipe = json.loads((tmp_path / "r" / "results.json").read_text())["recipe"]
    assert recipe == {
        "name": "sgd",
        "lr": 0.1,
        "weight_decay": 1e-4,
        "label_smoothing": 0.1,
        "augment": False,
    }
    bad = CliRunner().invoke(main, [*args, "--recipe", "rmsprop", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "rmsprop" in bad.output
