"""Pickled whole modules, read only with the user's --allow-pickle (their classes' scripts imported first), and what to say about files bnmove cannot read as a model."""

from __future__ import annotations

import pickle
import sys
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoadError

#: the option that allows reading a pickle, named in every message that asks for it
PICKLE_FLAG = "--allow-pickle"


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


def _script_classes(imports: Sequence[str], notes: list[str]) -> types.ModuleType:
    """A pickle module for ``torch.load`` whose unpickler finds what a script's ``__main__`` defined
    (``torch.save(model)`` in ``train.py`` refers to ``__main__.Net``) in the modules given with
    ``--import``, noting each class it resolved that way."""

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module == "__main__" and not hasattr(sys.modules.get("__main__"), name):
                for source in imports:
                    found = getattr(sys.modules.get(source), name, None)
                    if found is not None:
                        note = (
                            f"__main__.{name} in the pickle resolved to {source}.{name} (--import {source})"
                        )
                        if note not in notes:
                            notes.append(note)
                        return found
            return super().find_class(module, name)

    shim = types.ModuleType("bnmove_pickle")
    shim.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
    shim.Unpickler = Unpickler  # type: ignore[attr-defined]
    return shim


def _unpickle(path: Path, imports: Sequence[str] = (), notes: list[str] | None = None) -> nn.Module:
    notes = notes if notes is not None else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(
                path, map_location="cpu", weights_only=False, pickle_module=_script_classes(imports, notes)
            )
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
