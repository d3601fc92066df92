"""A tour of bnmove's Python API on a sample model: ``python api_tour.py``.

Finds the pairs, converts both ways (exactly where the math allows), checks the
outputs, exports the variants to ONNX and compares them under onnxruntime.
"""

from __future__ import annotations

import tempfile

import torch

import bnmove
from bnmove.sample_models import digits_net


def main() -> None:
    torch.manual_seed(0)
    model = digits_net()
    with torch.no_grad():  # give BN non-trivial statistics, as training would
        model.train()
        for _ in range(5):
            model(torch.rand(64, 1, 8, 8))
    model.eval()
    x = torch.rand(16, 1, 8, 8)

    # 1. Which BatchNorms sit next to which activations, and how do they move exactly:
    #    folded into a neighbouring Conv/Linear, or keeping the BN's affine map as a layer?
    for pair in bnmove.find_pairs(model):
        how = "kept affine" if pair.keeps_affine else "folded" if pair.exact else "no exact move"
        print(
            f"{pair.bn:8} {pair.activation or '-':8} {pair.placement or 'not adjacent':12} {how:12} {pair.reason or ''}"
        )

    # 2. Every BN after its activation, keeping the function exactly.
    after = bnmove.convert(model, "after", method="exact", example_inputs=(x,))
    print(f"exact: moved {len(after.moved)}, max abs error {after.verification.max_abs_error:.2e}")
    with torch.no_grad():
        assert torch.allclose(after.model(x), model(x), atol=1e-4)

    # 3. Every BN before its activation, exactly too: where no layer absorbs the BN's affine
    #    map, it stays as a ChannelAffine layer; 'fit' would remove it at a small cost in fidelity.
    before = bnmove.convert(model, "before", example_inputs=(x,))
    for move in before.moved:
        print(f"{move.method} {move.pair.bn} -> {move.moved_to}")
    fitted = bnmove.convert(model, "before", method="fit", example_inputs=(x,))
    print(f"fit: max abs error {fitted.verification.max_abs_error:.2e} (the function changes a little)")

    # 4. Deployment: ONNX variants, then onnxruntime side by side.
    with tempfile.TemporaryDirectory() as folder:
        paths = bnmove.export_variants(
            model, (x,), folder, options=bnmove.deploy.ExportOptions(fold="forward")
        )
        result = bnmove.compare(paths, provider="auto", batch_sizes=(1, 16), iterations=10)
        for timing in result.timings:
            print(
                f"{timing.variant:8} batch {timing.batch_size:>2}: {timing.p50_ms:.3f} ms ({timing.ratio:.2f}x)"
            )


if __name__ == "__main__":
    main()
