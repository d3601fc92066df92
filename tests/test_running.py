"""Running a model without changing it: every module's train/eval flag is its own again after."""

from __future__ import annotations

import torch
from torch import nn

from bnmove.core.running import eval_mode, kept_modes


class FrozenStats(nn.Module):
    """A block whose own ``train`` keeps its BN in eval mode (as detection backbones freeze BNs)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def train(self, mode: bool = True) -> FrozenStats:
        self.calls.append(mode)
        super().train(mode)
        self.bn.training = False
        return self


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def test_eval_mode_sets_every_flag_and_puts_each_back() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 1), nn.Sequential(nn.BatchNorm2d(2), nn.ReLU()), nn.Dropout())
    model.train()
    model[1][0].eval()  # one module in eval mode of its own
    before = _flags(model)
    with eval_mode(model) as same:
        assert same is model and not any(_flags(model))
    assert _flags(model) == before == [True, True, True, False, True, True]
    with kept_modes(model):
        model.eval()
        model[2].train()
    assert _flags(model) == before


def test_a_class_with_its_own_train_is_put_in_eval_by_it() -> None:
    model = nn.Sequential(FrozenStats(), nn.ReLU()).train()
    model[0].calls.clear()
    before = _flags(model)
    with eval_mode(model):
        assert model[0].calls == [False] and not any(_flags(model))
    assert _flags(model) == before and not model[0].bn.training
    with torch.no_grad():
        model(torch.randn(1, 2, 3, 3))  # still runs in the flags it had
