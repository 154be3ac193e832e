"""An `If` on a run-time value (Silero VAD's sample-rate switch) exports as TFLite's IF with one subgraph per
branch (issue 12), float and int8, and LiteRT takes the branch the input asks for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.tflite import export_tflite
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session
from test_branches import _feeds, _switch_model


def _subgraphs(data: bytes) -> int:
    import importlib

    return importlib.import_module("tflite.Model").Model.GetRootAs(data, 0).SubgraphsLength()


def _run(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    sess = LiteRTSession(path, threads=1)
    return np.concatenate([sess.run(None, f)[0] for f in feeds])


def test_float_if_runs_the_branch_the_input_picks(tmp_path: Path):
    model = _switch_model()
    out = tmp_path / "f.tflite"
    result = export_tflite(model, out)
    assert result.ops["IF"] == 1 and _subgraphs(out.read_bytes()) == 3
    ref = session(model)
    for sr in (16000, 8000):
        feeds = _feeds(3, 4, sr)
        want = np.concatenate([ref.run(None, f)[0] for f in feeds])
        np.testing.assert_allclose(_run(out, feeds), want, rtol=1e-5, atol=1e-5)
    # the two branches really differ on this input, so the test sees which one ran
    a, b = (np.concatenate([ref.run(None, f)[0] for f in _feeds(1, 4, sr)]) for sr in (16000, 8000))
    assert np.abs(a - b).max() > 0.1


def test_int8_if_exports_without_fallback_and_agrees_with_the_int8_onnx(tmp_path: Path):
    model = _switch_model()
    calib = _feeds(16, 1, 16000) + _feeds(16, 2, 8000)  # both branches taken: both quantized
    q = tmp_path / "q.onnx"
    lowbit.quantize(model, q, calib=calib, progress=False)
    out = tmp_path / "q.tflite"
    result = export_tflite(q, out)
    assert result.quantized and result.ops["IF"] == 1 and _subgraphs(out.read_bytes()) == 3
    assert result.fallbacks == [] and result.float_nodes == []
    assert result.ops["CONV_2D"] == 4  # two per branch, int8
    ref = session(q)
    for sr in (16000, 8000):
        feeds = _feeds(4, 7, sr)
        want = np.concatenate([ref.run(None, f)[0] for f in feeds])
        got = _run(out, feeds)
        # measured: every value equal (64 inputs per branch), so no tolerance
        np.testing.assert_array_equal(got, want)


def _sizes_differ() -> onnx.ModelProto:
    """sr == 16000 picks a stride-2 conv, else stride 1: the If's output sizes depend on the branch."""

    def branch(tag: str, stride: int) -> onnx.GraphProto:
        w = numpy_helper.from_array(
            np.random.default_rng(stride).normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), f"{tag}_w"
        )
        node = helper.make_node("Conv", ["x", f"{tag}_w"], [f"{tag}_y"], pads=[1, 1, 1, 1], strides=[stride] * 2)
        return helper.make_graph(
            [node], tag, [], [helper.make_tensor_value_info(f"{tag}_y", TensorProto.FLOAT, None)], [w]
        )

    nodes = [
        helper.make_node("Equal", ["sr", "rate16k"], ["is16k"]),
        helper.make_node("If", ["is16k"], ["c"], then_branch=branch("hi", 2), else_branch=branch("lo", 1), name="sw"),
        helper.make_node("Relu", ["c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "sizes",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, "h", "w"])],
        [numpy_helper.from_array(np.array(16000, np.int64), "rate16k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_branches_of_different_sizes_need_the_condition_fixed(tmp_path: Path):
    model = _sizes_differ()
    with pytest.raises(LowbitError, match=r"^node sw \(If\): its branches give c sizes .*--value NAME=V"):
        export_tflite(model, tmp_path / "m.tflite")
    x = np.random.default_rng(0).normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    ref = session(model)
    for sr, size in ((16000, 4), (8000, 8)):
        out = tmp_path / f"m{sr}.tflite"
        result = export_tflite(model, out, values={"sr": sr})
        assert "IF" not in result.ops  # the condition is a constant now: only its branch is left
        got = LiteRTSession(out, threads=1)
        assert [i.name for i in got.get_inputs()] == ["x"]
        y = got.run(None, {"x": x})[0]
        assert y.shape == (1, 4, size, size)
        np.testing.assert_allclose(y, ref.run(None, {"x": x, "sr": np.array(sr, np.int64)})[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(LowbitError, match=r"^--value rate: the model has no input rate \(inputs: x, sr\)$"):
        export_tflite(model, tmp_path / "m.tflite", values={"rate": 1})


def test_cli_value_option(tmp_path: Path):
    from conftest import run_cli

    model = tmp_path / "sizes.onnx"
    onnx.save(_sizes_differ(), model)
    out = tmp_path / "m.tflite"
    ok = run_cli("export", str(model), "-o", str(out), "--value", "sr=8000")
    assert ok.returncode == 0, ok.stderr
    assert [i.name for i in LiteRTSession(out).get_inputs()] == ["x"]
    bad = run_cli("export", str(model), "-o", str(out), "--value", "sr")
    assert bad.returncode == 2 and bad.stderr.strip().endswith("expected INPUT=NUMBER, e.g. sr=16000")
    assert bad.stderr.count("\n") == 1
    refused = run_cli("export", str(model), "-o", str(out))  # the branches' sizes differ: the fix is named
    assert refused.returncode == 2 and "--value NAME=V" in refused.stderr and "Traceback" not in refused.stderr


def test_if_on_the_input_rank_keeps_the_branch_the_fixed_sizes_take(tmp_path: Path):
    """Silero VAD's "if x.dim() == 3" around its decoder: with sizes fixed at export the condition is a constant,
    even though its two branches give different ranks."""
    three = helper.make_graph(
        [helper.make_node("Squeeze", ["x", "ax"], ["s"])],
        "then",
        [],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([2], np.int64), "ax")],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["i"])],
        "else",
        [],
        [helper.make_tensor_value_info("i", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Size", ["shape"], ["rank"]),
        helper.make_node("Equal", ["rank", "three"], ["is3"]),
        helper.make_node("If", ["is3"], ["b"], then_branch=three, else_branch=other, name="rank_switch"),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "rank",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(np.array(3, np.int64), "three")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = tmp_path / "rank.tflite"
    result = export_tflite(model, out)
    assert "IF" not in result.ops
    x = np.linspace(-1, 1, 6, dtype=np.float32).reshape(1, 6, 1)
    np.testing.assert_allclose(LiteRTSession(out).run(None, {"x": x})[0], session(model).run(None, {"x": x})[0])
