"""The node reordering of a graph move (what each move does to parameters is its rule's: `bnmove.rules`).

Where BN and activation are modules, `bnmove.moving.surgery` moves the
modules; elsewhere ``move_after(bn, act)`` turns ``X -> BN -> f -> users`` into
``X -> f -> BN -> users`` in a graph and ``move_before(bn, act)`` the reverse
(Identity calls in between stay put).
"""

from __future__ import annotations

import logging

from torch import fx, nn

from ..analysis.nodes import input_is_shared
from ..analysis.patterns import make_out_of_place, match_activation

log = logging.getLogger(__name__)


def move_after(node: fx.Node, anchor: fx.Node) -> None:
    """``X -> node -> ... -> anchor -> users`` becomes ``X -> ... -> anchor -> node -> users``.

    The nodes between (Identity calls) stay where they are; ``node`` takes
    its input as first argument and every link on the way has one user.
    """
    source = node.args[0]
    assert isinstance(source, fx.Node)
    downstream = list(anchor.users)  # before node becomes one of them
    node.replace_all_uses_with(source)
    node.replace_input_with(source, anchor)
    for user in downstream:
        user.replace_input_with(anchor, node)
    anchor.append(node)


def move_before(node: fx.Node, anchor: fx.Node) -> None:
    """``X -> anchor -> ... -> node -> users`` becomes ``X -> node -> anchor -> ... -> users``."""
    source, upstream = node.args[0], anchor.args[0]
    assert isinstance(source, fx.Node) and isinstance(upstream, fx.Node)
    chain = [source]
    while chain[-1] is not anchor:
        parent = chain[-1].args[0]
        assert isinstance(parent, fx.Node)
        chain.append(parent)
    node.replace_all_uses_with(source)
    node.replace_input_with(source, upstream)
    anchor.replace_input_with(upstream, node)
    # Move the activation (and links) down rather than the BN up: the BN's other
    # arguments (a functional BN's statistics) may be defined just before it.
    previous = node
    for link in reversed(chain):
        previous.append(link)
        previous = link


def move_nodes(site_placement: str, bn: fx.Node, act: fx.Node) -> None:
    """Reorder one pair's nodes in a graph: BN to the other side of the activation."""
    if site_placement == "before":
        move_after(bn, act)
    else:
        move_before(bn, act)


def insert_affine(site_placement: str, act: fx.Node, target: str) -> fx.Node:
    """After a graph move, call the kept affine ``target`` on its side of the activation.

    Before -> after: ``X -> A -> f -> BN'``; after -> before: ``BN' -> f -> A -> N``.
    """
    graph = act.graph
    if site_placement == "before":
        source = act.args[0]
        assert isinstance(source, fx.Node)
        with graph.inserting_before(act):
            node = graph.call_module(target, (source,))
        act.replace_input_with(source, node)
    else:
        with graph.inserting_after(act):
            node = graph.call_module(target, (act,))
        act.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    return node


def guard_inplace(act: fx.Node, modules: dict[str, nn.Module]) -> list[str]:
    """After a move, an in-place activation must not overwrite a tensor others still read."""
    if input_is_shared(act, modules):
        call = match_activation(act, modules)
        if call is not None and call.inplace:
            make_out_of_place(act, modules)
            return ["activation made out-of-place: its new input has other readers"]
    return []


__all__ = ["guard_inplace", "insert_affine", "move_after", "move_before", "move_nodes"]
