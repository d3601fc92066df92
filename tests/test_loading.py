from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn
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


def _same_weights(loaded: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())


def test_safetensors_state_dict(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model, _ = build("resnet")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    path = tmp_path / "resnet.safetensors"
    save_file(state, str(path))
    loaded = load_model(path, arch="zoo:TinyResNet")
    assert loaded.source == "state-dict" and _same_weights(loaded.module, state)
    with pytest.raises(LoadError, match="is a state dict"):
        load_model(path)
    (tmp_path / "bad.safetensors").write_bytes(path.read_bytes()[:200])
    with pytest.raises(LoadError, match=r"bad\.safetensors: cannot read it as safetensors"):
        load_model(tmp_path / "bad.safetensors", arch="zoo:TinyResNet")


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "model.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped_and_said(tmp_path: Path, prefix: str) -> None:
    model, _ = build("resnet")
    state = model.state_dict()
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in state.items()}, path)
    loaded = load_model(path, arch="zoo:TinyResNet")
    assert _same_weights(loaded.module, state)
    assert loaded.notes == [f"stripped the key prefix {prefix!r} (left by a training wrapper)"]


def test_checkpoint_entries_and_state_dict_key(tmp_path: Path) -> None:
    model, _ = build("resnet")
    state = model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 9, "state_dict": state, "state_dict_ema": ema, "optimizer": {"lr": 0.1}}, path)
    plain = load_model(path, arch="zoo:TinyResNet")
    assert _same_weights(plain.module, state)
    assert "used the checkpoint's 'state_dict' entry (also there: state_dict_ema" in plain.notes[0]
    picked = load_model(path, arch="zoo:TinyResNet", state_dict_key="state_dict_ema")
    assert _same_weights(picked.module, ema) and picked.notes == []
    with pytest.raises(
        LoadError, match=r"has no entry 'ema' for --state-dict-key \(it has: epoch, optimizer"
    ):
        load_model(path, arch="zoo:TinyResNet", state_dict_key="ema")
    with pytest.raises(LoadError, match="entry 'optimizer' is not a state dict"):
        load_model(path, arch="zoo:TinyResNet", state_dict_key="optimizer")


def test_library_arch_shorthands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--arch timm:NAME`` / ``torchvision:NAME`` call the library's own factory with random weights."""
    calls: list[tuple[str, dict[str, object]]] = []

    def create_model(name: str, **kwargs: object) -> nn.Module:
        calls.append((name, kwargs))
        return TinyResNet(classes=int(kwargs.get("num_classes", 5)))  # type: ignore[call-overload]

    fake_timm = types.ModuleType("timm")
    fake_timm.create_model = create_model  # type: ignore[attr-defined]
    fake_models = types.ModuleType("torchvision.models")
    fake_models.get_model = lambda name, **kw: create_model(name, **kw)  # type: ignore[attr-defined]
    fake_tv = types.ModuleType("torchvision")
    fake_tv.models = fake_models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", fake_timm)
    monkeypatch.setitem(sys.modules, "torchvision", fake_tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", fake_models)
    model, _ = build("resnet")
    path = tmp_path / "r.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(path, arch="timm:resnet_tiny", arch_kwargs={"num_classes": 5})
    assert _same_weights(loaded.module, model.state_dict())
    load_model(path, arch="torchvision:resnet_tiny")
    assert calls == [
        ("resnet_tiny", {"pretrained": False, "num_classes": 5}),
        ("resnet_tiny", {"weights": None}),
    ]
    # Fine-tuned to other classes: the library default (here 5) is rebuilt at the file's 3.
    calls.clear()
    three = TinyResNet(classes=3)
    torch.save(three.state_dict(), tmp_path / "r3.pt")
    default = create_model
    fake_timm.create_model = lambda name, **kw: default(name, **{"num_classes": 5, **kw})  # type: ignore[attr-defined]
    loaded = load_model(tmp_path / "r3.pt", arch="timm:resnet_tiny")
    assert _same_weights(loaded.module, three.state_dict())
    assert [kw.get("num_classes") for _, kw in calls] == [5, 3]
    assert any("num_classes=3" in n for n in loaded.notes)
    # A mismatch elsewhere than the classifier stays an error.
    broken = {k: (v[:1] if k == "conv1.weight" else v) for k, v in three.state_dict().items()}
    torch.save(broken, tmp_path / "broken.pt")
    with pytest.raises(LoadError, match=r"size mismatch for conv1\.weight"):
        load_model(tmp_path / "broken.pt", arch="timm:resnet_tiny")


def test_cli_prints_loading_notes(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bnmove.cli import main

    model, _ = build("resnet")
    path = tmp_path / "ddp.pt"
    torch.save({"module." + k: v for k, v in model.state_dict().items()}, path)
    result = CliRunner().invoke(main, ["inspect", str(path), "--arch", "zoo:TinyResNet"])
    assert result.exit_code == 0, result.output
    assert "note: " in result.stderr and "stripped the key prefix 'module.'" in result.stderr


def test_hf_folder_needs_transformers_or_loads(tmp_path: Path) -> None:
    folder = tmp_path / "hf-resnet"
    folder.mkdir()
    try:
        import transformers
    except ImportError:
        (folder / "config.json").write_text("{}")
        with pytest.raises(LoadError, match=r"Hugging Face model folder; reading it needs transformers"):
            load_model(folder)
        return
    model = transformers.ResNetModel(transformers.ResNetConfig(depths=[1, 1, 1, 1])).eval()
    model.save_pretrained(folder)
    loaded = load_model(folder)
    assert loaded.source == "hf-folder" and type(loaded.module) is transformers.ResNetModel
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x).last_hidden_state, model(x).last_hidden_state)


def test_directory_without_a_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="is a directory; give a model file"):
        load_model(tmp_path)
