"""The gate fold (``deploy/gate.py``): a BN after its activation that feeds a squeeze-and-excitation
gate and the product the gate scales folds into the gate's first layer and the projection, with a
per-sample bias from the gate vector; exact at every input size, and where it is not, a reason."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import assert_same_outputs
from torch import nn
from zoo import randomize_bn

from bnmove import export_variants
from bnmove.deploy import ExportOptions, fold_forward


class SqueezeExcite(nn.Module):
    """torchvision's ``SqueezeExcitation`` (``pool="module"``) or timm's (``x.mean((2, 3), keepdim=True)``)."""

    def __init__(self, channels: int, squeeze: int, pool: str) -> None:
        super().__init__()
        self.pool = pool
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.act, self.fc2 = (
            nn.Conv2d(channels, squeeze, 1),
            nn.SiLU(),
            nn.Conv2d(squeeze, channels, 1),
        )
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "spatial":  # a spatial gate: no pooling, so its vector varies over space
            return x * self.gate(self.fc2(self.act(self.fc1(x))))
        pooled = self.avgpool(x) if self.pool == "module" else x.mean((2, 3), keepdim=True)
        return x * self.gate(self.fc2(self.act(self.fc1(pooled))))


class InvertedResidual(nn.Module):
    """An EfficientNet block with every BN after its activation: the depthwise BN feeds the gate."""

    def __init__(self, pool: str = "module", project_padding: int = 0) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(4, 16, 1, bias=False), nn.SiLU(), nn.BatchNorm2d(16))
        self.dw = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.SiLU(), nn.BatchNorm2d(16)
        )
        self.se = SqueezeExcite(16, 4, pool)
        kernel = 1 + 2 * project_padding
        self.project = nn.Sequential(
            nn.Conv2d(16, 4, kernel, padding=project_padding, bias=False), nn.BatchNorm2d(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


def _block(**kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(InvertedResidual(**kwargs)).eval()  # type: ignore[arg-type]


@pytest.mark.parametrize("pool", ["module", "mean"])
def test_the_gated_bn_folds_exactly_at_every_size(pool: str) -> None:
    model = _block(pool=pool)
    folding = fold_forward(model, padded=True)
    fates = {f.bn: f for f in folding.bns}
    assert (fates["dw.2"].fate, fates["dw.2"].form, fates["dw.2"].into) == (
        "folded-forward", "gate", "se.fc1, project.0"
    )  # fmt: skip
    assert fates["project.1"].fate == "fused-backward"  # the bias goes in after it: nothing stands between
    assert folding.standalone == []
    for size in (8, 13):
        assert_same_outputs(model, folding.model, (torch.randn(2, 4, size, size),), rtol=1e-5)
    wide = copy.deepcopy(model).double()
    folded = fold_forward(wide, padded=True).model
    for size in (8, 13):
        assert_same_outputs(wide, folded, (torch.randn(2, 4, size, size, dtype=torch.float64),), rtol=1e-12)


def test_onnxruntime_runs_the_folded_block_with_no_batchnorm_left(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = _block()
    x = torch.randn(2, 4, 10, 10)
    paths = export_variants(
        model, (x,), tmp_path, ["original"], stem="block", options=ExportOptions(fold="padded")
    )
    graph = onnx.load(str(paths["original"])).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    session = ort.InferenceSession(str(paths["original"]), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(("kwargs", "says"), [
    ({"project_padding": 1}, "gate fold: cannot fold into the gated product's layer project.0: it pads its input"),
    ({"pool": "spatial"}, "gate fold: the gate's pooling is not global, so its vector is not constant over space"),
])  # fmt: skip
def test_where_the_fold_is_not_exact_the_bn_stays_with_the_reason(
    kwargs: dict[str, object], says: str
) -> None:
    model = _block(**kwargs)
    folding = fold_forward(model, padded=True)
    (gated,) = [f for f in folding.bns if f.bn == "dw.2"]
    assert gated.fate == "standalone" and (gated.reason or "").startswith(says)
    assert type(folding.model) is InvertedResidual  # nothing was rewritten
    assert_same_outputs(model, folding.model, (torch.randn(2, 4, 8, 8),), rtol=1e-5)
