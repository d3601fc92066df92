"""Which modules trace alike: the forward's code says which settings of ``self`` it can see."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from bnmove.core.alike import forward_key, self_uses


class Block(nn.Module):
    """Calls its children, tests one against None, reads one own setting (``scale``) and not another."""

    def __init__(self, width: int, *, down: bool = False, scale: float = 1.0, tag: str = "a") -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        self.down = nn.Conv2d(width, width, 1) if down else None
        self.scale, self.tag = scale, tag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x))) * self.scale
        return y + (x if self.down is None else self.down(x))


class ReadsChild(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.conv.out_channels


class CallsMethod(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.helper(x)

    def helper(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.conv.out_channels


class Indexes(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(nn.Conv2d(width, width, 1) for _ in range(width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers[0](x)


class CallsSuper(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


def _passes_through(forward):  # type: ignore[no-untyped-def]
    @functools.wraps(forward)  # so the source read is the decorated function's
    def wrapper(self, x):  # type: ignore[no-untyped-def]
        return forward(self, x) * self.conv.out_channels  # reads a child's setting the source hides

    return wrapper


class Decorated(Block):
    @_passes_through
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Caches(Block):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = x
        return self.conv(x)


def _keys(make: Any) -> tuple[Any, Any]:
    return forward_key(make(4)), forward_key(make(8))


def test_a_forward_that_only_calls_its_children_traces_alike_at_every_width() -> None:
    narrow, wide = _keys(Block)
    assert narrow is not None and narrow == wide
    assert forward_key(Block(4, down=True)) != narrow  # a child there or not: another graph
    assert forward_key(Block(4, scale=2.0)) != narrow  # an own setting the forward reads
    assert forward_key(Block(4, tag="b")) == narrow  # one it never reads
    assert self_uses(Block) == {
        "act": {"call"}, "bn": {"call"}, "conv": {"call"}, "down": {"none", "call"}, "scale": {"read"},
    }  # fmt: skip


def test_any_other_use_of_self_keys_by_every_setting_all_the_way_down() -> None:
    for cls in (ReadsChild, CallsMethod, Indexes, CallsSuper, Caches, Decorated):
        narrow, wide = _keys(cls)
        assert narrow != wide, cls.__name__  # the widths differ, so the structures do
        assert forward_key(cls(4)) == forward_key(cls(4)), cls.__name__
    assert self_uses(ReadsChild) == {"conv": {"call", "read"}}
    assert self_uses(CallsSuper) is None and self_uses(Caches) is None and self_uses(Decorated) is None


def test_child_settings_count_where_asked_and_a_forward_of_its_own_has_no_key() -> None:
    plain, silu = Block(4), Block(8)
    silu.act = nn.SiLU()
    assert forward_key(plain) == forward_key(silu)
    assert forward_key(plain, child_settings=True) != forward_key(silu, child_settings=True)
    assert forward_key(Block(4), child_settings=True) == forward_key(Block(4), child_settings=True)
    own = Block(4)
    own.__dict__["forward"] = (
        own.conv.forward
    )  # an instance's own (as bnmove installs): its graphs are its own
    assert forward_key(own) is None
