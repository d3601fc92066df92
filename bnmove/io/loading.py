"""Load a model file for the CLI: a state dict plus ``--arch``, or a pickled module by opt-in.

Unpickling a whole module runs code from the file, so it happens only with
``allow_pickle=True`` (``--allow-pickle``). State dicts load with
``weights_only=True`` or from ``.safetensors``, which run nothing. They may sit
inside a checkpoint (under ``state_dict``, ``model``, ... or the key given as
``state_dict_key``, e.g. ``state_dict_ema``), with the prefixes DDP
(``module.``), ``torch.compile`` (``_orig_mod.``) or Lightning (``model.``)
leave, stripped when that makes the keys match (``LoadedModel.notes`` says so).
A Hugging Face ``save_pretrained`` folder loads as the class its config
names (transformers as an optional extra, no remote code).
``--arch timm:NAME`` and ``--arch torchvision:NAME`` build a library's model
with random weights (``pretrained=False`` / ``weights=None``) for the file's
weights. Every failure is a `LoadError` with one line
that says what to give instead.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..errors import LoadError
from .pickles import PICKLE_FLAG, _explain, _unpickle
from .pretrained import STRUCTURE, load_pretrained

log = logging.getLogger(__name__)

_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


@dataclass
class LoadedModel:
    """A model loaded from ``path``; ``source`` says how."""

    module: nn.Module
    path: Path
    source: Literal["pickled-module", "state-dict", "hf-folder"]
    arch: str | None = None
    #: what loading had to do that the user should know (a prefix stripped, a checkpoint key used)
    notes: list[str] = field(default_factory=list)


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
        if (path / "config.json").is_file():
            return "hf-folder"
        raise LoadError(f"{path}: is a directory; give a model file (.pt/.pth) or a save_pretrained folder")
    if path.stat().st_size == 0:
        raise LoadError(f"{path}: is empty")
    with path.open("rb") as fh:
        head = fh.read(16)
    if path.suffix.lower() == ".safetensors" or _is_safetensors(path, head):
        return "safetensors"
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


def _is_safetensors(path: Path, head: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON header."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < path.stat().st_size


def _is_onnx(path: Path) -> bool:
    import onnx

    try:
        return len(onnx.load(str(path), load_external_data=False).graph.node) > 0
    except Exception:
        return False


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _find_state_dict(
    obj: Any, path: Path, key: str | None, notes: list[str]
) -> Mapping[str, torch.Tensor] | None:
    """The state dict in ``obj``: itself, the one under ``key``, or under a usual checkpoint key."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = ", ".join(sorted(str(k) for k in obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise LoadError(f"{path}: has no entry {key!r} for --state-dict-key (it has: {keys})")
        if not _is_tensor_dict(obj[key]):
            raise LoadError(f"{path}: entry {key!r} is not a state dict of tensors")
        return obj[key]  # type: ignore[no-any-return]
    if _is_tensor_dict(obj):
        return obj  # type: ignore[no-any-return]
    if isinstance(obj, Mapping):
        for candidate in _STATE_DICT_KEYS:
            if _is_tensor_dict(obj.get(candidate)):
                others = [k for k in obj if k != candidate and _is_tensor_dict(obj[k])]
                notes.append(
                    f"used the checkpoint's {candidate!r} entry"
                    + (
                        f" (also there: {', '.join(map(str, others))}; pick one with --state-dict-key)"
                        if others
                        else ""
                    )
                )
                return obj[candidate]  # type: ignore[no-any-return]
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
    library = _LIBRARY_FACTORIES.get(module_name)
    if library is not None and not hasattr(target, attr):
        return _call_arch(spec, lambda **kw: library(target, attr, kw), kwargs)
    for part in attr.split("."):
        if not hasattr(target, part):
            raise LoadError(f"--arch {spec}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise LoadError(f"--arch {spec}: {attr} is not callable")
    return _call_arch(spec, target, kwargs)


def _call_arch(spec: str, factory: Any, kwargs: Mapping[str, Any] | None) -> nn.Module:
    try:
        model = factory(**dict(kwargs or {}))
    except Exception as exc:
        raise LoadError(f"--arch {spec}: calling it raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"--arch {spec}: returned {type(model).__name__}, not an nn.Module")
    return model


#: ``--arch LIBRARY:NAME``: the library's own factory, random weights (the file brings the real ones)
_LIBRARY_FACTORIES: dict[str, Any] = {
    "timm": lambda lib, name, kw: lib.create_model(name, pretrained=False, **kw),
    "torchvision": lambda lib, name, kw: importlib.import_module("torchvision.models").get_model(
        name, weights=None, **kw
    ),
}


#: prefixes wrappers leave on every key: DDP/DataParallel, torch.compile, Lightning
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _strip_prefixes(
    model: nn.Module, state: Mapping[str, torch.Tensor], notes: list[str]
) -> Mapping[str, torch.Tensor]:
    """``state`` with wrapper prefixes removed, when (and only when) that makes its keys the model's."""
    expected = set(model.state_dict())
    if set(state) == expected:
        return state
    current, stripped = dict(state), []
    for _ in range(len(_PREFIXES)):  # nested wrappers: module._orig_mod.…
        for prefix in _PREFIXES:
            if current and all(k.startswith(prefix) for k in current):
                current = {k[len(prefix) :]: v for k, v in current.items()}
                stripped.append(prefix)
                break
        else:
            break
    if stripped and set(current) == expected:
        notes.append(f"stripped the key prefix {''.join(stripped)!r} (left by a training wrapper)")
        return current
    return state


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
    state_dict_key: str | None = None,
) -> LoadedModel:
    """Load a model file.

    Args:
        path: a state dict (``.pt``/``.pth``, a checkpoint holding one, or
            ``.safetensors``) or a whole pickled module.
        arch: ``package.module:callable`` building the architecture for a state dict.
        arch_kwargs: keyword arguments for ``arch``.
        allow_pickle: allow unpickling a whole module (this runs code from the file).
        imports: modules to import first, so pickled classes resolve.
        state_dict_key: the checkpoint entry holding the weights (e.g. ``state_dict_ema``).

    Raises:
        LoadError: with one line saying what is wrong and what to give instead.
    """
    path = Path(path)
    import_modules(imports)
    kind = _sniff(path)
    if kind == "hf-folder":
        return LoadedModel(_load_hf_folder(path), path, "hf-folder")
    if kind == "safetensors":
        return _from_state(path, _read_safetensors(path), arch, arch_kwargs, [])
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
        resolved: list[str] = []
        return LoadedModel(_unpickle(path, imports, resolved), path, "pickled-module", notes=resolved)
    except Exception as exc:
        raise _explain(path, "unknown") from exc
    if isinstance(obj, nn.Module):  # weights_only never yields one, but be explicit
        return LoadedModel(obj, path, "pickled-module")
    notes: list[str] = []
    state = _find_state_dict(obj, path, state_dict_key, notes)
    if state is None:
        raise LoadError(f"{path}: holds {type(obj).__name__}, neither a module nor a state dict of tensors")
    return _from_state(path, state, arch, arch_kwargs, notes)


def _load_hf_folder(path: Path) -> nn.Module:
    """A Hugging Face ``save_pretrained`` folder, as the class its config names (no remote code);
    a folder `bnmove.save_pretrained` wrote, in its converted placement (without its code either)."""
    try:
        import transformers
    except ImportError:
        raise LoadError(
            f"{path}: is a Hugging Face model folder; reading it needs transformers "
            "(pip install 'bnmove[hf]')"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        if hasattr(config, STRUCTURE):  # written by bnmove.save_pretrained: its converted placement
            return load_pretrained(path, config)
        names = list(getattr(config, "architectures", None) or [])
        cls = getattr(transformers, names[0], None) if names else None
        model = (cls or transformers.AutoModel).from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise LoadError(
            f"{path}: transformers cannot load this folder ({type(exc).__name__}: {first})"
        ) from exc
    if not isinstance(model, nn.Module):
        raise LoadError(f"{path}: transformers returned {type(model).__name__}, not an nn.Module")
    return model.eval()


def _read_safetensors(path: Path) -> Mapping[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:
        raise LoadError(f"{path}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from exc


def _from_state(
    path: Path,
    state: Mapping[str, torch.Tensor],
    arch: str | None,
    arch_kwargs: Mapping[str, Any] | None,
    notes: list[str],
) -> LoadedModel:
    if arch is None:
        raise LoadError(
            f"{path}: is a state dict (weights only); say which architecture it belongs to with "
            "--arch package.module:callable (or timm:NAME, torchvision:NAME)"
        )
    model = build_arch(arch, arch_kwargs)
    state = _strip_prefixes(model, state, notes)
    classes = _other_class_count(model, state)
    if (
        classes is not None
        and arch.split(":")[0] in _LIBRARY_FACTORIES
        and "num_classes" not in (arch_kwargs or {})
    ):
        model = build_arch(arch, {**(arch_kwargs or {}), "num_classes": classes})
        notes.append(f"built {arch} with num_classes={classes}, the size of the file's classifier")
    _load_state(model, state, arch)
    return LoadedModel(model, path, "state-dict", arch, notes)


def _other_class_count(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The file's class count when the only shape mismatches are in the model's last layer
    (a library model fine-tuned to other classes), else None."""
    expected = model.state_dict()
    mismatched = {k for k, v in state.items() if k in expected and expected[k].shape != v.shape}
    last = [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    if not mismatched or not last:
        return None
    head = last[-1]
    if not all(k.rpartition(".")[0] == head for k in mismatched) or f"{head}.weight" not in state:
        return None
    return int(state[f"{head}.weight"].shape[0])
