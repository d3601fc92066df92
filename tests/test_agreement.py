"""One measure of agreement for every comparison bnmove makes, and the conversions that once crashed in it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_outputs
from torch import nn
from zoo import FusedNet, randomize_bn

import bnmove
from bnmove.core import fidelity
from bnmove.core.fidelity import Agreement, difference
from bnmove.errors import BnmoveError
from bnmove.pipeline import conversion


def test_difference_by_hand() -> None:
    want = [torch.tensor([[1.0, 3.0], [2.0, -4.0]])]
    got = [torch.tensor([[1.5, 3.0], [-1.0, 1.0]])]
    measured = difference(want, got)
    assert measured.max_abs == 5.0
    assert measured.mean_abs == pytest.approx(8.5 / 4)
    assert measured.scale == 4.0
    assert measured.rel == pytest.approx(5.0 / 4.0)
    dot, norms = 1.5 + 9 - 2 - 4, np.sqrt((1 + 9 + 4 + 16) * (2.25 + 9 + 1 + 1))
    assert measured.cosine == pytest.approx(dot / norms)
    assert (measured.top1, measured.samples) == (0.5, 2)  # row 0 agrees (column 1), row 1 does not


def test_empty_integer_and_numpy_outputs() -> None:
    """A detection head's empty boxes count as agreeing; labels count 1 where they differ at all."""
    scores = np.array([[0.25, 0.75]], dtype=np.float32)
    empty = [torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)]
    assert difference([scores, *empty], [torch.from_numpy(scores), *empty]).max_abs == 0.0
    labels = difference([torch.tensor([1, 2])], [torch.tensor([1, 3])])
    assert (labels.max_abs, labels.cosine, labels.top1) == (1.0, 1.0, None)
    assert difference([torch.zeros(0)], [torch.zeros(0)]).rel == 0.0


def test_accumulates_over_calls() -> None:
    meter = Agreement()
    meter.add([torch.tensor([[0.0, 1.0]])], [torch.tensor([[0.0, 2.0]])])
    meter.add([torch.tensor([[3.0, 1.0], [0.0, 5.0]])], [torch.tensor([[1.0, 1.0], [5.0, 0.0]])])
    measured = meter.result()
    assert (measured.max_abs, measured.scale, measured.samples) == (5.0, 5.0, 3)
    assert measured.top1 == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("want", "got", "says"),
    [
        ([torch.ones(2)], [torch.ones(2), torch.ones(1)], "in number"),
        ([torch.ones(2, 3)], [torch.ones(3, 2)], "shape (3, 2) against (2, 3)"),
    ],
)
def test_a_different_structure_is_an_error(want: list, got: list, says: str) -> None:
    with pytest.raises(BnmoveError, match=says.replace("(", r"\(").replace(")", r"\)")):
        difference(want, got)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fused_norm_act_converts_in_any_dtype(dtype: torch.dtype) -> None:
    """timm's BatchNormAct2d split and moved in the model's own dtype (the probe once made float32 inputs)."""
    torch.manual_seed(0)
    model = randomize_bn(FusedNet(nn.SiLU)).eval().to(dtype)
    x = torch.randn(2, 3, 8, 8, dtype=dtype)
    result = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert [m.method for m in result.moves] == ["exact"]
    assert result.verification is not None and result.verification.within_tolerance
    assert result.verification.tolerance == fidelity.tolerance_for(dtype)
    assert_same_outputs(model, result.model, (x,), rtol=fidelity.tolerance_for(dtype))


def test_float64_recheck_of_a_fused_norm_act_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """When float32 rounding exceeds its tolerance, the same conversion is re-made in float64."""
    real = fidelity.tolerance_for
    strict = lambda dtype: real(dtype) if dtype == torch.float64 else 1e-8  # noqa: E731  (float32 gives ~6e-8)
    monkeypatch.setattr(fidelity, "tolerance_for", strict)
    monkeypatch.setattr(conversion, "tolerance_for", strict)
    torch.manual_seed(0)
    model = randomize_bn(FusedNet(nn.SiLU)).eval()
    result = bnmove.convert(model, "after", method="exact", example_inputs=(torch.randn(2, 3, 8, 8),))
    assert result.verification is not None
    assert result.verification.float64_rel_error is not None
    assert result.verification.float64_rel_error < 1e-12


class EmptyDetections(nn.Module):
    """Scores beside empty boxes and labels, as a detector returns on an image with nothing in it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.act(self.bn(self.conv(x)))
        return {
            "scores": y.mean((2, 3)),
            "boxes": y.new_zeros(0, 4),
            "labels": torch.zeros(0, dtype=torch.long),
        }


def test_an_output_holding_an_empty_tensor_verifies() -> None:
    model = randomize_bn(EmptyDetections()).eval()
    x = torch.randn(2, 3, 8, 8)
    result = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    assert result.moved and result.verification is not None
    assert result.verification.max_rel_error < 1e-5
    assert_same_outputs(model, result.model, (x,))
