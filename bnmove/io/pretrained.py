"""A converted Hugging Face model as a folder that ``from_pretrained`` loads in the converted placement.

``model.save_pretrained`` writes weights and a config, and ``from_pretrained`` builds the model
from the config: the original placement, into which the moved BNs' weights do not fit. The folder
`save_pretrained` writes also holds, in its config, the modules the conversion changed
(``bnmove_structure``: each one's class, plain settings and tensor shapes, found by comparing the
model with one its config builds), and ``modeling_bnmove.py`` (`bnmove.io.hf_structure` as it is,
and a subclass of the model's class that builds them again), named in the config's ``auto_map``.
``AutoModelFor…from_pretrained(folder, trust_remote_code=True)`` then loads the converted
placement with torch and transformers alone; `bnmove.load_model` reads the folder the same way
without running the folder's code.
"""

from __future__ import annotations

import copy
import inspect
import json
import types
from pathlib import Path
from typing import Any, cast

import torch
from torch import fx, nn

from ..core.affine import ChannelAffine
from ..core.atomic import atomic_dir
from ..core.forwards import generated_forward
from ..errors import BnmoveError
from . import hf_structure

#: the file of the folder that builds the converted placement (named in the config's auto_map)
MODELING = "modeling_bnmove.py"
#: the config entry that lists the changed modules
STRUCTURE = "bnmove_structure"
#: attributes that say nothing of a module's structure: nn.Module's own, TorchScript's keys, and
#: what transformers marks on a module once it initialised its weights
_MODULE_STATE = frozenset(nn.Module().__dict__) | {"__jit_ignored_attributes__", "_is_hf_initialized"}


def is_pretrained_model(model: nn.Module) -> bool:
    """A Hugging Face ``PreTrainedModel``: its own save and load go through its config, which
    builds the original structure (recognised without importing transformers)."""
    return any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
        for cls in type(model).__mro__
    )


class _Unsupported(Exception):
    pass


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encode(v) for v in value]}
    module = getattr(value, "__module__", None) or ""
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)) and module.startswith(
        hf_structure.TRUSTED
    ):
        return {"function": [module, value.__qualname__]}  # an activation's function (torch's gelu)
    raise _Unsupported(type(value).__name__)


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _own(module: nn.Module) -> dict[str, Any]:
    """What ``module`` itself is (children aside): class, settings, tensors' shapes; a setting JSON
    cannot hold stands as its type (it may differ only where the module must be described)."""
    settings = []
    for name, value in sorted(vars(module).items()):
        if name in _MODULE_STATE:
            continue
        try:
            settings.append([name, _encode(value)])
        except _Unsupported:
            settings.append([name, ("unsupported", type(value).__qualname__)])
    return {
        "class": f"{type(module).__module__}:{type(module).__qualname__}",
        "settings": settings,
        # lists, not objects: the order of a module's tensors is the order of its state dict
        "parameters": [
            [n, None if p is None else [list(p.shape), _dtype(p), p.requires_grad]]
            for n, p in module._parameters.items()
        ],
        "buffers": [
            [n, None, None, True]
            if b is None
            else [n, list(b.shape), _dtype(b), n not in module._non_persistent_buffers_set]
            for n, b in module._buffers.items()
        ],
        "children": list(module._modules),
    }


def _spec(module: nn.Module, path: str) -> dict[str, Any]:
    """The description `hf_structure.build` builds ``module`` from, or BnmoveError with the reason."""
    if isinstance(module, ChannelAffine):
        return {"channel_affine": int(module.weight.shape[0]), "training": module.training}
    if generated_forward(module) is not None or isinstance(module, fx.GraphModule):
        raise BnmoveError(f"{path}: bnmove regenerated its forward, which a config cannot describe")
    own = _own(module)
    if not own["class"].startswith(hf_structure.TRUSTED):
        raise BnmoveError(f"{path}: its class {own['class']} is neither torch's nor transformers'")
    unsupported = [name for name, value in own["settings"] if isinstance(value, tuple)]
    if unsupported:
        raise BnmoveError(f"{path}: its setting {unsupported[0]} is not a plain value")
    own["children"] = [
        [name, None if child is None else _spec(child, f"{path}.{name}")]
        for name, child in module._modules.items()
    ]
    own["training"] = module.training
    return own


def _changed(converted: nn.Module, built: nn.Module, path: str, out: list[list[Any]]) -> None:
    for name, child in converted._modules.items():
        where = f"{path}.{name}" if path else name
        original = built._modules.get(name)
        if child is None or original is None or _own(child) != _own(original):
            out.append([where, None if child is None else _spec(child, where)])
        elif generated_forward(child) is not None:
            raise BnmoveError(f"{where}: bnmove regenerated its forward, which a config cannot describe")
        else:
            _changed(child, original, where, out)


def structure(model: nn.Module) -> list[list[Any]]:
    """``[path, spec]`` for every module of ``model`` that differs from the one its config builds."""
    pretrained: Any = type(model)  # a transformers PreTrainedModel (is_pretrained_model)
    with torch.device("meta"):
        built = pretrained._from_config(copy.deepcopy(model.config))
    if _own(model)["parameters"] != _own(built)["parameters"] or generated_forward(model) is not None:
        raise BnmoveError(f"{type(model).__name__} itself changed, which a config cannot describe")
    changed: list[list[Any]] = []
    _changed(model, built, "", changed)
    return changed


def _auto_classes(model: nn.Module) -> list[str]:
    """The transformers Auto classes that build ``model``'s class from its config."""
    import transformers

    names = []
    for name in dir(transformers):
        mapping = (
            getattr(getattr(transformers, name, None), "_model_mapping", None)
            if name.startswith("AutoModel")
            else None
        )
        try:
            if mapping is not None and mapping[type(model.config)] is type(model):
                names.append(name)
        except (KeyError, ValueError, AttributeError):
            continue
    return names


def _modeling(model: nn.Module) -> tuple[str, str]:
    cls = type(model).__name__
    new = f"Bnmove{cls}"
    source = inspect.getsource(hf_structure)
    source += f'''

from transformers import {cls} as _Original  # noqa: E402


class {new}(_Original):
    """{cls} in the placement of BatchNorm bnmove converted it to: built from the config, then the
    modules the conversion changed (``config.{STRUCTURE}``) built again, for the weights to load into."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        rebuild(self, config.{STRUCTURE})
'''
    return new, source


def save_pretrained(model: nn.Module, folder: str | Path) -> Path:
    """Write a converted Hugging Face model as a ``save_pretrained`` folder that
    ``AutoModelFor….from_pretrained(folder, trust_remote_code=True)`` loads in the converted
    placement (torch and transformers alone), and `bnmove.load_model` too.

    The folder is written whole or not at all: it is checked by loading it back (every weight,
    by name and value) before it replaces ``folder``. Raises `BnmoveError` with the module and
    the reason where a config cannot describe the change (a forward bnmove regenerated: save the
    model whole, or as a torch.export program).
    """
    folder = Path(folder)
    if not is_pretrained_model(model):
        raise BnmoveError(f"{type(model).__name__} is not a Hugging Face transformers model")
    import transformers

    if getattr(transformers, type(model).__name__, None) is not type(model):
        raise BnmoveError(
            f"{type(model).__name__} is not a class transformers itself exports (remote code?), which "
            "the folder's modeling code would import: save the model whole, or --format pt2"
        )
    changed = structure(model)
    autos = _auto_classes(model)
    if not autos:  # nothing would load the folder's class: from_pretrained would build the original
        raise BnmoveError(
            f"no transformers Auto class builds {type(model).__name__} from its config, so no "
            "from_pretrained would load the folder converted: save the model whole, or --format pt2"
        )
    new, source = _modeling(model)
    with atomic_dir(folder) as tmp:
        cast(Any, model).save_pretrained(str(tmp))
        config_file = tmp / "config.json"
        config = json.loads(config_file.read_text())
        config[STRUCTURE] = changed
        config["auto_map"] = {**config.get("auto_map", {}), **{a: f"modeling_bnmove.{new}" for a in autos}}
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        (tmp / MODELING).write_text(source)
        _check(model, load_pretrained(tmp))
    return folder


def load_pretrained(folder: Path, config: Any = None) -> nn.Module:
    """The model of a folder `save_pretrained` wrote, in its converted placement, built without
    running the folder's code: its class from its config (read from the folder unless given), the
    changed modules from the config's list, then the weights, every one by name."""
    import transformers
    from safetensors.torch import load_file

    if config is None:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    cls = getattr(transformers, (config.architectures or [""])[0], None)
    if cls is None:
        raise BnmoveError(f"{folder}: its config names no transformers class ({config.architectures})")
    model = cls._from_config(config)
    # bnmove's kept affine, not the folder's: torch alone loads the model saved whole, and a later
    # conversion knows it for what it is
    hf_structure.rebuild(model, getattr(config, STRUCTURE), affine=ChannelAffine)
    weights: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    loaded = model.load_state_dict(weights, strict=False)
    if loaded.missing_keys or loaded.unexpected_keys:
        wrong = [*loaded.missing_keys, *loaded.unexpected_keys]
        raise BnmoveError(f"{folder}: its weights do not fit its structure ({wrong[0]})")
    return model.eval()


def _check(model: nn.Module, loaded: nn.Module) -> None:
    want, got = model.state_dict(), loaded.state_dict()
    wrong = sorted(
        k
        for k in want.keys() | got.keys()
        if k not in want or k not in got or not torch.equal(want[k], got[k])
    )
    if wrong or list(want) != list(got):
        what = wrong[0] if wrong else "the order of its weights"
        raise BnmoveError(f"the folder does not load back as the model: {what} differs")
