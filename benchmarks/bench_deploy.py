"""Deployment cost of BN placement: the before-variant against the after-variant, unfolded,
with ``--fold-forward`` and with ``--fold-padded``.

The after-variant's moved BNs are randomised first (a model trained with BN after
its activation has non-trivial ones; exact conversion leaves the identity). For each
after form it counts the BatchNormalization nodes left in the exported graph and how
many of them an exact rule could still remove (the next layer is a Linear or any
Conv), checks onnxruntime's outputs against the unfolded after-variant, then times all
four side by side (interleaved) and prints each one's p50 latency ratio to the
before-variant per batch size (the ratio of means beside it).

    python benchmarks/bench_deploy.py                       # small Bottleneck ResNet on CPU
    python benchmarks/bench_deploy.py --model resnet50 --model mobilenet --provider cuda \\
        --input-size 224 --out docs/benchmarks              # the GPU report (needs a GPU)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnmove import Conversion, compare, convert, export_variants, report
from bnmove.deploy import ExportOptions
from bnmove.sample_models import SAMPLES, bottleneck_resnet, mobilenet, resnet50
from samples.make_models import build_sample

MODELS = {
    "bottleneck_resnet": bottleneck_resnet,
    "resnet50": resnet50,
    "mobilenet": mobilenet,
    **{k: v[0] for k, v in SAMPLES.items()},
}


def absorbable_batchnorms(path: Path) -> list[str]:
    """BatchNormalization nodes whose only consumer is a Gemm/MatMul or a Conv (padded ones too:
    the border-corrected fold removes those)."""
    graph = onnx.load(str(path)).graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    left = []
    for node in graph.node:
        if node.op_type != "BatchNormalization":
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1:
            continue
        user = users[0]
        if user.op_type in ("Gemm", "MatMul", "Conv"):
            left.append(node.name)
    return left


def randomize_moved_bns(conversion: Conversion, seed: int = 0) -> int:
    """Give every BN the conversion moved trained-like state: exact conversion leaves the identity
    there (its statistics are those of its input), and a deployment figure must not profit from
    that. Returns how many BNs were randomised."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for move in conversion.moved:
            bn = conversion.model.get_submodule(move.moved_to or move.pair.bn)
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                continue
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[union-attr]
            bn.bias.copy_(torch.randn(n, generator=g) * 0.3)  # type: ignore[union-attr]
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[union-attr]
            count += 1
    return count


def ort_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--out", type=Path, help="also write <model>.md and <model>.png here")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    print(
        "after-variants: every BN the conversion moved gets random trained-like affine parameters and "
        "statistics before export (exact conversion would leave identity BNs there)"
    )
    for name in args.model or ["bottleneck_resnet"]:
        torch.manual_seed(0)
        model = build_sample(name) if name in SAMPLES else MODELS[name]().eval()
        x = torch.randn(2, 3, args.input_size, args.input_size)
        after = convert(model, "after", example_inputs=(x,))
        randomized = randomize_moved_bns(after)
        with tempfile.TemporaryDirectory() as tmp:
            paths: dict[str, Path] = {}
            for variant, source, fold in (
                ("before", model, {}),
                ("after", after.model, {}),
                ("after.fold-forward", after.model, {"options": ExportOptions(fold="forward")}),
                ("after.fold-padded", after.model, {"options": ExportOptions(fold="padded")}),
            ):
                out = export_variants(source, (x,), Path(tmp) / variant, ["original"], stem=name, **fold)
                paths[variant] = out["original"]
            xs = x.numpy()
            unfolded = ort_output(paths["after"], xs)
            result = compare(
                paths,
                provider=args.provider,
                batch_sizes=sizes,
                iterations=args.iterations,
                warmup=5,
                reference="before",
            )
            print(f"\n{name}: {result.provider} on {result.device}, onnxruntime {result.onnxruntime}")
            print(f"  {randomized} moved BNs randomised in the after-variant")
            for variant in ("after", "after.fold-forward", "after.fold-padded"):
                graph = onnx.load(str(paths[variant])).graph
                bns = sum(n.op_type == "BatchNormalization" for n in graph.node)
                left = absorbable_batchnorms(paths[variant])
                err = float(np.abs(ort_output(paths[variant], xs) - unfolded).max() / np.abs(unfolded).max())
                print(
                    f"  {variant:<19} {bns:>3} standalone BatchNormalization nodes, {len(left)} of them "
                    f"removable by an exact rule; outputs vs unfolded after: {err:.1e} relative"
                )
        for batch in result.batch_sizes:
            before = result.timing("before", batch)
            cells = []
            for variant in ("after", "after.fold-forward", "after.fold-padded"):
                t = result.timing(variant, batch)
                cells.append(
                    f"{variant} {t.p50_ms / before.p50_ms:.3f}x (means {t.mean_ms / before.mean_ms:.3f}x)"
                )
            print(
                f"  batch {batch:>3}: p50 before {before.p50_ms:8.3f} ms; ratio to before (p50): "
                + "; ".join(cells)
            )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.md").write_text(report.comparison_markdown(result))
            report.comparison_plot(result, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
