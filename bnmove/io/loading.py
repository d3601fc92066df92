"""Load a model file for the CLI: a state dict plus ``--arch``, or a pickled module by opt-in.

Unpickling a whole module runs code from the file, so it happens only with
``allow_pickle=True`` (``--allow-pickle``). State dicts load with
``weights_only=True``, which runs nothing. Every failure is a
:class:`~bnmove.errors.LoadError` with one line that says what to give instead.
"""

from __future__ import annotations

import ast
import importlib
import logging
import pickle
import sys
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import LoadError

log = logging.getLogger(__name__)

PICKLE_FLAG = "--allow-pickle"
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


@dataclass
class LoadedModel:
    """A model loaded from ``path``; ``source`` says how."""

    module: nn.Module
    path: Path
    source: Literal["pickled-module", "state-dict"]
    arch: str | None = None


def import_modules(names: Sequence[str]) -> None:
    """Import the user's modules (``--import``) so pickled classes and ``--arch`` resolve."""
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise LoadError(f"--import {name}: {type(exc).__name__}: {exc}") from exc


def _sniff(path: Path) -> str:
    """What the file looks like, before anything is unpickled."""
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if path.is_dir():
        raise LoadError(f"{path}: is a directory; give a model file (.pt/.pth)")
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: is empty")
    with path.open("rb") as fh:
        head = fh.read(16)
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile:
            return "unknown"
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch"
        return "zip"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and _is_onnx(path)):
        return "onnx"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    if head[:1] == b"\x80":
        return "torch"  # legacy (non-zip) torch.save or a plain pickle
    return "unknown"


def _is_onnx(path: Path) -> bool:
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:
        return False


def _explain(path: Path, kind: str) -> LoadError:
    if kind == "torchscript":
        return LoadError(
            f"{path}: is a TorchScript archive, which torch.fx cannot trace; give the state dict "
            "(torch.save(model.state_dict(), ...)) with --arch, or the pickled module with " + PICKLE_FLAG
        )
    if kind == "onnx":
        return LoadError(
            f"{path}: is an ONNX model; bnmove converts PyTorch models (.pt/.pth), export from those"
        )
    if kind == "json":
        return LoadError(f"{path}: is a JSON file, not a PyTorch model (.pt/.pth)")
    if kind == "zip":
        return LoadError(f"{path}: is a zip archive but not a PyTorch file")
    return LoadError(f"{path}: is not a PyTorch model file (or it is truncated or corrupted)")


def _find_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, Mapping):
        for key in _STATE_DICT_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                return inner
    return None


def parse_arch_args(items: Sequence[str]) -> dict[str, Any]:
    """``["num_classes=10", "act=gelu"]`` -> ``{"num_classes": 10, "act": "gelu"}``."""
    kwargs: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise LoadError(f"bad --arch-arg {item!r}: expected NAME=VALUE, e.g. num_classes=10")
        try:
            kwargs[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value
    return kwargs


def build_arch(spec: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Call ``package.module:callable`` (a class or factory) and check it returns a module."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise LoadError(f"bad --arch {spec!r}: expected package.module:callable, e.g. mymodels:resnet18")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(f"--arch {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(target, part):
            raise LoadError(f"--arch {spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise LoadError(f"--arch {spec}: {attr} is not callable")
    try:
        model = target(**dict(kwargs or {}))
    except Exception as exc:
        raise LoadError(f"--arch {spec}: calling it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"--arch {spec}: returned {type(model).__name__}, not an nn.Module")
    return model


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], spec: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        raise LoadError(f"state dict does not match --arch {spec}: {', '.join(parts)}")
    for key, value in state.items():
        if expected[key].shape != value.shape:
            raise LoadError(
                f"state dict does not match --arch {spec}: size mismatch for {key} "
                f"(file {tuple(value.shape)}, model {tuple(expected[key].shape)})"
            )
    model.load_state_dict(dict(state), strict=True)


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: Mapping[str, Any] | None = None,
    allow_pickle: bool = False,
    imports: Sequence[str] = (),
) -> LoadedModel:
    """Load a model file.

    Args:
        path: a state dict (``.pt``/``.pth``) or a whole pickled module.
        arch: ``package.module:callable`` building the architecture for a state dict.
        arch_kwargs: keyword arguments for ``arch``.
        allow_pickle: allow unpickling a whole module (this runs code from the file).
        imports: modules to import first, so pickled classes resolve.

    Raises:
        LoadError: with one line saying what is wrong and what to give instead.
    """
    path = Path(path)
    import_modules(imports)
    kind = _sniff(path)
    if kind != "torch":
        raise _explain(path, kind)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise _explain(path, "unknown") from exc
        if arch is not None:
            raise LoadError(
                f"{path}: holds pickled Python objects, not a state dict, so --arch does not apply"
            ) from exc
        if not allow_pickle:
            raise LoadError(
                f"{path}: holds a pickled Python object (e.g. a whole nn.Module); loading it runs code "
                f"from the file. If you trust it, pass {PICKLE_FLAG}; or give a state dict with --arch"
            ) from exc
        return LoadedModel(_unpickle(path), path, "pickled-module")
    except Exception as exc:
        raise _explain(path, "unknown") from exc
    if isinstance(obj, nn.Module):  # weights_only never yields one, but be explicit
        return LoadedModel(obj, path, "pickled-module")
    state = _find_state_dict(obj)
    if state is None:
        raise LoadError(f"{path}: holds {type(obj).__name__}, neither a module nor a state dict of tensors")
    if arch is None:
        raise LoadError(
            f"{path}: is a state dict (weights only); say which architecture it belongs to with "
            "--arch package.module:callable"
        )
    model = build_arch(arch, arch_kwargs)
    _load_state(model, state, arch)
    return LoadedModel(model, path, "state-dict", arch)


def _unpickle(path: Path) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        raise LoadError(
            f"{path}: the pickle refers to code that is not importable here ({exc}); "
            "use --import MODULE for the module that defines the model"
        ) from exc
    except Exception as exc:
        raise LoadError(f"{path}: cannot be unpickled ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, torch.jit.ScriptModule):
        raise _explain(path, "torchscript")
    if not isinstance(obj, nn.Module):
        raise LoadError(f"{path}: holds {type(obj).__name__}, not an nn.Module")
    return obj
