"""Looking a module up by name: the same answer as torch's ``get_submodule``, faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnmove.core.modules import submodule
from bnmove.sample_models import resnet


class Shadowed(nn.Module):
    """A class attribute by a child's name: torch's lookup finds the class attribute first."""

    head = "a class attribute"

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 2, 1), nn.ReLU())
        self._modules["head"] = nn.Linear(2, 2)  # registered behind nn.Module's back

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_every_name_resolves_as_torch_resolves_it() -> None:
    model = resnet()
    names = [name for name, _ in model.named_modules()]
    assert len(names) > 20
    assert all(submodule(model, name) is model.get_submodule(name) for name in names)
    assert submodule(model, "") is model


def test_what_is_not_a_plain_child_is_torchs_to_answer() -> None:
    model = nn.Sequential(Shadowed())
    assert submodule(model, "0.body.1") is model[0].body[1]
    for name in ("0.head", "0.missing", "0.body.5"):
        with pytest.raises(AttributeError) as ours:
            submodule(model, name)
        with pytest.raises(AttributeError) as theirs:
            model.get_submodule(name)
        assert str(ours.value) == str(theirs.value)
