"""Walking the analysis graph: links that change nothing in eval mode, shared inputs, node names in reasons."""

from __future__ import annotations

from torch import fx, nn


def describe_node(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A node as reasons name it: ``conv1 (Conv2d)``, ``add``, ``.mean()``, ``the model's output``."""
    if node.op == "call_module":
        return f"{node.target} ({type(modules.get(str(node.target))).__name__})"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    if node.op == "output":
        return "the model's output"
    return f"{node.op} {node.target}"


def is_link_module(module: nn.Module | None) -> bool:
    """A module that changes nothing in eval mode: ``nn.Identity`` (timm's drop-block and
    anti-aliasing slots) or dropout."""
    return isinstance(module, (nn.Identity, nn.modules.dropout._DropoutNd))


def is_identity_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """A call of a link module (`is_link_module`)."""
    return node.op == "call_module" and is_link_module(modules.get(str(node.target)))


def skip_identity_down(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """Follow single-user Identity calls downstream; returns the last node of the chain."""
    while len(node.users) == 1:
        (user,) = node.users
        if not is_identity_node(user, modules):
            break
        node = user
    return node


def skip_identity_up(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """Follow single-user Identity calls upstream from ``node`` (an Identity returns its input)."""
    while is_identity_node(node, modules) and len(node.users) == 1 and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def input_is_shared(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether the tensor ``node`` reads is also read elsewhere, looking through Identity aliases."""
    source = node.args[0] if node.args else None
    while isinstance(source, fx.Node):
        if len(source.users) > 1:
            return True
        if not is_identity_node(source, modules):
            return False
        source = source.args[0]
    return False
