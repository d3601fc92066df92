"""A converted model stands alone: saved whole, it loads, runs, trains and keeps its guards where
bnmove is not installed, and it scripts wherever the original scripts.

The models are converted here; one subprocess, in which ``import bnmove`` fails, loads every file
and checks it (a subprocess per file would cost a torch import each).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import assert_same_outputs
from torch import fx, nn
from zoo import ZOO, Forest, ScaledNet, build, randomize_bn

import bnmove
from bnmove import convert
from bnmove.core.dispatch import dispatched
from bnmove.core.forwards import GraphForward, generated_forward, install_forward
from bnmove.pipeline.conversion import SAVE_PRETRAINED

TESTS = Path(__file__).resolve().parent

#: run in a fresh interpreter: bnmove cannot be imported, the zoo (the "model's own library") can
_CHECK = r"""
import json, sys
sys.modules["bnmove"] = None  # `import bnmove` raises ImportError from here on
sys.path.insert(0, sys.argv[2])
import torch

torch.manual_seed(0)
report = {}
for entry in json.load(open(sys.argv[1])):
    model = torch.load(entry["model"], weights_only=False).eval()
    inputs = torch.load(entry["inputs"])
    with torch.no_grad():
        got = model(*inputs)
    expected = torch.load(entry["expected"])
    result = {"max_abs": float((got - expected).abs().max())}
    if entry.get("script"):
        with torch.no_grad():
            result["script_max_abs"] = float((torch.jit.script(model)(*inputs) - expected).abs().max())
    if entry.get("guard"):
        try:
            model(inputs[0], **entry["guard"])
            result["guard"] = "accepted"
        except AssertionError as exc:
            result["guard"] = str(exc)
    if entry.get("bn"):
        bn = model.get_submodule(entry["bn"])
        before = bn.running_mean.clone()
        model.train()
        with torch.no_grad():  # differs from call to call only where a training graph drops out
            result["train_varies"] = not torch.equal(model(*inputs), model(*inputs))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        loss = model(*inputs).square().mean()
        loss.backward()
        optimizer.step()
        result["stats_moved"] = float((bn.running_mean - before).abs().max())
        result["trained_finite"] = bool(torch.isfinite(model.eval()(*inputs)).all())
    report[entry["name"]] = result
print(json.dumps(report))
"""


def _pickle_text(model: nn.Module) -> tuple[list[str], bytes]:
    """The globals a whole-model save names, and the pickle itself (code kept as text included)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    names = []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("GLOBAL", "STACK_GLOBAL") and arg:
            names.append(str(arg))
    strings = [str(arg) for opcode, arg, _ in pickletools.genops(data) if "UNICODE" in opcode.name and arg]
    return names + strings, data


def _check_without_bnmove(entries: list[dict[str, object]], folder: Path) -> dict[str, dict[str, object]]:
    listing = folder / "entries.json"
    listing.write_text(json.dumps(entries))
    done = subprocess.run(
        [sys.executable, "-c", _CHECK, str(listing), str(TESTS)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def _save(folder: Path, name: str, model: nn.Module, inputs: tuple[object, ...]) -> dict[str, object]:
    with torch.no_grad():
        expected = model.eval()(*inputs)
    paths = {kind: folder / f"{name}.{kind}.pt" for kind in ("model", "inputs", "expected")}
    torch.save(model, paths["model"])
    torch.save(inputs, paths["inputs"])
    torch.save(expected, paths["expected"])
    return {"name": name, **{kind: str(path) for kind, path in paths.items()}}


def test_every_zoo_conversion_loads_and_computes_without_bnmove(tmp_path: Path) -> None:
    """Every model of the zoo, both placements, exact and fit: a file that names no bnmove module
    and loads where bnmove cannot be imported, computing the same outputs; the forward that
    branches on ``self.training`` (one graph per mode and a dispatch) trains there too."""
    entries = []
    scripts = set()
    for name in ZOO:
        with contextlib.suppress(Exception):  # TorchScript refuses many of the zoo's forwards
            torch.jit.script(build(name)[0])
            scripts.add(name)
        for placement in ("before", "after"):
            for method in ("exact", "fit"):
                model, inputs = build(name)
                result = convert(model, placement, method=method, example_inputs=inputs)
                texts, _ = _pickle_text(result.model)
                case = f"{name}-{placement}-{method}"
                assert not [t for t in texts if "bnmove" in t], case
                assert not [w for w in result.warnings if "bnmove installed" in w], case
                entry = {**_save(tmp_path, case, result.model, tuple(inputs)), "script": name in scripts}
                if name == "branching-forward" and placement == "after":
                    assert dispatched(result.model.block) is not None  # the case this is for
                    entry["bn"] = "block.bn1"
                entries.append(entry)
    report = _check_without_bnmove(entries, tmp_path)
    assert set(report) == {e["name"] for e in entries}
    for case, result in report.items():
        assert float(result["max_abs"]) <= 1e-5, case  # type: ignore[arg-type]
    for method in ("exact", "fit"):  # the graph of training mode runs in training mode, and trains
        trained = report[f"branching-forward-after-{method}"]
        assert trained["train_varies"] is True and float(trained["stats_moved"]) > 0  # type: ignore[arg-type]
        assert trained["trained_finite"] is True
    # loaded without bnmove, a converted model scripts wherever its original scripts
    scripted = {case: float(r["script_max_abs"]) for case, r in report.items() if "script_max_abs" in r}  # type: ignore[arg-type]
    assert len(scripted) == sum(bool(e["script"]) for e in entries) >= 8
    assert max(scripted.values()) <= 1e-5, scripted


def test_a_specialised_forward_keeps_its_guard_and_trains_without_bnmove(tmp_path: Path) -> None:
    """The guard of a forward specialised to ``scale=0.5`` refuses another value after the round trip;
    the loaded model trains a step, and its moved BN updates its statistics."""
    model = randomize_bn(ScaledNet()).eval()
    x = torch.randn(2, 3, 6, 6)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert [m.pair.bn for m in result.moved] == ["block.bn"] and not result.warnings
    with pytest.raises(AssertionError, match="specialized"):
        result.model.block(x, 0.25)
    entry = _save(tmp_path, "scaled", result.model.block, (x, 0.5))
    entry.update(guard={"scale": 0.25}, bn="bn")
    whole = _save(tmp_path, "scaled-net", result.model, (x,))
    report = _check_without_bnmove([entry, whole], tmp_path)
    assert "specialized to have value 0.5" in str(report["scaled"]["guard"])
    assert float(report["scaled"]["max_abs"]) == 0.0  # type: ignore[arg-type]
    assert float(report["scaled-net"]["max_abs"]) <= 1e-6  # type: ignore[arg-type]
    assert float(report["scaled"]["stats_moved"]) > 0  # type: ignore[arg-type]
    assert report["scaled"]["train_varies"] is False  # one graph: no dropout in either mode
    assert report["scaled"]["trained_finite"] is True


@pytest.mark.parametrize("factory", ["resnet", "bottleneck_resnet", "mobilenet", "preact_resnet", "mlp"])
@pytest.mark.parametrize("method", ["exact", "fit"])
def test_scripting_a_converted_model_computes_what_it_computes(factory: str, method: str) -> None:
    """After the original was scripted (TorchScript caches one compiled type per class and attributes),
    ``torch.jit.script`` of the converted model, regenerated forwards included, computes what the
    eager converted model computes: never the original's compiled code. Scripting leaves the eager
    model computing the same, with its classes."""
    model = getattr(bnmove.sample_models, factory)().eval()
    randomize_bn(model)
    x = torch.randn(2, 64) if factory == "mlp" else torch.randn(2, 3, 16, 16)
    torch.jit.script(model)  # the original scripts, and its types are cached
    regenerated = 0
    for placement in ("before", "after"):
        converted = convert(model, placement, method=method, example_inputs=(x,)).model.eval()
        regenerated += sum(generated_forward(m) is not None for m in converted.modules())
        with torch.no_grad():
            eager = converted(x)
        classes = [(name, type(m)) for name, m in converted.named_modules()]
        assert_same_outputs(converted, torch.jit.script(converted), (x,), rtol=1e-6)
        with torch.no_grad():
            assert torch.equal(converted(x), eager)
        assert [(name, type(m)) for name, m in converted.named_modules()] == classes
    if factory in ("resnet", "bottleneck_resnet"):
        assert regenerated > 0  # the case this test is for: a block whose forward bnmove regenerated


def test_a_regenerated_forward_runs_the_modules_current_layers(tmp_path: Path) -> None:
    """A layer swapped in after a deep copy, or after the model was saved, loaded, copied and saved
    again, runs; and fx traces the model through its own layers."""
    model = randomize_bn(bnmove.sample_models.resnet()).eval()
    x = torch.randn(2, 3, 16, 16)
    converted = convert(model, "after", method="exact", example_inputs=(x,)).model.eval()
    torch.save(converted, tmp_path / "m.pt")
    torch.save(copy.deepcopy(torch.load(tmp_path / "m.pt", weights_only=False)), tmp_path / "again.pt")
    for copy_of in (copy.deepcopy(converted), torch.load(tmp_path / "again.pt", weights_only=False)):
        assert_same_outputs(copy_of, torch.fx.symbolic_trace(copy_of), (x,), rtol=1e-6)
        block = next(m for m in copy_of.modules() if generated_forward(m) is not None)
        with torch.no_grad():
            before = copy_of(x)
            block.conv1 = nn.Conv2d(
                block.conv1.in_channels, block.conv1.out_channels, 3, block.conv1.stride, 1
            )
            swapped = copy_of(x)
            assert (swapped - before).abs().max() > 1e-3, "the swapped-in layer did not run"
            torch.testing.assert_close(
                torch.jit.script(copy_of)(x), swapped, rtol=1e-6, atol=1e-6
            )  # scripted too


def test_a_converted_hugging_face_model_says_what_save_pretrained_gives_back() -> None:
    """A ``transformers`` PreTrainedModel saves weights and config, and ``from_pretrained`` builds the
    original placement from the config: convert says so in one line (recognised without importing
    transformers); a model of any other library does not get the line."""

    class PreTrainedModel(nn.Module):  # as transformers names its base class
        pass

    PreTrainedModel.__module__ = "transformers.modeling_utils"

    class TinyResNet(PreTrainedModel):
        def __init__(self) -> None:
            super().__init__()
            self.body = bnmove.sample_models.resnet()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x)  # type: ignore[no-any-return]

    x = torch.randn(2, 3, 8, 8)
    hf = convert(randomize_bn(TinyResNet()).eval(), "after", method="exact", example_inputs=(x,))
    assert hf.moved and [w for w in hf.warnings if "save_pretrained" in w] == [SAVE_PRETRAINED]
    assert "bnmove.io.save_pretrained(model, folder)" in SAVE_PRETRAINED  # what to do instead
    plain = convert(randomize_bn(bnmove.sample_models.resnet()).eval(), "after", example_inputs=(x,))
    assert SAVE_PRETRAINED not in plain.warnings


def test_a_forward_installed_again_never_leaves_the_twin_of_the_earlier_one() -> None:
    """The scriptable twin belongs to the forward it was made for: installing another forward (one
    graph or several) replaces or removes it, so TorchScript never compiles a stale forward."""
    block = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    graph = fx.symbolic_trace(block).graph
    assert install_forward(block, [(frozenset(), graph)])
    first = block.__dict__["__prepare_scriptable__"]
    assert install_forward(block, [(frozenset(), graph)])
    assert block.__dict__["__prepare_scriptable__"] is not first
    assert install_forward(block, [(frozenset(), graph), (frozenset({"self.training"}), graph)])
    assert dispatched(block) is not None
    with pytest.raises(AssertionError, match="TorchScript cannot compile"):  # a dispatch has no twin
        torch.jit.script(block)
    starred = fx.Graph()  # a forward of several graphs that takes *args: only bnmove dispatches it
    starred.output(starred.placeholder("*args"))
    assert not install_forward(block, [(frozenset(), starred), (frozenset({"self.training"}), starred)])
    assert isinstance(block.forward, GraphForward) and dispatched(block) is None
    clashing = fx.Graph()  # an argument named like one of the dispatcher's own inputs
    clashing.output(clashing.placeholder("module_"))
    assert not install_forward(block, [(frozenset(), clashing), (frozenset({"self.training"}), clashing)])


def test_a_forward_that_tests_an_optional_argument_runs_its_graphs_without_bnmove(tmp_path: Path) -> None:
    """A forward with a graph per optional argument left at None (timm's DLA) is dispatched by a
    GraphModule: saved whole it names no bnmove module, loads where bnmove cannot be imported and
    runs the graph each call needs; deep copies, clones and a second conversion read it back."""
    model = randomize_bn(Forest()).eval()
    x = torch.randn(2, 3, 6, 6)
    result = convert(model, "after", method="exact", example_inputs=(x,))
    assert {m.pair.bn for m in result.moved} == {"first.bn", "second.bn"} and not result.warnings
    tree = result.model.first
    variants = dispatched(tree)
    assert variants is not None and sorted(sorted(k) for k, _ in variants) == [[], ["shortcut"]]
    with torch.no_grad():
        for call in ((x,), (x, x + 1)):  # both graphs, against the original's branches
            torch.testing.assert_close(tree(*call), model.first(*call), rtol=1e-6, atol=1e-6)
    assert not [t for t in _pickle_text(result.model)[0] if "bnmove" in t]
    for copied in (copy.deepcopy(result.model), bnmove.core.clone.clone_module(result.model)):
        assert dispatched(copied.first) is not None
        assert_same_outputs(result.model, copied, (x,), rtol=1e-6)
    back = convert(result.model, "before", method="exact", example_inputs=(x,))
    assert_same_outputs(model, back.model, (x,), rtol=1e-5)
    exported = torch.export.export(result.model, (x,)).module()  # the dispatch traces through
    with torch.no_grad():
        torch.testing.assert_close(exported(x), result.model(x), rtol=1e-6, atol=1e-6)
    entries = [
        _save(tmp_path, "forest", result.model, (x,)),
        _save(tmp_path, "tree-none", tree, (x,)),
        {**_save(tmp_path, "tree-given", tree, (x, x + 1)), "bn": "bn"},
    ]
    report = _check_without_bnmove(entries, tmp_path)
    assert max(float(r["max_abs"]) for r in report.values()) <= 1e-6  # type: ignore[arg-type]
    assert float(report["tree-given"]["stats_moved"]) > 0  # type: ignore[arg-type]
