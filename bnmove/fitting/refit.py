"""Re-fitting a Conv/Linear by ridge least squares so that, fed the converted model's activations,
it reproduces the original model's output (im2col for convs, one solve per group)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: rows a layer's refit samples at most
MAX_ROWS = 60_000


def design_rows(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Rows of the layer's input as the layer sees them (im2col for convs) and the row count per sample."""
    if isinstance(layer, nn.Linear):
        return x.reshape(-1, x.shape[-1]), 1
    if isinstance(layer, nn.Conv1d):
        x4 = x.unsqueeze(2)
        cols = F.unfold(
            x4,
            (1, layer.kernel_size[0]),
            dilation=(1, layer.dilation[0]),
            padding=(0, int(layer.padding[0])),
            stride=(1, layer.stride[0]),
        )
    else:
        assert isinstance(layer, nn.Conv2d)
        cols = F.unfold(
            x,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,  # type: ignore[arg-type]
            stride=layer.stride,
        )
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), cols.shape[2]


def refit_blocker(layer: nn.Module) -> str | None:
    if isinstance(layer, nn.Linear):
        return None
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)) and type(layer) in (nn.Conv1d, nn.Conv2d):
        if layer.padding_mode != "zeros":
            return f"padding_mode={layer.padding_mode!r}"
        if isinstance(layer.padding, str):
            return "string padding"
        return None
    return f"{type(layer).__name__} is not refitted"


class Underdetermined(Exception):
    """Too few rows for the unknowns of a least-squares refit: it would fit the samples, not the layer."""


#: a refit needs this many rows (samples × positions) per unknown of one output channel
ROWS_PER_UNKNOWN = 4


class NormalEquations:
    """A Conv/Linear refit's least-squares problem, accumulated batch by batch.

    Per group: ``DᵀD`` and ``DᵀY`` of the design rows ``D`` (the layer's input as
    it sees it: im2col for convs, plus a ones column for the bias) against the
    target rows ``Y``, and enough of ``Y``'s moments to report the fit's error,
    so any amount of data costs one Gram matrix per group.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.groups = int(getattr(layer, "groups", 1))
        self.rows = 0
        self.gram: torch.Tensor | None = None  # (groups, k+1, k+1)
        self.cross: torch.Tensor | None = None  # (groups, k+1, outs per group)
        self.y_sum = 0.0
        self.y_square = 0.0
        self.y_count = 0

    def add(self, x: torch.Tensor, target: torch.Tensor, max_rows: int = MAX_ROWS, seed: int = 0) -> None:
        """Take in ``layer(x) ≈ target`` for one batch, at most ``max_rows`` random rows of it."""
        with torch.no_grad():
            rows, _ = design_rows(self.layer, x.double())
            if isinstance(self.layer, nn.Linear):
                out_rows = target.double().reshape(-1, target.shape[-1])
            else:  # (N, C_out, *spatial) -> rows in im2col order: sample-major, then spatial row-major
                out_rows = target.double().flatten(2).transpose(1, 2).reshape(-1, target.shape[1])
            if rows.shape[0] > max_rows:
                idx = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:max_rows]
                rows, out_rows = rows[idx.to(rows.device)], out_rows[idx.to(out_rows.device)]
            self.add_rows(rows, out_rows)

    def add_rows(self, rows: torch.Tensor, out_rows: torch.Tensor) -> None:
        """Take in design rows (as `design_rows` makes them) against target rows ``(K, C_out)``."""
        with torch.no_grad():
            rows, out_rows = rows.double().cpu(), out_rows.double().cpu()
            groups = self.groups
            cols = rows.shape[1] // groups
            outs = out_rows.shape[1] // groups
            design = torch.cat(
                [
                    rows.reshape(len(rows), groups, cols),
                    torch.ones(len(rows), groups, 1, dtype=torch.float64),
                ],
                2,
            ).transpose(0, 1)  # (groups, rows, cols + 1)
            ys = out_rows.reshape(len(rows), groups, outs).transpose(0, 1)
            gram, cross = design.transpose(1, 2) @ design, design.transpose(1, 2) @ ys
            self.gram = gram if self.gram is None else self.gram + gram
            self.cross = cross if self.cross is None else self.cross + cross
            self.rows += len(rows)
            self.y_sum += float(out_rows.sum())
            self.y_square += float((out_rows * out_rows).sum())
            self.y_count += out_rows.numel()

    @property
    def unknowns(self) -> int:
        """Weights and bias of one output channel."""
        return 0 if self.gram is None else int(self.gram.shape[1])

    def solve(self, ridge: float = 1e-4) -> float:
        """Ridge least squares; sets the layer's weight and bias and returns the relative RMS error.

        Raises `Underdetermined` (the layer left as it was) below ``ROWS_PER_UNKNOWN`` rows
        per unknown.
        """
        if self.gram is None or self.cross is None:
            raise Underdetermined("no rows")
        if self.rows < ROWS_PER_UNKNOWN * self.unknowns:
            raise Underdetermined(f"{self.rows} rows for {self.unknowns} unknowns per output channel")
        with torch.no_grad():
            eye = torch.eye(self.unknowns, dtype=torch.float64)
            lam = ridge * self.gram.diagonal(dim1=1, dim2=2).mean(1)
            regularised = self.gram + lam[:, None, None] * eye
            solution = torch.linalg.solve(regularised, self.cross)  # (groups, k+1, outs)
            # ||D W - Y||² = tr(Wᵀ G W) - 2 tr(Wᵀ B) + ||Y||², summed over groups
            sse = float(
                ((solution * (self.gram @ solution)).sum() - 2 * (solution * self.cross).sum())
                + self.y_square
            )
            mean = self.y_sum / self.y_count
            std = max(self.y_square / self.y_count - mean * mean, 0.0) ** 0.5
            err = (max(sse, 0.0) / self.y_count) ** 0.5 / max(std, 1e-12)
            weight = solution[:, :-1, :].permute(0, 2, 1).reshape(-1, self.unknowns - 1)
            bias = solution[:, -1, :].reshape(-1)
            layer = self.layer
            w = layer.weight
            assert isinstance(w, torch.Tensor)
            w.copy_(weight.reshape(w.shape).to(w.dtype))
            if layer.bias is None:
                layer.bias = nn.Parameter(bias.to(device=w.device, dtype=w.dtype))
            else:
                layer.bias.copy_(bias.to(layer.bias.dtype))  # type: ignore[operator]
        return err


def refit_layer(
    layer: nn.Conv1d | nn.Conv2d | nn.Linear,
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    ridge: float = 1e-4,
    max_rows: int = MAX_ROWS,
) -> float:
    """Ridge least squares for ``layer``'s weight and bias so that ``layer(x) ≈ target``.

    Returns the relative RMS error after the fit. Convs are unfolded (im2col),
    and each group is solved on its own slice of input channels. Raises
    `Underdetermined` (and leaves the layer as it was) when there are
    fewer than ``ROWS_PER_UNKNOWN`` rows per unknown: e.g. a 3×3×512 conv on a
    1×1 feature map of 256 samples has 256 rows for 4609 unknowns.
    """
    equations = NormalEquations(layer)
    equations.add(x, target, max_rows)
    return equations.solve(ridge)
