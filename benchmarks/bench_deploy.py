"""Deployment cost of BN placement: the before-variant against every exact form of the after-variant,
float and INT8, on onnxruntime's CPU provider.

The model's BNs get trained-like statistics first, and after the exact conversion the moved BNs are
randomised again (exact conversion leaves the identity there; a deployment figure must not profit
from that). The after-variant is exported unfolded, with ``--fold-forward``, with
``--fold-padded`` and with ``--fold-auto`` (the cheapest of those, chosen by bnmove's own timing);
the before-variant and the auto form also as INT8 (onnxruntime's static quantization on random
calibration inputs). For each file it counts the ``BatchNormalization`` nodes left and how many an
exact rule could still remove, read from the ONNX graph itself: every consumer, past pooling,
flatten and reshape, is a Conv/Gemm/MatMul, or a ``Mul`` by a sigmoid gate computed from the same
tensor whose product a Conv reads (the gate fold). Then it times all files side by side
(interleaved) and prints each one's p50 latency ratio to the before-variant.

    python benchmarks/bench_deploy.py                                    # small Bottleneck ResNet
    python benchmarks/bench_deploy.py --model tv_mobilenet_v2 --model tv_resnet50 \
        --model tv_efficientnet_b0 --input-size 160                    # torchvision (scratch venv)
    python benchmarks/bench_deploy.py --model resnet50 --provider cuda --out docs/benchmarks  # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bnmove
from bnmove import Conversion, compare, convert, export_variants, report
from bnmove.deploy import ExportOptions
from bnmove.sample_models import SAMPLES, bottleneck_resnet, mobilenet, resnet50
from samples.make_models import build_sample


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        try:
            import torchvision
        except ImportError:
            sys.exit(f"{name} needs torchvision: run from the venv ../shared/tools/thirdparty-venv.sh builds")
        return torchvision.models.get_model(name, weights=None)

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "bottleneck_resnet": bottleneck_resnet,
    "resnet50": resnet50,
    "mobilenet": mobilenet,
    **{k: v[0] for k, v in SAMPLES.items()},
    **{
        f"tv_{n}": _torchvision(n)
        for n in ("mobilenet_v2", "resnet50", "efficientnet_b0", "mobilenet_v3_small")
    },
}

#: ops a per-channel affine map passes on its way to the layer that takes it
_PASS = {
    "GlobalAveragePool", "AveragePool", "MaxPool", "Flatten", "Reshape", "Identity", "ReduceMean",
    "QuantizeLinear", "DequantizeLinear",  # an INT8 graph: the BN stays float between them
}  # fmt: skip
_LAYERS = {"Gemm", "MatMul", "Conv"}
_GATES = {"Sigmoid", "HardSigmoid"}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _feeds(tensor: str, wanted: str, producers: dict[str, onnx.NodeProto]) -> bool:
    """``wanted`` is computed from ``tensor`` (walking producers back)."""
    stack, seen = [wanted], set()
    while stack:
        name = stack.pop()
        if name == tensor:
            return True
        node = producers.get(name)
        if node is None or name in seen:
            continue
        seen.add(name)
        stack.extend(node.input)
    return False


def _removable(
    tensor: str, consumers: dict[str, list[onnx.NodeProto]], producers: dict[str, onnx.NodeProto]
) -> bool:
    """Every use of ``tensor``, past pooling and reshapes, is a layer that takes a fold, or a product
    with a sigmoid gate computed from ``tensor`` that a Conv reads (the gate fold)."""
    users = consumers.get(tensor, [])
    if not users:
        return False
    for user in users:
        if user.op_type in _LAYERS and user.input[0] == tensor:
            continue
        if user.op_type in _PASS and _removable(user.output[0], consumers, producers):
            continue
        if user.op_type == "Mul":
            other = next((i for i in user.input if i != tensor), None)
            gate = producers.get(other or "")
            readers = consumers.get(user.output[0], [])
            if (
                gate is not None
                and gate.op_type in _GATES
                and _feeds(tensor, other or "", producers)
                and len(readers) == 1
                and readers[0].op_type == "Conv"
            ):
                continue
        return False
    return True


def batchnorms(path: Path) -> tuple[int, int]:
    """``BatchNormalization`` nodes in the file, and how many an exact rule could still remove."""
    graph = onnx.load(str(path)).graph
    consumers, producers = _consumers(graph), _producers(graph)
    bns = [n for n in graph.node if n.op_type == "BatchNormalization"]
    return len(bns), sum(_removable(n.output[0], consumers, producers) for n in bns)


def trained_like(model: nn.Module, seed: int = 0, only: set[nn.Module] | None = None) -> int:
    """Give BNs trained-like affine parameters and statistics (all of them, or those in ``only``)."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    with torch.no_grad():
        for bn in model.modules():
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
                continue
            if only is not None and bn not in only:
                continue
            n = bn.num_features
            if bn.affine:
                bn.weight.copy_(torch.rand(n, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            bn.running_var.copy_(torch.rand(n, generator=g) + 0.5)  # type: ignore[union-attr]
            count += 1
    return count


def moved_bns(conversion: Conversion) -> set[nn.Module]:
    return {conversion.model.get_submodule(m.moved_to or m.pair.bn) for m in conversion.moved}


def ort_output(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


FORMS = ("after", "after.fold-forward", "after.fold-padded", "after.fold-auto")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", choices=sorted(MODELS), help="repeatable")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--input-size", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--calibration-samples", type=int, default=32, help="INT8 calibration (0: no INT8)")
    parser.add_argument("--out", type=Path, help="also write <model>.md and <model>.png here")
    args = parser.parse_args()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    torch.set_num_threads(2)
    print(
        f"onnxruntime {ort.__version__}, torch {torch.__version__}; trained-like BN statistics, moved BNs "
        "randomised again after the exact conversion"
    )
    failures = []
    for name in args.model or ["bottleneck_resnet"]:
        torch.manual_seed(0)
        model = build_sample(name) if name in SAMPLES else MODELS[name]().eval()
        trained_like(model)
        x = torch.randn(2, 3, args.input_size, args.input_size)
        after = convert(model, "after", method="exact", example_inputs=(x,))
        randomised = trained_like(after.model, seed=1, only=moved_bns(after))
        int8 = args.calibration_samples > 0
        calibration = (
            bnmove.Calibration(torch.randn(args.calibration_samples, *x.shape[1:])) if int8 else None
        )
        with tempfile.TemporaryDirectory() as tmp:
            paths: dict[str, Path] = {}
            manifests: dict[str, dict] = {}
            for variant, source, fold, quantize in (
                ("before", model, "none", int8),
                ("after", after.model, "none", False),
                ("after.fold-forward", after.model, "forward", False),
                ("after.fold-padded", after.model, "padded", False),
                ("after.fold-auto", after.model, "auto", int8),
            ):
                options = ExportOptions(fold=fold, quantize="int8" if quantize else None)
                out = export_variants(
                    source, (x,), Path(tmp) / variant, ["original"], stem=name, options=options,
                    calibration=calibration if quantize else None,
                )  # fmt: skip
                paths[variant] = out["original"]
                if quantize:
                    paths[f"{variant}.int8"] = out["original.int8"]
                manifests[variant] = json.loads((Path(tmp) / variant / "manifest.json").read_text())
            xs = x.numpy()
            unfolded = ort_output(paths["after"], xs)
            result = compare(
                paths, provider=args.provider, batch_sizes=sizes, iterations=args.iterations, warmup=5,
                reference="before",
            )  # fmt: skip
            print(f"\n{name} at {args.input_size}px: {result.provider} on {result.device}")
            auto = manifests["after.fold-auto"]["variants"]["original"]["fold_auto"]
            print(f"  {randomised} moved BNs randomised in the after-variant")
            print(f"  --fold-auto (timed {auto['timed']}) kept {auto['form']!r}: {auto['reason']}")
            for variant in ("before", "after.fold-auto"):
                entry = manifests[variant]["variants"]["original"].get("int8")
                if entry:
                    print(
                        f"  {variant}.int8 against its float file on {entry['held_out_samples']} held-out inputs: "
                        f"top-1 agreement {entry['top1_agreement_with_float']:.1%}, max relative error "
                        f"{entry['max_rel_error_vs_float']:.3f}; {len(entry['float_nodes'])} nodes left in float"
                    )
            for variant in paths:
                bns, removable = batchnorms(paths[variant])
                line = f"  {variant:<24} {bns:>3} BatchNormalization nodes, {removable} removable by an exact rule"
                if variant in FORMS:
                    got = ort_output(paths[variant], xs)
                    line += f"; outputs vs unfolded after {np.abs(got - unfolded).max() / np.abs(unfolded).max():.1e}"
                print(line)
                if removable and variant == "after.fold-padded":  # every exact rule applied
                    failures.append(f"{name} {variant}: {removable} removable BNs left")
        for batch in result.batch_sizes:
            before = result.timing("before", batch)
            cells = [f"{v} {result.timing(v, batch).p50_ms / before.p50_ms:.3f}x" for v in FORMS]
            if int8:
                b8 = result.timing("before.int8", batch).p50_ms
                cells.append(
                    f"INT8 after.fold-auto {result.timing('after.fold-auto.int8', batch).p50_ms / b8:.3f}x"
                )
            print(
                f"  batch {batch:>3}: p50 before {before.p50_ms:8.3f} ms; after/before (p50): "
                + "; ".join(cells)
            )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"{name}.md").write_text(report.comparison_markdown(result))
            report.comparison_plot(result, args.out / f"{name}.png")
    print(
        "\n" + ("FAIL: " + "; ".join(failures) if failures else "0 removable BNs left in every folded form")
    )


if __name__ == "__main__":
    main()
