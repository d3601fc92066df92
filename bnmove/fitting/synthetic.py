"""Synthetic calibration inputs made from the model's own BatchNorm statistics.

No real data needed: inputs start as Gaussian noise and are optimised (Adam, on
the inputs only; the model is not changed) until every BatchNorm sees batch
statistics equal to its running statistics:

    L(x) = sum over BNs of  mean_c [ (mu_c(x) - m_c)^2 / (v_c + eps)
                                     + (log(s2_c(x) + eps) - log(v_c + eps))^2 ]

where ``mu_c(x)``, ``s2_c(x)`` are the batch mean and variance of the BN's input
and ``m_c``, ``v_c`` its running mean and variance. This is the "distilled
data" of ZeroQ (Cai et al., CVPR 2020) and of Haroush et al. ("The Knowledge
Within", CVPR 2020), used there for data-free quantisation.

Such inputs carry what a per-channel Gaussian cannot: the joint structure that
every layer's statistics impose (skew, cross-channel and spatial correlation).
Used as calibration data they let ``convert`` fit pair by pair on the converted
upstream model and refit the next layer, without a single real sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..analysis.batchnorms import is_batchnorm_module
from ..analysis.inputs import infer_example_inputs
from ..core.progress import OnProgress, Stage
from ..core.running import eval_mode
from ..errors import BnmoveError, ModelRunError

log = logging.getLogger(__name__)


def _statistics_loss(bn: _BatchNorm, h: torch.Tensor) -> torch.Tensor:
    """The BN's term of L: its input's batch moments against its running moments."""
    assert bn.running_mean is not None and bn.running_var is not None
    rows = h.transpose(0, 1).reshape(h.shape[1], -1).float()
    mean, var = rows.mean(1), rows.var(1, unbiased=False)
    ref_var = bn.running_var.float() + bn.eps
    return ((mean - bn.running_mean.float()) ** 2 / ref_var).mean() + (
        (torch.log(var + bn.eps) - torch.log(ref_var)) ** 2
    ).mean()


def synthesize_inputs(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | None = None,
    *,
    samples: int = 256,
    steps: int = 200,
    batch_size: int = 64,
    lr: float = 0.2,
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> torch.Tensor:
    """``samples`` inputs whose statistics at every BatchNorm match its running statistics.

    Args:
        model: a model with BatchNorm layers holding running statistics; it is
            run in eval mode and left as it was.
        example_inputs: one input tensor of the model; its shape (all but the
            batch dimension), dtype and device are those of the synthetic
            inputs. Inferred from the first layer when not given (224x224 for
            image convs: pass your real input size).
        samples: how many inputs to make, in batches of ``batch_size``.
        steps: Adam steps per batch (cosine-decayed learning rate ``lr``).
        seed: seed of the starting noise; the result is deterministic on CPU.
        on_progress: given a [`Stage`][bnmove.Stage] after every step ("making synthetic inputs",
            steps done, steps in all).

    Returns:
        A ``(samples, *input_shape)`` tensor, usable as calibration data (``Calibration(x)``).

    Example:
        >>> x = synthesize_inputs(model, (torch.zeros(1, 3, 32, 32),))
        >>> convert(model, "after", method="fit", calibration=Calibration(x))
    """
    if samples < 1 or steps < 1 or batch_size < 1:
        raise BnmoveError("synthetic inputs need samples, steps and batch size of at least 1")
    inputs = tuple(example_inputs) if example_inputs is not None else infer_example_inputs(model)
    if len(inputs) != 1 or not inputs[0].is_floating_point():
        raise BnmoveError(
            "synthetic inputs need a model with one floating-point input; pass calibration data instead"
        )
    norms = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and is_batchnorm_module(m) and m.running_mean is not None
    ]
    if not norms:
        raise BnmoveError("the model has no BatchNorm running statistics to make synthetic inputs from")
    shape, dtype, device = inputs[0].shape[1:], inputs[0].dtype, inputs[0].device
    seen: dict[_BatchNorm, torch.Tensor] = {}

    def record(module: _BatchNorm, args: tuple[torch.Tensor, ...]) -> None:
        seen[module] = args[0]

    generator = torch.Generator().manual_seed(seed)
    chunks = [min(batch_size, samples - start) for start in range(0, samples, batch_size)]
    total, done = len(chunks) * steps, 0
    made: list[torch.Tensor] = []
    hooks = [m.register_forward_pre_hook(record) for m in norms]
    try:
        with eval_mode(model), torch.enable_grad():
            for size in chunks:
                # Adam works on a float32 copy; the model sees its own dtype.
                x = torch.randn(size, *shape, generator=generator).to(device).requires_grad_(True)
                optimizer = torch.optim.Adam([x], lr=lr)
                for step in range(steps):
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                    seen.clear()
                    try:
                        model(x.to(dtype))
                    except Exception as exc:  # the user's model: report, do not crash
                        raise ModelRunError(
                            f"the model failed on synthetic inputs of shape {tuple(x.shape)}: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
                    if not seen:
                        raise BnmoveError("no BatchNorm was called by the model's forward")
                    loss = torch.stack([_statistics_loss(bn, h) for bn, h in seen.items()]).mean()
                    (grad,) = torch.autograd.grad(loss, x)
                    loss = loss.detach()
                    x.grad = grad
                    optimizer.step()
                    done += 1
                    if on_progress is not None:
                        on_progress(Stage("making synthetic inputs", done, total))
                log.info("synthetic batch of %d: BN statistics loss %.4g", size, float(loss))
                made.append(x.detach().to(dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat(made)


__all__ = ["synthesize_inputs"]
