"""Does a converted model keep working with its library's own tools? Tried as a new user would.

For a few models from timm, torchvision, HF transformers, segmentation_models_pytorch,
efficientnet_pytorch and pytorchcv (random weights, nothing downloaded), convert to
"after" (and back to "before" where that is exact) and use the library's own API on the
result: timm's ``forward_features``/``reset_classifier``/``pretrained_cfg``, HF's
``output_hidden_states`` and ``save_pretrained``/``from_pretrained``, smp's encoder
properties, ``torch.jit.script`` and ``torch.export``. One line per check.

Needs the libraries (not bnmove dependencies): run it from the scratch environment
``../shared/tools/thirdparty-venv.sh`` builds.

    python benchmarks/try_library_tools.py
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import bnmove

torch.set_num_threads(1)
results: list[tuple[str, bool, str]] = []


def check(name: str, fn: Callable[[], Any]) -> None:
    try:
        detail = fn()
        results.append((name, True, str(detail or "")))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:140] if str(exc).strip() else ""
        results.append((name, False, f"{type(exc).__name__}: {first}"))
    ok, detail = results[-1][1], results[-1][2]
    print(f"{'ok  ' if ok else 'FAIL'} {name}" + (f": {detail}" if detail else ""), flush=True)


def close(a: torch.Tensor, b: torch.Tensor) -> str:
    diff = float((a - b).abs().max())
    err = diff / max(float(b.abs().max()), 1e-12)
    # as bnmove's verification: relative to the outputs, or rounding-sized where they are ~0
    assert err < 1e-4 or diff < 1e-6, f"relative difference {err:.2g} (absolute {diff:.2g})"
    return f"same outputs (relative {err:.1g}, absolute {diff:.1g})"


def converted(model: nn.Module, x: Any, placement: str = "after") -> nn.Module:
    result = bnmove.convert(model.eval(), placement, example_inputs=(x,))
    assert type(result.model) is type(model), f"class {type(result.model).__name__}"
    return result.model.eval()


def timm_checks() -> None:
    for name in ("resnet50", "efficientnet_b0", "mobilenetv3_small_100", "regnety_002", "dla34"):
        timm_model_checks(name)


def timm_model_checks(name: str) -> None:
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    out = converted(model, x)
    with torch.no_grad():
        check(
            f"timm {name}: forward_features",
            lambda: close(out.forward_features(x), model.forward_features(x)),
        )
    check(f"timm {name}: pretrained_cfg", lambda: out.pretrained_cfg == model.pretrained_cfg or 1 / 0)

    def reset() -> str:
        again = converted(model, x)
        again.reset_classifier(5)
        return f"head now {tuple(again(x).shape)}"

    check(f"timm {name}: reset_classifier(5)", reset)
    check(f"timm {name}: torch.export", lambda: torch.export.export(out, (x,)) and "exported")


def torchvision_checks() -> None:
    import torchvision.models as tvm

    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    out = converted(model, x)
    check("torchvision resnet18: model.fc", lambda: isinstance(out.fc, nn.Linear) or 1 / 0)
    with torch.no_grad():
        check("torchvision resnet18: outputs", lambda: close(out(x), model(x)))
        check("torchvision resnet18: torch.jit.script", lambda: scripted_alike(out, x))
        mobile = tvm.mobilenet_v3_small(weights=None).eval()
        out2 = converted(mobile, x)
        check("torchvision mobilenet_v3_small: torch.jit.script", lambda: scripted_alike(out2, x))


def scripted_alike(model: nn.Module, x: torch.Tensor) -> str:
    """``torch.jit.script`` of the model computes what the eager model computed before scripting."""
    want = model(x)
    return "scripted, " + close(torch.jit.script(model)(x), want)


def hf_checks() -> None:
    import transformers as T

    config = T.ResNetConfig(depths=[1, 1, 1, 1])
    model = T.ResNetModel(config).eval()
    x = torch.randn(1, 3, 64, 64)
    out = converted(model, x)
    with torch.no_grad():
        want = model(x, output_hidden_states=True)
        got = out(x, output_hidden_states=True)
    check(
        "HF ResNetModel: output_hidden_states",
        lambda: (
            f"{len(got.hidden_states)} hidden states"
            if len(got.hidden_states) == len(want.hidden_states)
            else 1 / 0
        ),
    )
    check("HF ResNetModel: last_hidden_state", lambda: close(got.last_hidden_state, want.last_hidden_state))
    check(
        "HF ResNetModel: config",
        lambda: (out.config is not None and out.config.depths == [1, 1, 1, 1]) or 1 / 0,
    )

    def save() -> str:
        with tempfile.TemporaryDirectory() as tmp:
            out.save_pretrained(tmp)
            return "saved " + ", ".join(sorted(p for p in __import__("os").listdir(tmp)))

    check("HF ResNetModel: save_pretrained", save)
    check(
        "HF ResNetModel: convert says what from_pretrained gives back",
        lambda: next(
            w for w in bnmove.convert(model, "after", example_inputs=(x,)).warnings if "from_pretrained" in w
        )[:60],
    )


def smp_checks() -> None:
    import segmentation_models_pytorch as smp

    model = smp.Unet("resnet18", encoder_weights=None, classes=2).eval()
    x = torch.randn(1, 3, 64, 64)
    out = converted(model, x)
    check("smp Unet: encoder.output_stride", lambda: f"output_stride {out.encoder.output_stride}")
    with torch.no_grad():
        check("smp Unet: outputs", lambda: close(out(x), model(x)))


def efficientnet_pytorch_checks() -> None:
    from efficientnet_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-b0").eval()
    x = torch.randn(1, 3, 64, 64)
    out = converted(model, x)
    with torch.no_grad():
        check(
            "efficientnet_pytorch b0: extract_features",
            lambda: close(out.extract_features(x), model.extract_features(x)),
        )


def pytorchcv_checks() -> None:
    from pytorchcv.model_provider import get_model

    model = get_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)  # its final pooling is fixed to 7x7
    out = converted(model, x)
    with torch.no_grad():
        check("pytorchcv resnet18: outputs", lambda: close(out(x), model(x)))


def main() -> None:
    for group in (
        timm_checks,
        torchvision_checks,
        hf_checks,
        smp_checks,
        efficientnet_pytorch_checks,
        pytorchcv_checks,
    ):
        try:
            group()
        except Exception as exc:
            results.append((group.__name__, False, f"{type(exc).__name__}: {exc}"))
            print(f"FAIL {group.__name__}: {type(exc).__name__}: {exc}")
    passed = sum(ok for _, ok, _ in results)
    print(f"\n{passed}/{len(results)} checks passed")


if __name__ == "__main__":
    main()
