"""Activation replacement for the placement study: what changes, what is left, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn
from zoo import randomize_bn

import bnmove
from bnmove.cli import main
from bnmove.study.activations import replace_activations


class Mixed(nn.Module):
    def __init__(self, act: type[nn.Module] = nn.ReLU, second: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), act()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), second()
        self.prelu = nn.PReLU()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act1(x + self.act2(self.bn2(self.conv2(x))))  # act1 called twice
        x = F.relu(x) + self.prelu(x)  # a function in forward code, and an activation with a parameter
        return self.fc(x.mean((2, 3)))


def test_every_activation_module_is_replaced_and_the_rest_is_listed() -> None:
    torch.manual_seed(0)
    model = randomize_bn(Mixed()).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 8, 8)
    swapped = replace_activations(model, "tanh", (x,))
    assert swapped.replaced == ["act1", "act2"]
    assert any(entry.startswith("prelu (PReLU") for entry in swapped.left)
    assert any("a function in forward code" in entry for entry in swapped.left) and len(swapped.left) == 2
    # The replaced model computes exactly what the same network written with Tanh computes.
    twin = Mixed(nn.Tanh, nn.Tanh).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(swapped.model.eval()(x), twin(x))
        assert not torch.allclose(swapped.model(x), model(x))
    kinds = {p.bn: p.activation_kind for p in bnmove.find_pairs(swapped.model)}
    assert kinds == {"bn1": "Tanh", "bn2": "Tanh"}
    # Replacing by what is already there changes nothing; the user's model is untouched.
    same = replace_activations(Mixed(nn.ReLU, nn.ReLU).eval(), "relu", (x,))
    with torch.no_grad():
        reference = Mixed(nn.ReLU, nn.ReLU).eval()
        reference.load_state_dict(same.model.state_dict())
        torch.testing.assert_close(same.model(x), reference(x))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert isinstance(model.act1, nn.ReLU) and isinstance(model.act2, nn.GELU)


def test_bad_kinds_and_models_without_activation_modules() -> None:
    with pytest.raises(bnmove.BnmoveError, match="unknown activation 'swish2'"):
        replace_activations(Mixed(), "swish2")

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.bn(self.fc(x)))

    with pytest.raises(bnmove.BnmoveError, match="no activation module to replace with gelu"):
        replace_activations(Functional(), "gelu", (torch.randn(3, 4),))


def test_cli_activations_factor(tmp_path: Path, digits_study: list[str]) -> None:
    out = tmp_path / "study"
    args = [*digits_study, "--seeds", "2"]
    res = CliRunner().invoke(main, [*args, "--activations", "relu,tanh", "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    payload = json.loads(res.stdout)["activations"]
    assert set(payload) == {"relu", "tanh"} and all(len(p["differences"]) == 1 for p in payload.values())
    assert (out / "tanh" / "results.json").exists() and (out / "relu" / "summary.md").exists()
    assert "tanh: replaced 4 activation modules" in res.stderr  # stem.2, down.2, act, relu
    # A re-run of a finished kind trains nothing and reports the same numbers from its records.
    before = json.loads((out / "relu" / "results.json").read_text())
    again = CliRunner().invoke(main, [*args, "--activations", "relu", "-o", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert "all 4 runs are done" in again.stderr
    rerun = json.loads(again.stdout)["activations"]["relu"]
    assert rerun["records"] == before["records"] and rerun["differences"] == before["differences"]
