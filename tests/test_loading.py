from __future__ import annotations

from pathlib import Path

import pytest
import torch
from zoo import TinyResNet, build

from bnmove import LoadError, load_model
from bnmove.io.loading import parse_arch_args


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    model, _ = build("resnet")
    paths = {
        "state": tmp_path / "resnet_sd.pt",
        "wrapped": tmp_path / "ckpt.pth",
        "pickled": tmp_path / "resnet.pt",
        "script": tmp_path / "scripted.pt",
    }
    torch.save(model.state_dict(), paths["state"])
    torch.save({"epoch": 3, "state_dict": model.state_dict()}, paths["wrapped"])
    torch.save(model, paths["pickled"])
    torch.jit.script(model).save(str(paths["script"]))
    return paths


def test_state_dict_with_arch(files: dict[str, Path]) -> None:
    loaded = load_model(files["state"], arch="zoo:TinyResNet")
    assert loaded.source == "state-dict" and isinstance(loaded.module, TinyResNet)
    reference = torch.load(files["state"], weights_only=True)
    assert all(torch.equal(reference[k], v) for k, v in loaded.module.state_dict().items())
    wrapped = load_model(files["wrapped"], arch="zoo:TinyResNet", arch_kwargs={"classes": 5})
    assert torch.equal(wrapped.module.fc.weight, reference["fc.weight"])


def test_pickled_module_needs_opt_in(files: dict[str, Path]) -> None:
    with pytest.raises(LoadError, match="--allow-pickle"):
        load_model(files["pickled"])
    loaded = load_model(files["pickled"], allow_pickle=True)
    assert loaded.source == "pickled-module" and isinstance(loaded.module, TinyResNet)


@pytest.mark.parametrize(
    ("key", "kwargs", "message"),
    [
        ("state", {}, "is a state dict .* --arch package.module:callable"),
        ("script", {}, "TorchScript archive"),
        ("script", {"allow_pickle": True}, "TorchScript archive"),
        ("pickled", {"arch": "zoo:TinyResNet"}, "--arch does not apply"),
        ("state", {"arch": "no_such_module:Net"}, "cannot import no_such_module"),
        ("state", {"arch": "zoo:NOPE"}, "has no attribute 'NOPE'"),
        ("state", {"arch": "zoo"}, "expected package.module:callable"),
        ("state", {"arch": "zoo:ZOO"}, "is not callable"),
        ("state", {"arch": "zoo:build", "arch_kwargs": {"name": "mlp"}}, "not an nn.Module"),
        ("state", {"arch": "zoo:MLP"}, "does not match --arch zoo:MLP: .*missing keys"),
        ("state", {"arch": "zoo:TinyResNet", "arch_kwargs": {"classes": 7}}, "size mismatch for fc.weight"),
        ("state", {"arch": "zoo:TinyResNet", "arch_kwargs": {"bogus": 1}}, "calling it raised TypeError"),
    ],
)
def test_load_errors(files: dict[str, Path], key: str, kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(LoadError, match=message):
        load_model(files[key], **kwargs)


def test_bad_files(tmp_path: Path, files: dict[str, Path]) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(bytes(range(256)) * 8)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(files["state"].read_bytes()[:500])
    as_json = tmp_path / "model.json"
    as_json.write_text('{"layers": 3}')
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07fake")
    cases = {
        tmp_path / "missing.pt": "no such file",
        tmp_path: "is a directory",
        empty: "is empty",
        noise: "not a PyTorch model file",
        truncated: "not a PyTorch model file",
        as_json: "JSON file",
        onnx_file: "ONNX model",
    }
    for path, message in cases.items():
        with pytest.raises(LoadError, match=message):
            load_model(path, allow_pickle=True)


def test_unimportable_pickle_names_import_flag(tmp_path: Path) -> None:
    import sys
    import types

    module = types.ModuleType("ephemeral_models")
    exec("import torch\nclass Net(torch.nn.Linear):\n    pass\n", module.__dict__)
    sys.modules["ephemeral_models"] = module
    path = tmp_path / "eph.pt"
    torch.save(module.Net(2, 2), path)
    del sys.modules["ephemeral_models"]
    with pytest.raises(LoadError, match="--import MODULE"):
        load_model(path, allow_pickle=True)
    with pytest.raises(LoadError, match="--import ephemeral_models"):
        load_model(path, allow_pickle=True, imports=["ephemeral_models"])


def test_parse_arch_args() -> None:
    assert parse_arch_args(["n=10", "act=gelu", "widths=[1, 2]", "flag=True"]) == {
        "n": 10,
        "act": "gelu",
        "widths": [1, 2],
        "flag": True,
    }
    with pytest.raises(LoadError, match="NAME=VALUE"):
        parse_arch_args(["oops"])
