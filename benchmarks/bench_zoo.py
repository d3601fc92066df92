"""bnmove on models no one here wrote: timm, torchvision and HF transformers, one model per family.

For every BatchNorm-bearing model the libraries offer (``pretrained=False`` /
``weights=None``, random weights, small inputs, one thread, a time limit per
model) it checks the contract of issue 10 and prints one line per failure:

* every BN-activation adjacency is found: bnmove's pairs against a run-time
  reference count made here independently (hooks on BN modules, activation
  module hooks and activation function calls, linked by tensor identity);
* both placements convert with ``method="exact"`` without raising, and the
  converted model keeps the outputs (verification within tolerance);
* the converted model is the user's model: ``type(out) is type(model)``;
* inspect and convert agree (issue 19): every pair ``find_pairs`` reports
  movable and exact is moved by ``convert(..., method="exact")``, and every
  pair it leaves stays with the reason ``find_pairs`` gave;
* the converted model stands alone (issue 31): saved whole, it loads and
  computes the same outputs in a subprocess where ``import bnmove`` fails
  (checked in batches, one subprocess each), unless ``convert`` said it needs
  bnmove (a forward that dispatches between graphs: counted, not a failure);
  and wherever the original scripts, ``torch.jit.script`` of the converted
  model computes what the eager converted model computes, or refuses where a
  forward was regenerated (counted, not a failure; computing something else
  is one);
* a converted Hugging Face model's folder from ``bnmove.io.save_pretrained``
  loads with ``AutoModel….from_pretrained(folder, trust_remote_code=True)`` in
  that subprocess and computes the same (a model with a regenerated forward,
  which the folder cannot describe, is counted, not a failure).

Needs the libraries, which are not bnmove dependencies: run it from the
scratch environment ``../shared/tools/thirdparty-venv.sh`` builds.

    python benchmarks/bench_zoo.py [--library timm --library torchvision --library hf --library hf-default]
                                   [--limit 40] [--timeout 60] [--size 64]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import bnmove
import bnmove.io
from bnmove.analysis.batchnorms import is_frozen_batchnorm
from bnmove.analysis.patterns import module_activation_spec
from bnmove.core.forwards import generated_forward
from bnmove.io.pretrained import is_pretrained_model

torch.set_num_threads(1)

_ACT_FUNCTIONS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.leaky_relu, F.elu,
    F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.Tensor.relu, torch.Tensor.relu_,
    torch.Tensor.sigmoid, torch.Tensor.tanh, F.softplus, F.hardtanh,
}  # fmt: skip


def _is_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.batchnorm._BatchNorm) or type(m).__name__ == "FrozenBatchNorm2d"


class _Reference(TorchFunctionMode):
    """Counts BN-activation adjacencies at run time by tensor identity."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_out: dict[int, int] = {}  # id(tensor) -> id(bn)
        self.act_out: set[int] = set()
        self.pairs: set[tuple[int, str]] = set()
        self.keep: list[Any] = []
        self.depth = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.depth == 0 and args and isinstance(args[0], torch.Tensor):
            if func in _ACT_FUNCTIONS:
                self._act(args[0], out)
            elif out is args[0]:  # an in-place op (x += skip): the BN's output is no longer what it was
                self.bn_out.pop(id(out), None)
                self.act_out.discard(id(out))
        return out

    def _act(self, x: torch.Tensor, out: Any) -> None:
        if id(x) in self.bn_out:
            self.pairs.add((self.bn_out[id(x)], "before"))
        if isinstance(out, torch.Tensor):
            self.act_out.add(id(out))
            self.keep.append(out)

    def _leaf(self, m: nn.Module) -> bool:
        return _is_bn(m) or (not list(m.children()) and module_activation_spec(m) is not None)

    def pre(self, m: nn.Module, args: tuple[Any, ...]) -> None:
        if self.depth:  # inside a BN or an activation: its internals are not adjacencies
            self.depth += 1
            return
        if _is_bn(m) and args and isinstance(args[0], torch.Tensor) and id(args[0]) in self.act_out:
            self.pairs.add((id(m), "after"))
        if self._leaf(m):
            self.depth = 1

    def post(self, m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not self.depth:
            return
        self.depth -= 1
        if (
            self.depth
            or not isinstance(out, torch.Tensor)
            or not args
            or not isinstance(args[0], torch.Tensor)
        ):
            return
        if _is_bn(m):
            self.keep.append(out)
            # a fused norm+act module (timm's BatchNormAct2d): its own activation is a pair,
            # and what it returns is an activation's output
            if any(module_activation_spec(c) is not None for c in m.children()):
                self.pairs.add((id(m), "fused"))
                self.act_out.add(id(out))
            else:
                self.bn_out[id(out)] = id(m)
        else:
            self._act(args[0], out)


def reference_pairs(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    ref = _Reference()
    handles = [
        nn.modules.module.register_module_forward_pre_hook(ref.pre),
        nn.modules.module.register_module_forward_hook(ref.post),
    ]
    try:
        with torch.no_grad(), ref:
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return len(ref.pairs)


@dataclass
class Outcome:
    library: str
    name: str
    ok: bool = False
    found: int = 0
    reference: int = 0
    kept_class: bool = False
    converted: bool = False
    failures: list[str] = field(default_factory=list)
    #: pairs the exact method leaves in place, each with its reason (not failures)
    unmoved: list[str] = field(default_factory=list)
    #: modules whose forward was regenerated (graph moves), over both placements
    regenerated: int = 0
    #: pairs reported movable and exact that convert left, over both placements (must be 0)
    promised_left: int = 0
    seconds: float = 0.0
    #: converted models (one per placement) saved for the check without bnmove: (placement, folder)
    saved: list[tuple[str, str]] = field(default_factory=list)
    #: converted models checked without bnmove, and those that loaded and computed the same
    load_checked: int = 0
    loads: int = 0
    #: converted models that convert said need bnmove to load (a dispatching forward)
    need_bnmove: int = 0
    #: whether the original itself can be saved whole (parametrized modules and local hooks cannot)
    original_saves: bool = True
    #: whether the original scripts; converted models scripted (where it does), those that scripted
    #: alike, and those refused (a regenerated forward)
    original_scripts: bool = False
    script_checked: int = 0
    scripts: int = 0
    script_refused: int = 0
    #: Hugging Face models: save_pretrained folders bnmove wrote, to be loaded by from_pretrained
    #: without bnmove (placement, folder); those checked and loaded; those it could not describe
    hf_saved: list[tuple[str, str]] = field(default_factory=list)
    hf_checked: int = 0
    hf_loads: int = 0
    hf_refused: int = 0


#: run in a fresh interpreter: bnmove cannot be imported, the model libraries can
_LOAD_WITHOUT_BNMOVE = r"""
import json, sys
sys.modules["bnmove"] = None
import torch
torch.set_num_threads(1)
report = {}
for folder in json.load(open(sys.argv[1])):
    base = folder.removesuffix("/hf")  # beside a save_pretrained folder: its inputs and outputs
    try:
        if folder.endswith("/hf"):  # a folder bnmove.io.save_pretrained wrote: through transformers
            import transformers
            config = json.load(open(folder + "/config.json"))
            auto = getattr(transformers, sorted(config["auto_map"])[0])
            model = auto.from_pretrained(folder, trust_remote_code=True, local_files_only=True).eval()
        else:
            model = torch.load(folder + "/model.pt", weights_only=False).eval()
        inputs = torch.load(base + "/inputs.pt", weights_only=False)
        expected = torch.load(base + "/expected.pt", weights_only=False)
        with torch.no_grad():
            got = model(*inputs)
        want = [t for t in torch.utils._pytree.tree_leaves(expected) if isinstance(t, torch.Tensor)]
        have = [t for t in torch.utils._pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
        scale = max((float(t.abs().max()) for t in want if t.numel()), default=1.0)
        error = max((float((a - b).abs().max()) for a, b in zip(want, have) if a.numel()), default=0.0)
        same = len(want) == len(have) and error <= 1e-4 * max(scale, 1e-6)
        report[folder] = "ok" if same else f"outputs differ by {error:.3g}"
    except Exception as exc:
        report[folder] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ''}"
print(json.dumps(report))
"""


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _same(want: Any, got: Any, rtol: float = 1e-5) -> bool:
    a, b = _tensors(want), _tensors(got)
    scale = max((float(t.abs().max()) for t in a if t.numel()), default=1.0)
    return len(a) == len(b) and all(
        x.shape == y.shape and (not x.numel() or float((x - y).abs().max()) <= rtol * max(scale, 1e-6))
        for x, y in zip(a, b, strict=False)
    )


def _save_converted(model: nn.Module, inputs: tuple[Any, ...], root: Path, whole: bool = True) -> str:
    """Saved whole (``model.pt``), or as a save_pretrained folder (``hf/``), with inputs and outputs."""
    folder = Path(tempfile.mkdtemp(dir=root))
    with torch.no_grad():
        expected = model.eval()(*inputs)
    if whole:
        torch.save(model, folder / "model.pt")
    else:
        bnmove.io.save_pretrained(model, folder / "hf")
    torch.save(inputs, folder / "inputs.pt")
    torch.save(expected, folder / "expected.pt")
    return str(folder) if whole else str(folder / "hf")


def load_without_bnmove(outcomes: list[Outcome], root: Path) -> None:
    """Load every saved converted model in one subprocess where ``import bnmove`` fails."""
    folders = [folder for o in outcomes for _, folder in o.saved + o.hf_saved]
    if not folders:
        return
    listing = root / "folders.json"
    listing.write_text(json.dumps(folders))
    done = subprocess.run(
        [sys.executable, "-c", _LOAD_WITHOUT_BNMOVE, str(listing)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_MODULES_CACHE": str(root / "hf-modules")},  # the folders' code goes there
    )
    report = json.loads(done.stdout.splitlines()[-1]) if done.returncode == 0 else {}
    failed = f"the loading process failed: {done.stderr.strip()[-200:]}"
    for outcome in outcomes:
        outcome.load_checked += len(outcome.saved)
        outcome.loads += _tally(report, failed, outcome.saved, "does not load without bnmove", outcome)
        outcome.hf_checked += len(outcome.hf_saved)
        outcome.hf_loads += _tally(
            report, failed, outcome.hf_saved, "its save_pretrained folder does not load", outcome
        )
        for _, folder in outcome.saved + outcome.hf_saved:
            shutil.rmtree(Path(folder).parent if folder.endswith("/hf") else folder, ignore_errors=True)
        outcome.saved.clear()
        outcome.hf_saved.clear()
        outcome.ok = not outcome.failures


def _tally(
    report: dict[str, str], failed: str, saved: list[tuple[str, str]], says: str, outcome: Outcome
) -> int:
    """How many of ``saved`` loaded and computed the same; the others become failures."""
    verdicts = [(placement, report.get(folder, failed)) for placement, folder in saved]
    outcome.failures.extend(f"{placement}: {says} ({v})" for placement, v in verdicts if v != "ok")
    return sum(v == "ok" for _, v in verdicts)


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def _scripts(model: nn.Module, inputs: tuple[Any, ...]) -> bool | None:
    """Whether the scripted model computes the same; None when TorchScript refuses it."""
    with torch.no_grad():
        want = model(*inputs)  # before scripting, which may put a module's scriptable twin in its place
    try:
        scripted = torch.jit.script(model)
    except Exception:
        return None
    with torch.no_grad():
        return _same(want, scripted(*inputs))


def check(
    library: str,
    name: str,
    build: Callable[[], tuple[nn.Module, tuple[Any, ...]]],
    limit: int,
    saves: Path,
) -> Outcome:
    outcome = Outcome(library, name)
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit)
    try:
        model, inputs = build()
        model.eval()
        outcome.reference = reference_pairs(model, inputs)
        outcome.original_scripts = bool(_scripts(model, inputs))
        try:
            torch.save(model, io.BytesIO())
        except Exception:
            outcome.original_saves = False  # the converted model is no worse: not checked
        pairs = [p for p in bnmove.find_pairs(model, inputs) if p.placement]
        outcome.found = len(pairs)
        if outcome.found < outcome.reference:
            outcome.failures.append(f"found {outcome.found} of {outcome.reference} adjacencies")
        kept = True
        for placement in ("before", "after"):
            try:
                result = bnmove.convert(model, placement, method="exact", example_inputs=inputs)
            except bnmove.BnmoveError as exc:
                outcome.failures.append(f"{placement}: {exc}")
                kept = False
                continue
            kept &= type(result.model) is type(model)
            outcome.regenerated += sum(generated_forward(m) is not None for m in result.model.modules())
            if any("needs bnmove installed to load" in w for w in result.warnings):
                outcome.need_bnmove += 1
            elif outcome.original_saves:
                outcome.saved.append((placement, _save_converted(result.model, inputs, saves)))
            if is_pretrained_model(result.model) and result.moved:
                try:
                    outcome.hf_saved.append(
                        (placement, _save_converted(result.model, inputs, saves, whole=False))
                    )
                except bnmove.BnmoveError:
                    outcome.hf_refused += 1  # a change a config cannot describe, said in one line
            if outcome.original_scripts:
                outcome.script_checked += 1
                regenerated = any(generated_forward(m) is not None for m in result.model.modules())
                scripts = _scripts(result.model, inputs)
                if scripts:
                    outcome.scripts += 1
                elif scripts is None and regenerated:
                    outcome.script_refused += 1
                else:
                    outcome.failures.append(
                        f"{placement}: the original scripts, the converted model "
                        + ("computes something else scripted" if scripts is False else "does not")
                    )
            if result.verification is not None and not result.verification.within_tolerance:
                outcome.failures.append(
                    f"{placement}: outputs changed ({result.verification.max_rel_error:.2g})"
                )
            stuck = [
                m for m in result.moves if not m.moved and m.pair.placement and m.pair.placement != placement
            ]
            broken = [m for m in stuck if m.pair.exact or (not m.pair.movable and m.reason != m.pair.reason)]
            outcome.promised_left += len(broken)
            outcome.failures.extend(
                f"{placement}: inspect said {m.pair.bn} moves, convert left it ({m.reason})"
                for m in broken[:3]
            )
            outcome.unmoved.extend(f"{placement}: {m.pair.bn}: {m.reason}" for m in stuck)
            if any(not m.reason for m in stuck):
                outcome.failures.append(f"{placement}: a pair stayed without a reason")
        outcome.kept_class = kept
        outcome.converted = kept and not any(f.startswith(("before:", "after:")) for f in outcome.failures)
    except _Timeout:
        outcome.failures.append(f"time limit {limit}s")
    except Exception as exc:
        outcome.failures.append(
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:150] if str(exc).strip() else ''}"
        )
        if args_debug:
            traceback.print_exc()
    finally:
        signal.alarm(0)
    outcome.seconds = time.perf_counter() - start
    outcome.ok = not outcome.failures
    return outcome


def _has_bn(model: nn.Module) -> bool:
    return any(_is_bn(m) or is_frozen_batchnorm(m) for m in model.modules())


def _parameters_on_meta(build: Callable[[], nn.Module]) -> float:
    """A model's parameter count, built on the meta device (no memory, no init): inf if it does not build."""
    try:
        with torch.device("meta"):
            return float(sum(p.numel() for p in build().parameters()))
    except Exception:
        return float("inf")


def timm_models(size: int) -> Iterator[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]]:
    """One model per timm architecture family (``timm.list_modules()``): its smallest variant."""
    import timm

    for module in sorted(timm.list_modules()):
        # timm's ``test_*`` models are tiny configurations for its own tests, not variants users build
        names = [n for n in timm.list_models(module=module) if not n.startswith("test_")]
        if not names:
            continue
        name = min(
            names,
            key=lambda n: _parameters_on_meta(
                lambda n=n: timm.create_model(n, pretrained=False, num_classes=10)
            ),
        )

        def build(name: str = name) -> tuple[nn.Module, tuple[Any, ...]]:
            model = timm.create_model(name, pretrained=False, num_classes=10).eval()
            cfg = getattr(model, "pretrained_cfg", {}) or {}
            full = tuple(cfg.get("input_size", (3, 224, 224)))
            small = (torch.randn(1, 3, size, size),)
            if not cfg.get("fixed_input_size", False):
                try:  # the small input when the model takes it, else the model's own size
                    with torch.no_grad():
                        model(*small)
                    return model, small
                except Exception:
                    pass
            return model, (torch.randn(1, *full),)

        yield f"{module}:{name}", build


def torchvision_models(size: int) -> Iterator[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]]:
    """Classification, segmentation and video models whole; detection models by their backbone
    (their heads need torchvision's compiled ops); a ResNet with FrozenBatchNorm2d, as detection
    backbones are built when loaded with weights."""
    import torchvision.models as tvm
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name in sorted(tvm.list_models(module=tvm)):

        def build(name: str = name) -> tuple[nn.Module, tuple[Any, ...]]:
            needs = 299 if "inception" in name else 224 if "maxvit" in name else size
            return tvm.get_model(name, weights=None), (torch.randn(1, 3, needs, needs),)

        yield name, build
    for name in sorted(tvm.list_models(module=tvm.segmentation)):

        def build_seg(name: str = name) -> tuple[nn.Module, tuple[Any, ...]]:
            model = tvm.get_model(name, weights=None, weights_backbone=None)
            return model, (torch.randn(1, 3, size, size),)

        yield name, build_seg
    for name in sorted(tvm.list_models(module=tvm.video)):

        def build_video(name: str = name) -> tuple[nn.Module, tuple[Any, ...]]:
            model = tvm.get_model(name, weights=None)
            frames = 16 if "mvit" in name or "s3d" in name else 4
            side = 224 if "mvit" in name or "s3d" in name else size
            return model, (torch.randn(1, 3, frames, side, side),)

        yield f"video/{name}", build_video
    for name in sorted(tvm.list_models(module=tvm.detection)):

        def build_det(name: str = name) -> tuple[nn.Module, tuple[Any, ...]]:
            model = tvm.get_model(name, weights=None, weights_backbone=None)
            return model.backbone, (torch.randn(1, 3, size, size),)

        yield f"detection/{name}.backbone", build_det

    def frozen() -> tuple[nn.Module, tuple[Any, ...]]:
        model = tvm.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
        gen = torch.Generator().manual_seed(0)
        for m in model.modules():
            if isinstance(m, FrozenBatchNorm2d):
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.running_mean.normal_(0, 0.2, generator=gen)
        return model, (torch.randn(1, 3, size, size),)

    yield "resnet50(norm_layer=FrozenBatchNorm2d)", frozen


def _hf_inputs(model: Any, config: Any, size: int) -> tuple[Any, ...] | None:
    """An input for an HF model by its main input name; None where bnmove's bench has no recipe."""
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        side = getattr(config, "image_size", size)
        side = side[0] if isinstance(side, (list, tuple)) else side
        return (torch.randn(1, getattr(config, "num_channels", 3), side, side),)
    if name == "input_values":
        return (torch.randn(1, 16000),)
    if name == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", 80)
        return (torch.randn(1, 200, bins),)
    if name == "input_ids":
        return (torch.randint(0, min(getattr(config, "vocab_size", 100), 100), (1, 16)),)
    return None


#: default configs above this many parameters (speech-LLMs, SeamlessM4T) are too large for this bench
HF_MAX_MILLIONS = 150


def hf_default_models(size: int) -> Iterator[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]]:
    """Every HF transformers base model class (``MODEL_MAPPING``) that has a BatchNorm when built from
    its default config (checked on the meta device first)."""
    import transformers as T
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    for model_type in sorted(MODEL_MAPPING_NAMES):
        class_name = MODEL_MAPPING_NAMES[model_type]
        if not isinstance(class_name, str):
            class_name = class_name[0]
        try:
            config_cls = T.CONFIG_MAPPING[model_type]
            model_cls = getattr(T, class_name)
        except Exception:
            continue
        try:
            with torch.device("meta"):
                meta = model_cls(config_cls())
        except Exception:
            continue
        if not _has_bn(meta):
            continue
        size_m = sum(p.numel() for p in meta.parameters()) / 1e6
        if size_m > HF_MAX_MILLIONS:
            print(
                f"  skip hf-default/{model_type}: {size_m:.0f}M parameters at its default config", flush=True
            )
            continue

        def build(
            config_cls: Any = config_cls, model_cls: Any = model_cls
        ) -> tuple[nn.Module, tuple[Any, ...]]:
            config = config_cls()
            model = model_cls(config).eval()
            inputs = _hf_inputs(model, config, size)
            if inputs is None:
                raise ValueError(f"no input recipe for {model.main_input_name}")
            return model, inputs

        yield f"{model_type}:{class_name}", build


def hf_models(size: int) -> Iterator[tuple[str, Callable[[], tuple[nn.Module, tuple[Any, ...]]]]]:
    import transformers as T

    small = {"num_channels": 3}
    specs: list[tuple[str, Any, Any, dict[str, Any]]] = [
        ("resnet", T.ResNetConfig, T.ResNetModel, {"depths": [1, 1, 1, 1]}),
        ("regnet", T.RegNetConfig, T.RegNetModel, {"depths": [1, 1, 1, 1]}),
        ("bit", T.BitConfig, T.BitModel, {"depths": [1, 1, 1, 1]}),
        ("mobilenet_v1", T.MobileNetV1Config, T.MobileNetV1Model, {}),
        ("mobilenet_v2", T.MobileNetV2Config, T.MobileNetV2Model, {}),
        ("efficientnet", T.EfficientNetConfig, T.EfficientNetModel, {"image_size": size}),
        ("levit", T.LevitConfig, T.LevitModel, {"image_size": 224}),
        ("mobilevit", T.MobileViTConfig, T.MobileViTModel, {"image_size": size}),
        ("mobilevitv2", T.MobileViTV2Config, T.MobileViTV2Model, {"image_size": size}),
    ]
    for name, config_cls, model_cls, extra in specs:

        def build(
            config_cls: Any = config_cls, model_cls: Any = model_cls, extra: Any = extra
        ) -> tuple[nn.Module, tuple[Any, ...]]:
            config = config_cls(**{**small, **extra})
            model = model_cls(config)
            side = extra.get("image_size", size)
            return model, (torch.randn(1, 3, side, side),)

        yield name, build

    # speech: the conformer's convolution module (BN inside, optional attention mask tested in forward)
    def conformer() -> tuple[nn.Module, tuple[Any, ...]]:
        config = T.Wav2Vec2ConformerConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), conv_depthwise_kernel_size=3,
        )  # fmt: skip
        return T.Wav2Vec2ConformerModel(config), (torch.randn(1, 1600),)

    yield "wav2vec2_conformer", conformer


LIBRARIES = {
    "timm": timm_models,
    "torchvision": torchvision_models,
    "hf": hf_models,
    "hf-default": hf_default_models,
}
args_debug = False


def main() -> None:
    global args_debug
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", action="append", choices=sorted(LIBRARIES))
    parser.add_argument("--limit", type=int, default=0, help="at most this many models per library (0: all)")
    parser.add_argument("--timeout", type=int, default=90, help="seconds per model")
    parser.add_argument("--size", type=int, default=64, help="input side for models without a fixed size")
    parser.add_argument("--only", default="", help="substring of the model names to run")
    parser.add_argument("--debug", action="store_true")
    args = parser.parse_args()
    args_debug = args.debug
    outcomes: list[Outcome] = []
    started = time.perf_counter()
    saves = Path(tempfile.mkdtemp(prefix="bench-zoo-"))
    pending: list[Outcome] = []
    for library in args.library or list(LIBRARIES):
        count = 0
        for name, build in LIBRARIES[library](args.size):
            if args.only and args.only not in name:
                continue
            try:
                model, inputs = build()
            except Exception as exc:
                print(f"  skip {library}/{name}: cannot build ({type(exc).__name__})", flush=True)
                continue
            if not _has_bn(model):
                continue
            try:
                with torch.no_grad():
                    model.eval()(*inputs)
            except Exception as exc:
                print(
                    f"  skip {library}/{name}: does not run on the bench's input ({type(exc).__name__})",
                    flush=True,
                )
                continue
            del model, inputs
            outcome = check(library, name, build, args.timeout, saves)
            outcomes.append(outcome)
            pending.append(outcome)
            if len(pending) >= 15:  # one subprocess (one torch import) per batch
                load_without_bnmove(pending, saves)
                pending.clear()
            mark = "ok  " if outcome.ok else "FAIL"
            print(
                f"{mark} {library}/{name}: pairs {outcome.found}/{outcome.reference} ref, "
                f"class {'kept' if outcome.kept_class else 'LOST'}, "
                f"{len(outcome.unmoved)} left in place with a reason, {outcome.seconds:.1f}s"
                + (f"\n       ~ e.g. {outcome.unmoved[0]}" if outcome.unmoved else "")
                + ("".join(f"\n       - {f}" for f in outcome.failures)),
                flush=True,
            )
            count += 1
            if args.limit and count >= args.limit:
                break
    load_without_bnmove(pending, saves)
    for outcome in outcomes:
        for failure in outcome.failures:
            if "without bnmove" in failure or "save_pretrained folder" in failure:
                print(f"FAIL {outcome.library}/{outcome.name}: {failure}")
    print()
    for library in sorted({o.library for o in outcomes}):
        group = [o for o in outcomes if o.library == library]
        passed = sum(o.ok for o in group)
        found = sum(min(o.found, o.reference) for o in group)
        ref = sum(o.reference for o in group)
        kept = sum(o.kept_class for o in group)
        unmoved = sum(len(o.unmoved) for o in group)
        regenerated = sum(o.regenerated > 0 for o in group)
        promised = sum(o.promised_left for o in group)
        unsaved = sum(not o.original_saves for o in group)
        loads = (
            f"{sum(o.loads for o in group)}/{sum(o.load_checked for o in group) + sum(o.need_bnmove for o in group)}"
            f" ({sum(o.need_bnmove for o in group)} said to need bnmove"
            + (f"; {unsaved} models whose original cannot be saved whole, not counted" if unsaved else "")
            + ")"
        )
        scripts = (
            f"{sum(o.scripts for o in group)}/{sum(o.script_checked for o in group)}"
            f" ({sum(o.script_refused for o in group)} refused: a regenerated forward)"
        )
        hf = (
            f", save_pretrained folders that from_pretrained loads converted without bnmove "
            f"{sum(o.hf_loads for o in group)}/{sum(o.hf_checked for o in group)}"
            f" ({sum(o.hf_refused for o in group)} not written: a change a config cannot describe)"
            if any(o.hf_checked or o.hf_refused for o in group)
            else ""
        )
        print(
            f"{library}: {passed}/{len(group)} pass ({100 * passed / len(group):.0f}%), "
            f"adjacencies found {found}/{ref} ({100 * found / max(ref, 1):.1f}%), "
            f"class kept {kept}/{len(group)}, {unmoved} pair moves left in place by the exact method "
            "(each with its reason), "
            f"{regenerated} models with a regenerated forward somewhere (the rest: module surgery only), "
            f"{promised} pairs reported movable that convert left; "
            f"converted models that load without bnmove {loads}, "
            f"that script where the original scripts {scripts}{hf}"
        )
    minutes = (time.perf_counter() - started) / 60
    shutil.rmtree(saves, ignore_errors=True)
    print(f"\n{len(outcomes)} models checked in {minutes:.1f} min (torch {torch.__version__}, one thread)")
    # group reasons that differ only by module names
    reasons = Counter(
        u.split(": ", 2)[-1].split(" (")[0].split(" feeds ")[0] for o in outcomes for u in o.unmoved
    )
    if reasons:
        print("\nwhy the exact method leaves pairs in place (most common):")
        for reason, count in reasons.most_common(6):
            print(f"  {count:5d}  {reason}")


if __name__ == "__main__":
    main()
