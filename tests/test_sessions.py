"""Sessions per provider (``deploy/sessions.py``): what each is opened with, checked after opening,
and how compare labels what it timed. Built and checked on the CPU; the GPU report runs them."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from zoo import build

import bnmove
from bnmove import BnmoveError, report
from bnmove.cli import main
from bnmove.deploy import runtime, sessions
from bnmove.deploy.comparison import Comparison, OutputDeviation, Timing, VariantInfo
from bnmove.deploy.export import ExportOptions, export_variants
from bnmove.deploy.providers import provider_works
from bnmove.deploy.rounds import timing_plan
from bnmove.deploy.sessions import (
    SessionPlan,
    check_providers,
    int8_execution,
    open_session,
    tensorrt_int8_problem,
)


class _Input:
    def __init__(self, name: str, shape: list[object]) -> None:
        self.name, self.shape = name, shape


def test_tensorrt_sessions_save_no_graph_cache_their_engines_and_fall_back_to_cuda(tmp_path: Path) -> None:
    plan = SessionPlan("tensorrt", device_id=1, cache_dir=tmp_path, shapes=(("x", (8, 3, 224, 224)),))
    assert not plan.writes_optimized_graph  # compiled nodes do not serialise: onnxruntime refuses
    (trt, trt_options), (fallback, fallback_options) = plan.providers()
    assert (trt, fallback) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    assert trt_options["device_id"] == fallback_options["device_id"] == "1"
    assert trt_options["trt_engine_cache_enable"] == trt_options["trt_timing_cache_enable"] == "1"
    assert trt_options["trt_engine_cache_path"] == trt_options["trt_timing_cache_path"] == str(tmp_path)
    for bound in ("min", "opt", "max"):  # one engine for exactly this batch size
        assert trt_options[f"trt_profile_{bound}_shapes"] == "x:8x3x224x224"
    assert "trt_int8_enable" not in trt_options
    assert SessionPlan("tensorrt", int8=True).providers()[0][1]["trt_int8_enable"] == "1"


def test_cuda_sessions_keep_tf32_by_default_and_measure_without_it_when_asked() -> None:
    assert SessionPlan("cuda").providers() == [("CUDAExecutionProvider", {"device_id": "0", "use_tf32": "1"})]
    exact = SessionPlan("cuda", tf32=False)
    assert exact.providers()[0][1]["use_tf32"] == "0" and exact.writes_optimized_graph
    assert "TF32 off" in exact.describe() and "TF32 allowed" in SessionPlan("cuda").describe()
    assert SessionPlan("cpu").providers() == [("CPUExecutionProvider", {})]
    with pytest.raises(BnmoveError, match="unknown provider 'tpu'"):
        SessionPlan("tpu")


def test_each_timed_batch_size_gets_an_engine_for_its_own_shape(tmp_path: Path) -> None:
    inputs = [_Input("x", ["batch", 3, 32, 32]), _Input("mask", ["batch", 1])]
    checked = SessionPlan("cuda", tf32=False)
    plans = {b: timing_plan("tensorrt", checked, inputs, b, False, tmp_path) for b in (1, 32)}
    assert plans[1].shapes == (("x", (1, 3, 32, 32)), ("mask", (1, 1)))
    assert plans[32].shapes == (("x", (32, 3, 32, 32)), ("mask", (32, 1)))
    assert plans[1] != plans[32] and plans[1].cache_dir == tmp_path
    assert timing_plan("tensorrt", checked, inputs, 1, True, tmp_path).int8
    assert timing_plan("cuda", checked, inputs, 1, False, tmp_path) == SessionPlan("cuda")  # TF32 on
    cpu = SessionPlan("cpu")
    assert timing_plan("cpu", cpu, inputs, 8, False, tmp_path) is cpu  # the checked session, reused


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, inputs = build("resnet")
    out = tmp_path_factory.mktemp("variants")
    export_variants(
        model, inputs, out, ("original", "after"), stem="net", options=ExportOptions(fold="forward")
    )
    return out


@pytest.mark.parametrize("provider", ["cuda", "tensorrt"])
def test_a_session_on_another_provider_than_asked_is_one_line_and_nothing_on_stdout(
    variants: Path, provider: str, capfd: pytest.CaptureFixture[str]
) -> None:
    if provider_works(provider):
        pytest.skip(f"{provider} works on this machine: onnxruntime opens the session as asked")
    capfd.readouterr()
    with pytest.raises(BnmoveError) as caught:
        open_session(variants / "net.original.onnx", SessionPlan(provider))
    out, _ = capfd.readouterr()
    assert out == ""
    message = str(caught.value)
    assert "\n" not in message and "onnxruntime opened it on CPUExecutionProvider" in message, message


def test_the_provider_check_names_onnxruntimes_own_reason_from_its_fallback_banner() -> None:
    banner = (
        "*************** EP Error ***************\n"
        "EP Error Unable to serialize model as it contains compiled nodes when using [...]\n"
        "Falling back to ['CPUExecutionProvider'] and retrying.\n"
    )
    check_providers(["CPUExecutionProvider"], SessionPlan("cpu"), "m.onnx", "")  # as asked: silent
    with pytest.raises(BnmoveError, match="not CPUExecutionProvider as asked"):
        check_providers(["CUDAExecutionProvider"], SessionPlan("cpu"), "m.onnx", banner)


def test_the_cpu_session_saves_its_optimised_graph_for_node_counts(variants: Path, tmp_path: Path) -> None:
    optimized = tmp_path / "o.onnx"
    session = open_session(variants / "net.original.onnx", SessionPlan("cpu"), optimized=optimized)
    assert session.get_providers() == ["CPUExecutionProvider"] and optimized.exists()
    assert len(onnx.load(str(optimized)).graph.node) > 0


def _qdq_model(zero_point: int, dtype: int) -> onnx.ModelProto:
    scale = numpy_helper.from_array(torch.tensor(0.1).numpy(), "s")
    point = helper.make_tensor("z", dtype, [], [zero_point])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"])]
    nodes.append(helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [scale, point],
    )
    return helper.make_model(graph)


def test_tensorrt_takes_only_signed_symmetric_int8() -> None:
    assert tensorrt_int8_problem(_qdq_model(0, TensorProto.INT8)) is None
    uint8 = tensorrt_int8_problem(_qdq_model(128, TensorProto.UINT8))
    assert uint8 is not None and "uint8" in uint8
    shifted = tensorrt_int8_problem(_qdq_model(3, TensorProto.INT8))
    assert shifted is not None and "non-zero zero points" in shifted


def test_compare_on_tensorrt_refuses_a_uint8_int8_file_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    onnx.save(_qdq_model(128, TensorProto.UINT8), tmp_path / "net.after.int8.onnx")
    onnx.save(_qdq_model(0, TensorProto.INT8), tmp_path / "net.original.int8.onnx")
    monkeypatch.setattr(runtime, "select_provider", lambda requested: "tensorrt")
    opened: list[object] = []
    monkeypatch.setattr(sessions, "open_session", lambda *a, **k: opened.append(a))
    with pytest.raises(
        BnmoveError, match=r"after\.int8: TensorRT cannot build this INT8 file.*int8-tensorrt"
    ):
        runtime.compare([tmp_path], provider="tensorrt", iterations=1)
    assert not opened


def test_a_gpu_compare_refuses_to_time_the_first_run(variants: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "select_provider", lambda requested: "cuda")
    with pytest.raises(BnmoveError, match="warmup must be at least 1 on cuda"):
        runtime.compare([variants], provider="cuda", warmup=0, iterations=1)


def _comparison(precision: str) -> Comparison:
    timings = [Timing(v, 1, 3, 1.0, 1.0, 1.0, 1.0, 1000.0, 1.0, 0.9, 1.1) for v in ("original", "after.int8")]
    return Comparison(
        provider="cuda",
        device="GPU",
        onnxruntime="x",
        created="now",
        reference="original",
        variants=[VariantInfo("original", "a", 1, {}), VariantInfo("after.int8", "b", 1, {}, precision)],
        timings=timings,
        deviations=[OutputDeviation(v, 0.0, 0.0, 1.0, 1.0) for v in ("original", "after.int8")],
        batch_sizes=[1],
        timed_with=SessionPlan("cuda").describe(),
        checked_with=SessionPlan("cuda", tf32=False).describe(),
    )


def test_int8_on_the_cuda_provider_is_labelled_emulated_in_table_json_and_markdown() -> None:
    emulated = _comparison(int8_execution("cuda"))
    assert int8_execution("cuda") == "int8 emulated in float" and int8_execution("tensorrt") == "int8"
    lines = report.provider_lines(emulated)
    assert lines[0].startswith("timed with CUDA, TF32 allowed") and "checked with CUDA, TF32 off" in lines[0]
    assert "after.int8: int8 emulated in float" in lines[1]
    assert "after.int8†" in report.comparison_markdown(emulated)
    exported = json.loads(report.comparison_json(emulated))
    assert exported["variants"][1]["precision"] == "int8 emulated in float"
    assert exported["checked_with"].startswith("CUDA, TF32 off")
    assert len(report.provider_lines(_comparison("int8"))) == 1  # nothing emulated: no note


def test_compare_on_the_cpu_says_how_it_timed_and_checked_and_labels_int8(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, inputs = build("resnet")
    calibration = torch.randn(16, *inputs[0].shape[1:])
    export_variants(
        model,
        inputs,
        tmp_path,
        ("original",),
        stem="net",
        options=ExportOptions(quantize="int8"),
        calibration=bnmove.Calibration(calibration),
    )
    result = runtime.compare([tmp_path], provider="cpu", batch_sizes=(1,), warmup=0, iterations=2)
    precision = {v.name: v.precision for v in result.variants}
    assert precision == {"original": "float32", "original.int8": "int8"}
    assert result.timed_with == result.checked_with == SessionPlan("cpu").describe()
    shown = CliRunner().invoke(
        main, ["compare", str(tmp_path), "--provider", "cpu", "--iterations", "2", "--batch-sizes", "1"]
    )
    assert shown.exit_code == 0, shown.output
    assert "timed with the CPU provider (float32; int8 kernels for QDQ files); outputs" in shown.stdout
