"""Numbers that never flatter: fits are judged on samples they did not see, and big changes are loud."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from output import messages
from torch import nn

import bnmove
from bnmove.cli import main
from bnmove.fitting.calibrate import split_held_out
from bnmove.fitting.refit import Underdetermined, refit_layer


class WideHead(nn.Module):
    """``add -> BN -> ReLU`` (no exact fold: fitted) feeding a wide Linear that a refit would overfit."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 300), nn.Linear(8, 300)
        self.bn = nn.BatchNorm1d(300)
        self.act = nn.ReLU()
        self.head = nn.Linear(300, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.bn(self.a(x) + self.b(x))))


def _model() -> WideHead:
    torch.manual_seed(0)
    model = WideHead()
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(64, 8))
    return model.eval()


def test_split_held_out_keeps_the_tail_out_of_the_fit() -> None:
    batches = [(torch.arange(50.0),), (torch.arange(50.0, 100.0),)]
    fit, held = split_held_out(batches)
    assert sum(len(b[0]) for b in fit) == 68 and sum(len(b[0]) for b in held) == 32  # at least 32
    assert torch.equal(torch.cat([b[0] for b in held]), torch.arange(68.0, 100.0))
    fit, held = split_held_out([(torch.arange(1000.0),)])
    assert len(held[0][0]) == 200 and len(fit[0][0]) == 800  # 20%


def test_underdetermined_refit_is_refused_not_overfitted() -> None:
    layer = nn.Linear(300, 10)
    before = layer.weight.detach().clone()
    with pytest.raises(Underdetermined, match="80 rows for 301 unknowns"):
        refit_layer(layer, torch.randn(80, 300), torch.randn(80, 10))
    assert torch.equal(layer.weight, before)  # left as it was


def test_calibrated_fit_reports_held_out_first_and_skips_an_underdetermined_refit() -> None:
    model = _model()
    data = torch.randn(120, 8)
    result = bnmove.convert(
        model, "after", method="fit", calibration=bnmove.Calibration(data), example_inputs=(data[:4],)
    )
    (move,) = result.moved
    assert move.method == "fit-calibrated"
    assert any("head not refitted: 88 rows for 301 unknowns" in n for n in move.notes)
    assert result.calibration is not None and result.calibration.samples == 88
    assert result.held_out is not None and result.held_out.samples == 32
    # The held-out figure is what an independent sample shows, computed the same way.
    fresh = torch.randn(32, 8)
    with torch.no_grad():
        want, got = model(fresh), result.model.eval()(fresh)
    independent = float((want.argmax(1) == got.argmax(1)).float().mean())
    assert result.held_out.top1_agreement is not None
    assert abs(result.held_out.top1_agreement - independent) < 0.3
    text = bnmove.report.conversion_summary(result)
    assert text.index("held-out") < text.index("the fits used")


def test_max_error_refuses_and_a_large_change_is_a_warning(tmp_path: Path) -> None:
    model = _model()
    x = torch.randn(4, 8)
    with pytest.raises(
        bnmove.BnmoveError, match=r"above --max-error 0.01; the pairs that changed them most: bn \(swap\)"
    ):
        bnmove.convert(model, "after", method="swap", example_inputs=(x,), max_error=0.01)
    (warning,) = bnmove.convert(model, "after", method="swap", example_inputs=(x,)).warnings
    assert "computes something else" in warning and "bn (swap)" in warning
    exact = bnmove.convert(model, "after", method="exact", example_inputs=(x,), max_error=0.0)
    assert exact.moved  # exact moves keep the function: max_error has nothing to refuse
    path = tmp_path / "wide.pt"
    torch.save(model, path)
    np.save(tmp_path / "x.npy", torch.randn(40, 8).numpy())
    out = tmp_path / "wide.after.pt"
    args = ["convert", str(path), "--allow-pickle", "--placement", "after", "--input-shape", "4,8"]
    refused = CliRunner().invoke(main, [*args, "--method", "swap", "--max-error", "0.01"])
    assert (
        refused.exit_code == 1
        and "above --max-error" in refused.stderr
        and len(messages(refused.stderr)) == 1
    )
    assert not out.exists()
    warned = CliRunner().invoke(main, [*args, "--method", "swap"])
    assert warned.exit_code == 0 and "computes something else" in warned.stderr and out.exists()


def test_nothing_to_move_says_so(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    result = bnmove.convert(model, "after", method="exact", example_inputs=(torch.randn(3, 4),))
    assert not result.moved
    assert bnmove.report.conversion_summary(result).startswith(
        "nothing moved: none of the 1 BN–activation pairs"
    )


def test_calibrated_fit_of_a_fused_norm_act_module() -> None:
    """timm's resnetv2 (pre-activation, BatchNormAct2d): calibrated fitting crashed on fused pairs."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_affine import FusedAfterAdd, _trained_like

    x = torch.randn(48, 3, 5, 5)
    model = _trained_like(FusedAfterAdd(), x)
    for calibration in (bnmove.Calibration(x), bnmove.Calibration(data_free="synthetic", samples=16)):
        result = bnmove.convert(
            model, "after", method="fit", example_inputs=(x[:4],), calibration=calibration
        )
        (move,) = result.moved
        assert move.method in ("fit-calibrated", "fit-synthetic") and move.effect is not None
        assert [type(m).__name__ for m in result.model.bn] == ["ReLU", "BatchNorm2d"]
