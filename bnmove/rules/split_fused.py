"""Split a fused norm+activation module (timm's ``BatchNormAct2d``) into a plain BN and its activation.

The fused module computes ``f(BN(z))`` in one forward. To move the BN, the
module's slot takes ``Sequential(BN, f)`` in the new order: a plain BN of the
fused module's base class holding its state (the same state-dict keys), and
the activation, which is the module's own child or a torch module computing
the function its forward calls (checked numerically on a probe). Every other
rule then applies to the plain BN as to any pair.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..analysis.detect import Site
from ..analysis.fused import FusedNorm, make_plain_batchnorm
from ..analysis.patterns import activation_call, activation_spec
from ..core.modules import submodule
from .base import Applied, Check, Context, Method, Rule, refuse


def split_fused(module: nn.Module, fused: FusedNorm) -> tuple[nn.Module, nn.Module] | None:
    """A fused norm+act module as ``(plain BN, activation module)``, or None when no module computes its act.

    The plain BN holds the fused module's state (its own keys) without its
    children; the activation is the fused module's own child, or a torch module
    made from the function the fused forward calls (checked numerically).
    """
    plain = make_plain_batchnorm(module, fused.base)
    for name in list(plain._modules):
        del plain._modules[name]
    if fused.act_child is not None:
        return plain, submodule(module, fused.act_child)
    act = activation_module(fused.call.spec.kind, fused.act_target, fused.act_args, fused.act_kwargs)
    return None if act is None else (plain, act)


def activation_module(
    kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> nn.Module | None:
    """The torch module that computes ``target(x, *args, **kwargs)``, or None (checked on a probe)."""
    spec = activation_spec(kind)
    if not spec.modules:
        return None
    options = {k: v for k, v in kwargs.items() if k != "inplace"}
    try:
        module = spec.modules[0](*args, **options)
    except TypeError:
        return None
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        want = activation_call(target, args, options)(probe.clone())
        return module if torch.allclose(module(probe.clone()), want, atol=1e-6) else None


class SplitFused(Rule):
    """The structural rule for fused sites: the module becomes ``(plain BN, activation module)``,
    which compute what it computed (exactly: the split is checked numerically when the fused
    module is analysed). It changes nothing in the model itself; the placing of the two modules,
    in the slot's new order, is `bnmove.moving.placing`'s, before the pair's own rule moves the BN."""

    name = "split-fused"
    method = Method.EXACT
    exact = True

    def match(self, site: Site) -> bool:
        return site.fused is not None

    def check(self, site: Site, context: Context) -> Check:
        """Whether a torch module computes the fused activation."""
        assert site.fused is not None
        if split_fused(context.modules[str(site.bn_node.target)], site.fused) is None:
            return refuse("the fused module's activation is a function no torch module computes")
        return Check()

    def apply(self, root: nn.Module, site: Site, check: Check) -> Applied:
        """``Applied.split``: the plain BN and the activation module for the fused module of ``site``
        as it is now in ``root``."""
        return Applied(split=self.split(root, site))

    def split(self, root: nn.Module, site: Site) -> tuple[nn.Module, nn.Module]:
        """`apply`'s split itself, for a site whose check passed."""
        assert site.fused is not None
        split = split_fused(submodule(root, str(site.bn_node.target)), site.fused)
        assert split is not None, "a split after a passed check"
        return split
