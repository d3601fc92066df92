"""Where modules sit in a model, and how an exception points at the user's code."""

from __future__ import annotations

import traceback

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


def set_submodule(root: nn.Module, qualified_name: str, module: nn.Module) -> None:
    """Replace the submodule at a dotted path (``""`` is not allowed)."""
    parent_name, _, attr = qualified_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def replace_everywhere(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` in every slot that holds ``old`` (a module registered under several names)."""
    for parent in list(root.modules()):
        for key, child in list(parent._modules.items()):
            if child is old:
                setattr(parent, key, new)


def parent_of(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), attr


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
