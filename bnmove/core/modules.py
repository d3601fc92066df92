"""Where modules sit in a model, and how an exception points at the user's code."""

from __future__ import annotations

import hashlib
import traceback
from collections.abc import Hashable, Iterator
from typing import Any

from torch import fx, nn


def qualified(prefix: str, name: object) -> str:
    """``prefix.name``, or ``name`` where the prefix is the whole model (``""``)."""
    return f"{prefix}.{name}" if prefix else str(name)


def module_calls(graph: fx.Graph) -> dict[str, int]:
    """How often each module (by qualified name) is called in ``graph``."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return calls


#: what every nn.Module holds (its dictionaries of state and hooks, its mode): no module's setting
_MODULE_STATE = frozenset(nn.Module().__dict__)

_SCALAR = (bool, int, float, str, type(None))


def settings(module: nn.Module, *, skip: frozenset[str] = frozenset()) -> tuple[tuple[str, Any], ...] | None:
    """A module's own settings (every attribute it adds to nn.Module's, by name, except ``skip``),
    when all are plain values, else None: two modules of one class and equal settings run the same
    Python in their forward (their tensors aside)."""
    own = sorted((k, v) for k, v in vars(module).items() if k not in _MODULE_STATE and k not in skip)
    if not all(
        isinstance(v, _SCALAR) or (isinstance(v, tuple) and all(isinstance(e, _SCALAR) for e in v))
        for _, v in own
    ):
        return None
    return tuple(own)


def structure(module: nn.Module) -> Hashable | None:
    """Equal for two modules whose forwards trace alike: the same classes with the same settings,
    all the way down (None where some setting is not a plain value)."""
    own = settings(module)
    children = tuple((name, structure(child)) for name, child in module.named_children())
    if own is None or any(child is None for _, child in children):
        return None
    typed = tuple((name, type(value), value) for name, value in own)  # True and 1 are not alike here
    return (type(module), typed, children)


def submodule(root: nn.Module, target: str) -> nn.Module:
    """``root.get_submodule(target)``, read from each module's children directly: a conversion looks
    modules up by name hundreds of times, and torch's lookup tests and reads every step through
    ``nn.Module.__getattr__``. A step whose name is not a plain child (an attribute or a class
    attribute by that name, or no such child) is left to torch, which answers or says why not."""
    module = root
    for atom in target.split(".") if target else ():
        child = module._modules.get(atom)
        if child is None or atom in module.__dict__ or hasattr(type(module), atom):
            return root.get_submodule(target)
        module = child
    return module


def set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path (``""`` is not allowed)."""
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = submodule(root, parent_name) if parent_name else root
    setattr(parent, attr, module)


class Slots:
    """Every slot (parent, key) of every module under a root, read in one walk of the tree.

    A conversion replaces many modules; looking up each one's slots by walking the whole model
    made conversion quadratic in its size. The index is read once, on first use, and kept up to
    date by `replace`; a slot that changed behind its back is checked before it is used.
    """

    def __init__(self, root: nn.Module) -> None:
        self._root = root
        #: id of a module -> (the module, kept alive so its id stays its own; its slots)
        self._slots: dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]] | None = None

    def _walk(self) -> Iterator[tuple[nn.Module, str, nn.Module]]:
        """``(parent, key, child)`` for every slot under the root: one walk of the tree."""
        for parent in self._root.modules():
            for key, child in parent._modules.items():
                if child is not None:
                    yield parent, key, child

    def _index(self) -> dict[int, tuple[nn.Module, list[tuple[nn.Module, str]]]]:
        if self._slots is None:
            self._slots = {}
            for parent, key, child in self._walk():
                self._slots.setdefault(id(child), (child, []))[1].append((parent, key))
        return self._slots

    def replace(self, old: nn.Module, new: nn.Module) -> None:
        """Put ``new`` in every slot that holds ``old`` (a module registered under several names)."""
        index = self._index()
        _, slots = index.get(id(old), (old, []))
        held = [(parent, key) for parent, key in slots if parent._modules.get(key) is old]
        if not held:  # registered behind the index's back (set_submodule): look once more
            held = [(parent, key) for parent, key, child in self._walk() if child is old]
        for parent, key in held:
            setattr(parent, key, new)
        index.pop(id(old), None)
        entry = index.setdefault(id(new), (new, []))
        entry[1].extend(held)
        for key, child in new._modules.items():  # new registrations inside the new module
            if child is not None:
                index.setdefault(id(child), (child, []))[1].append((new, key))


def key_script_type(module: nn.Module, kind: str, value: str) -> None:
    """Give ``module`` a TorchScript type of its own, shared only with modules keyed alike.

    TorchScript compiles one type per class and set of attributes, children compared in name order,
    and every instance that matches runs that type's code. A module bnmove changed without
    changing those (an instance's own regenerated ``forward``; a Sequential whose children swapped
    places under the same keys) would run the code compiled for its unchanged twin, elsewhere in
    the model or in one scripted before. Its ``__jit_ignored_attributes__``, which TorchScript
    reads per instance and compares, gets one entry ``"<kind> <hash of value>"`` (replacing an
    earlier one of that kind).
    """
    digest = hashlib.sha256(value.encode()).hexdigest()[:16]
    kept = [a for a in getattr(module, "__jit_ignored_attributes__", []) if not a.startswith(f"{kind} ")]
    module.__dict__["__jit_ignored_attributes__"] = [*kept, f"{kind} {digest}"]


def parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (submodule(root, parent_name) if parent_name else root), attr


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, and where the user's code raised it when that is known."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".strip().rstrip(":")
    where = blocking_code(exc)
    return f"{line}, at {where}" if where else line


def blocking_code(exc: BaseException) -> str | None:
    """``file.py:LINE `code``` of the innermost frame outside torch and bnmove: the code that blocks."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not any(
            part in f.filename.replace("\\", "/") for part in ("/torch/", "/bnmove/", "<eval_with_key>")
        )
    ]
    if not frames:
        return None
    frame = frames[-1]
    code = (frame.line or "").strip()
    name = "/".join(frame.filename.replace("\\", "/").split("/")[-2:])
    return f"{name}:{frame.lineno}" + (f" `{code}`" if code else "")
