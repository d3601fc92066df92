"""Deployment cost of BN placement: before-variant vs after-variant (with --fold-forward).

Exports a ResNet-style model's ``before`` and ``after`` variants (the latter with
BNs folded forward where exact), checks in the exported ONNX graph itself that
no BatchNormalization is left whose next layer could have absorbed it, then
times both side by side (interleaved) under onnxruntime and prints the
after/before latency ratio per batch size.

    python benchmarks/bench_deploy.py                       # small Bottleneck ResNet on CPU
    python benchmarks/bench_deploy.py --model resnet50 --model mobilenet --provider cuda \\
        --input-size 224 --out docs/benchmarks              # the GPU report (needs a GPU)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bnmove import compare, export_variants, report
from bnmove.sample_models import SAMPLES, bottleneck_resnet, mobilenet, resnet50
from samples.make_models import build_sample

MODELS = {
    "bottleneck_resnet": bottleneck_resnet,
    "resnet50": resnet50,
    "mobilenet": mobilenet,
    **{k: v[0] for k, v in SAMPLES.items()},
}


def absorbable_batchnorms(path: Path) -> list[str]:
    """BatchNormalization nodes whose only consumer is a Gemm/MatMul or an unpadded Conv."""
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
        pads = next((list(a.ints) for a in user.attribute if a.name == "pads"), [])
        if user.op_type in ("Gemm", "MatMul") or (user.op_type == "Conv" and not any(pads)):
            left.append(node.name)
    return left


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
    for name in args.model or ["bottleneck_resnet"]:
        torch.manual_seed(0)
        model = build_sample(name) if name in SAMPLES else MODELS[name]().eval()
        x = torch.randn(2, 3, args.input_size, args.input_size)
        with tempfile.TemporaryDirectory() as tmp:
            paths = export_variants(model, (x,), tmp, ["before", "after"], fold_forward_bns=True, stem=name)
            left = absorbable_batchnorms(paths["after"])
            bns = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(paths["after"])).graph.node)
            result = compare(
                paths,
                provider=args.provider,
                batch_sizes=sizes,
                iterations=args.iterations,
                warmup=5,
                reference="before",
            )
        print(f"\n{name}: {result.provider} on {result.device}, onnxruntime {result.onnxruntime}")
        print(
            f"  after-variant (--fold-forward): {bns} standalone BatchNormalization nodes; "
            f"{len(left)} of them feed a layer that could absorb them {left or ''}"
        )
        for batch in result.batch_sizes:
            before, after = result.timing("before", batch), result.timing("after", batch)
            print(
                f"  batch {batch:>3}: p50 before {before.p50_ms:8.3f} ms  after {after.p50_ms:8.3f} ms  "
                f"ratio after/before {after.p50_ms / before.p50_ms:.2f}x (p50; means {after.mean_ms / before.mean_ms:.2f}x)"
            )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.md").write_text(report.comparison_markdown(result))
            report.comparison_plot(result, args.out / f"{name}.png")


if __name__ == "__main__":
    main()
