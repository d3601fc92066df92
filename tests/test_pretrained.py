"""A converted Hugging Face model's save_pretrained folder: from_pretrained loads it in the converted
placement, with torch and transformers alone (issue 31).

The folder's config lists the modules the conversion changed, and its ``modeling_bnmove.py`` builds
them again; what builds them (`bnmove.io.hf_structure`) is checked here on converted sample models,
without transformers. The round trip through transformers itself runs where it is installed.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_outputs
from torch import nn
from zoo import build as build_zoo

import bnmove
from bnmove.cli import main
from bnmove.core.affine import ChannelAffine
from bnmove.core.forwards import generated_forward
from bnmove.errors import BnmoveError
from bnmove.io import hf_structure
from bnmove.io.pretrained import STRUCTURE, _changed, _spec


def _kind(module: nn.Module) -> object:
    """A module's class; the kept affine's as one, whether bnmove's GraphModule or the folder's layer."""
    return (
        "ChannelAffine" if isinstance(module, (ChannelAffine, hf_structure.ChannelAffine)) else type(module)
    )


def _rebuilt(module: nn.Module) -> nn.Module:
    """``module`` built again from its JSON description, then given its weights by name."""
    spec = json.loads(json.dumps(_spec(module, "m")))  # through JSON, as the config holds it
    new = hf_structure.build(spec)
    new.load_state_dict(module.state_dict())  # strict: the same tensors, by name and shape
    return new


@pytest.mark.parametrize("name", ["resnet", "mlp", "conv1d", "conv3d", "preact", "nested", "across-function"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_every_module_a_conversion_leaves_builds_again_from_its_description(
    name: str, placement: str
) -> None:
    """Each module of a converted zoo model that carries no regenerated forward (BNs, kept affines,
    convolutions that gained a bias, the Sequentials that hold a moved activation) is built again
    from its description with the same class, state dict keys, mode and outputs."""
    model, inputs = build_zoo(name)
    result = bnmove.convert(model, placement, method="exact", example_inputs=inputs)
    converted = result.model.eval()
    checked = 0
    for path, module in converted.named_modules():
        if not path or any(generated_forward(m) is not None for m in module.modules()):
            continue
        if any(
            not type(m).__module__.startswith("torch.")
            for m in module.modules()
            if not isinstance(m, ChannelAffine)
        ):
            continue  # the zoo's own classes: a Hugging Face folder builds torch's and transformers' only
        new = _rebuilt(module)
        assert [(n, _kind(m)) for n, m in new.named_modules()] == [
            (n, _kind(m)) for n, m in module.named_modules()
        ]
        assert list(new.state_dict()) == list(module.state_dict()) and new.training == module.training
        checked += 1
    assert checked >= 3
    # the whole model: its changed modules (against one built afresh) put back by rebuild()
    changed: list[list[object]] = []
    again = build_zoo(name)[0]
    if generated_forward(converted) is not None:
        return  # the model's own forward: structure() says so before it looks at any module
    if any(generated_forward(m) is not None for m in converted.modules()):
        with pytest.raises(BnmoveError, match="regenerated its forward"):
            _changed(converted, again, "", changed)
        return
    if name == "nested" and placement == "after":  # a block of the zoo's own class changed
        with pytest.raises(BnmoveError, match="zoo:ConvActBn is neither torch's nor transformers'"):
            _changed(converted, again, "", changed)
        return
    _changed(converted, again, "", changed)
    assert bool(changed) == bool(result.moved)  # a move changes modules
    hf_structure.rebuild(again, json.loads(json.dumps(changed)))
    again.load_state_dict(converted.state_dict())
    assert_same_outputs(converted, again.eval(), inputs, rtol=1e-6)


def test_a_description_names_only_torch_and_transformers_classes() -> None:
    with pytest.raises(ValueError, match="not a class of torch or transformers"):
        hf_structure.build(
            {"class": "os:system", "settings": [], "parameters": [], "buffers": [], "children": []}
        )
    model, inputs = _resnet_and_input()
    converted = bnmove.convert(model, "after", method="exact", example_inputs=inputs).model
    regenerated = next(p for p, m in converted.named_modules() if generated_forward(m) is not None)
    with pytest.raises(BnmoveError, match="regenerated its forward, which a config cannot describe"):
        _spec(converted.get_submodule(regenerated), regenerated)


def _resnet_and_input() -> tuple[nn.Module, tuple[torch.Tensor]]:
    return bnmove.sample_models.resnet().eval(), (torch.randn(2, 3, 16, 16),)


def test_save_pretrained_refuses_a_model_of_another_library(tmp_path: Path) -> None:
    with pytest.raises(BnmoveError, match="not a Hugging Face transformers model"):
        bnmove.io.save_pretrained(nn.Sequential(nn.Linear(2, 2)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- through transformers

_LOAD = r"""
import json, sys
sys.modules["bnmove"] = None  # `import bnmove` raises ImportError from here on
import torch, transformers
report = {}
for folder in sys.argv[1:]:
    model = transformers.AutoModelForImageClassification.from_pretrained(
        folder, trust_remote_code=True, local_files_only=True
    ).eval()
    with torch.no_grad():
        torch.save(model(torch.load(folder + ".x.pt")).logits, folder + ".y.pt")
    report[folder] = {
        "bases": [c.__name__ for c in type(model).__mro__[:2]],
        "modules": [[n, type(m).__name__] for n, m in model.named_modules()],
        "keys": list(model.state_dict()),
    }
print(json.dumps(report))
"""


def _hf_resnet() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=3
    )
    torch.manual_seed(0)
    model = transformers.ResNetForImageClassification(config).eval()
    for m in model.modules():  # trained-like statistics, so that every move shows in the outputs
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


def test_a_converted_hugging_face_model_round_trips_save_pretrained_and_from_pretrained(
    tmp_path: Path,
) -> None:
    """save_pretrained → from_pretrained(trust_remote_code=True), where bnmove cannot be imported: the
    converted placement (module by module, key by key) and its outputs; bnmove.load_model reads the
    folder the same way without running its code."""
    model = _hf_resnet()
    x = torch.randn(2, 3, 32, 32)
    expected, folders = {}, []
    for placement, method in (("after", "exact"), ("after", "fit"), ("before", "exact")):
        converted = bnmove.convert(model, placement, method=method, example_inputs=(x,)).model
        folder = tmp_path / f"{placement}-{method}"
        bnmove.io.save_pretrained(converted, folder)
        torch.save(x, f"{folder}.x.pt")
        folders.append(str(folder))
        expected[str(folder)] = converted
        loaded = bnmove.load_model(folder).module
        assert [(n, _kind(m)) for n, m in loaded.named_modules()] == [
            (n, _kind(m)) for n, m in converted.named_modules()
        ]
        assert_same_outputs(converted, loaded, (x,), rtol=1e-6)
    done = subprocess.run(
        [sys.executable, "-c", _LOAD, *folders],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "HF_HOME": str(tmp_path / "hf-home")},  # remote code is copied there
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    for folder, converted in expected.items():
        got = report[folder]
        assert got["bases"] == ["BnmoveResNetForImageClassification", "ResNetForImageClassification"]
        assert got["keys"] == list(converted.state_dict())
        assert (
            got["modules"][1:]
            == [
                [n, "ChannelAffine" if isinstance(m, ChannelAffine) else type(m).__name__]
                for n, m in converted.named_modules()
            ][1:]
        )
        with torch.no_grad():
            want = converted.eval()(torch.load(f"{folder}.x.pt")).logits
        torch.testing.assert_close(torch.load(f"{folder}.y.pt"), want, rtol=1e-6, atol=1e-6)
    moved = json.loads((tmp_path / "after-exact" / "config.json").read_text())[STRUCTURE]
    assert any(path.endswith("normalization") for path, _ in moved)


def test_convert_format_hf_writes_a_folder_from_pretrained_loads_converted(tmp_path: Path) -> None:
    model = _hf_resnet()
    model.save_pretrained(str(tmp_path / "hf-resnet"))
    runner = CliRunner()
    done = runner.invoke(
        main, ["convert", str(tmp_path / "hf-resnet"), "--placement", "after", "--format", "hf", "--quiet"]
    )
    assert done.exit_code == 0, done.output
    assert "save_pretrained writes" not in done.output  # the folder is what that warning asks for
    out = tmp_path / "hf-resnet.after"
    assert (out / "modeling_bnmove.py").is_file() and STRUCTURE in json.loads(
        (out / "config.json").read_text()
    )
    x = torch.randn(1, 3, 32, 32)
    converted = bnmove.convert(model, "after", example_inputs=(x,)).model
    assert_same_outputs(converted, bnmove.load_model(out).module, (x,), rtol=1e-5)


def test_convert_format_hf_refuses_a_model_of_another_library_in_one_line(tmp_path: Path) -> None:
    torch.save(bnmove.sample_models.mlp(), tmp_path / "mlp.pt")
    done = CliRunner().invoke(
        main,
        ["convert", str(tmp_path / "mlp.pt"), "--allow-pickle", "--placement", "after", "--format", "hf"],
    )
    assert done.exit_code == 1 and not (tmp_path / "mlp.after").exists()
    assert "--format hf writes a save_pretrained folder, and MLP is not" in done.output


def test_a_function_of_torch_is_described_by_name_and_any_other_refused() -> None:
    """An activation module of transformers holds its function (``self.act = gelu``): torch's
    functions go into the description by name and come back as themselves; another is refused."""
    layer = nn.Module()
    layer.act = torch.nn.functional.gelu  # type: ignore[assignment]
    spec = json.loads(json.dumps(_spec(layer, "layer")))
    assert hf_structure.build(spec).act is torch.nn.functional.gelu
    layer.act = len  # type: ignore[assignment]
    with pytest.raises(BnmoveError, match="layer: its setting act is not a plain value"):
        _spec(layer, "layer")
    with pytest.raises(ValueError, match="not of torch or transformers"):
        hf_structure.decode({"function": ["os", "getcwd"]})


def test_rebuild_puts_each_described_module_in_its_place_and_a_none_stays_none() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    described = [["1", _spec(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)), "1")], ["2", None]]
    hf_structure.rebuild(model, json.loads(json.dumps(described)))
    assert [type(m) for m in model[1]] == [nn.ReLU, nn.BatchNorm1d] and model[2] is None
    assert list(model.state_dict()) == ["0.weight", "0.bias"] + [
        f"1.1.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    ]


def test_a_kept_affine_is_the_folder_s_layer_in_its_code_and_bnmove_s_when_bnmove_loads_it() -> None:
    """The folder's own code builds its torch-only ``ChannelAffine``; bnmove's loader builds bnmove's
    (a GraphModule torch alone unpickles, known as a kept affine to a later conversion)."""
    described = [["1", {"channel_affine": 3, "training": False}]]
    for affine, kind in ((None, hf_structure.ChannelAffine), (ChannelAffine, torch.fx.GraphModule)):
        model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
        if affine is None:
            hf_structure.rebuild(model, described)
        else:
            hf_structure.rebuild(model, described, affine=affine)
        assert isinstance(model[1], kind) and isinstance(model[1], ChannelAffine) == (affine is not None)
        assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert not model[1].training
    assert b"bnmove" not in pickle.dumps(model)


def test_save_pretrained_refuses_a_class_transformers_does_not_export(tmp_path: Path) -> None:
    """A model class of remote code (or a subclass of the user's) is not importable from
    transformers, which the folder's modeling code would do: one line, nothing written."""
    transformers = pytest.importorskip("transformers")

    class MyResNet(transformers.ResNetForImageClassification):
        pass

    model = MyResNet(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    with pytest.raises(BnmoveError, match="MyResNet is not a class transformers itself exports"):
        bnmove.io.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
