"""`lowbit eval` and `lowbit bench` on .tflite files (LiteRT): same data, labels and reference as the ONNX model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from conftest import tiny_cnn
from helpers import model as make_model
from helpers import node, weight
from lowbit.cli.main import main
from lowbit.errors import LowbitError
from lowbit.evaluate import bench
from lowbit.evaluate.evaluate import evaluate
from lowbit.export.tflite import export_tflite
from lowbit.runtimes.litert import LiteRTSession
from lowbit.runtimes.ort import session


def conv_only(batch: int | str = "N") -> onnx.ModelProto:
    """Conv + Relu: its 4-D output is quantized, so it can be exported with int8/uint8 inputs and outputs."""
    nodes = [node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]), node("Relu", ["c"], ["y"])]
    # 8 channels on a 6x6 map: a missed NHWC->NCHW transpose changes the shape, not only the values
    return make_model(
        nodes,
        {"x": (batch, 3, 12, 12)},
        {"y": (batch, 8, 6, 6)},
        {"w": weight((8, 3, 3, 3), 1, 0.4), "b": weight((8,), 2, 0.1)},
    )


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny float and int8 ONNX models, their .tflite exports and data, in one folder."""
    d = tmp_path_factory.mktemp("litert")  # noqa: F811 (the fixture's own folder)
    rng = np.random.default_rng(1)
    np.save(d / "x.npy", rng.normal(0, 1, (40, 3, 16, 16)).astype(np.float32))
    np.save(d / "labels.npy", rng.integers(0, 10, 40))
    np.save(d / "xc.npy", rng.normal(0, 1, (24, 3, 12, 12)).astype(np.float32))
    onnx.save(tiny_cnn(), str(d / "f.onnx"))
    onnx.save(conv_only(), str(d / "c.onnx"))
    lowbit.quantize(d / "f.onnx", d / "q.onnx", calib=d / "x.npy", progress=False)
    lowbit.quantize(d / "c.onnx", d / "cq.onnx", calib=d / "xc.npy", progress=False)
    export_tflite(d / "f.onnx", d / "f.tflite")
    # the classifier's layer float, as the int8 ONNX runs it: the evaluations below must match to 0.1 dB
    export_tflite(d / "q.onnx", d / "q.tflite", float_outputs=True)
    for io in ("float", "int8", "uint8"):
        export_tflite(d / "cq.onnx", d / f"cq_{io}.tflite", io=io)
    return d


def test_float_tflite_evaluates_like_onnx(d):
    kw = dict(labels=d / "labels.npy", reference=d / "f.onnx", batch_size=16, progress=False)
    onnx_r = evaluate(d / "f.onnx", d / "x.npy", **kw)
    lite_r = evaluate(d / "f.tflite", d / "x.npy", **kw)
    assert lite_r.runtime.startswith("litert") and onnx_r.runtime == "onnxruntime"
    assert lite_r.samples == 40  # 16 + 16 + 8: the last, smaller batch resized the interpreter
    assert lite_r.accuracy == onnx_r.accuracy
    f = lite_r.outputs["y"]
    assert f["top1_agreement"] == 1.0 and f["max_abs_error"] < 1e-4


def test_int8_tflite_evaluates_like_int8_onnx(d):
    q_tfl = d / "q.tflite"
    kw = dict(labels=d / "labels.npy", reference=d / "f.onnx", progress=False)
    onnx_r = evaluate(d / "q.onnx", d / "x.npy", **kw)
    lite_r = evaluate(q_tfl, d / "x.npy", **kw)
    assert lite_r.accuracy == onnx_r.accuracy
    a, b = onnx_r.outputs["y"], lite_r.outputs["y"]
    assert a["top1_agreement"] == b["top1_agreement"]
    assert abs(a["cosine"] - b["cosine"]) < 1e-5 and abs(float(a["sqnr_db"]) - float(b["sqnr_db"])) < 0.1
    # and directly: the .tflite as the candidate, lowbit's int8 ONNX model as the reference
    direct = evaluate(q_tfl, d / "x.npy", reference=d / "q.onnx", progress=False).outputs["y"]
    assert direct["top1_agreement"] == 1.0 and direct["max_abs_error"] < 1e-3


def test_quantized_io_and_nchw_outputs(d):
    x = np.load(d / "xc.npy")[:5]
    runs = {io: LiteRTSession(d / f"cq_{io}.tflite").run(None, {"x": x})[0] for io in ("float", "int8", "uint8")}
    assert runs["int8"].dtype == np.float32 and runs["int8"].shape == (5, 8, 6, 6)
    # the adapter quantizes inputs as the float-io file's QUANTIZE op does, and dequantizes the outputs
    np.testing.assert_array_equal(runs["float"], runs["int8"])
    np.testing.assert_array_equal(runs["int8"], runs["uint8"])
    sess = LiteRTSession(d / "cq_int8.tflite")
    assert sess.get_inputs()[0].shape == (None, 3, 12, 12) and sess.get_outputs()[0].shape == (None, 8, 6, 6)
    step = sess._outputs[0]["quantization"][0]
    r = evaluate(d / "cq_int8.tflite", d / "xc.npy", reference=d / "cq.onnx", progress=False).outputs["y"]
    assert r["max_abs_error"] <= 1.001 * step  # LiteRT's integers within one step of ORT's integer kernels


def test_batch_one_graph_that_cannot_resize_runs_per_sample(tmp_path):
    # Reshape of one sample into two rows: XNNPACK cannot re-plan it for batch 5, so the adapter runs each sample
    m = make_model(
        [node("Conv", ["x", "w"], ["c"]), node("Reshape", ["c", "s"], ["y"])],
        {"x": (1, 3, 4, 4)},
        {"y": (2, 32)},
        {"w": weight((4, 3, 1, 1), 3), "s": np.array([2, -1], np.int64)},
    )
    onnx.save(m, str(tmp_path / "r.onnx"))
    export_tflite(tmp_path / "r.onnx", tmp_path / "r.tflite")
    x = np.random.default_rng(0).normal(0, 1, (5, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    lite = LiteRTSession(tmp_path / "r.tflite")
    out = lite.run(None, {"x": x})[0]
    assert lite._per_sample and out.shape == (10, 32)
    ref = np.concatenate([session(m).run(None, {"x": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # with the batch-1 ONNX model as reference, eval feeds both one sample at a time
    r = evaluate(tmp_path / "r.tflite", tmp_path / "x.npy", reference=tmp_path / "r.onnx", progress=False)
    assert r.samples == 5 and r.outputs["y"]["max_abs_error"] < 1e-5


def test_bench_reports_onnx_and_tflite_side_by_side(d):
    paths = [d / "f.onnx", d / "f.tflite", d / "q.tflite"]
    r = bench.benchmark(paths, threads=(1, 2), runs=4, warmup=1, progress=False)
    entries = [r["models"][str(p)] for p in paths]
    assert entries[0]["runtime"] == "onnxruntime"
    assert entries[1]["runtime"] == entries[2]["runtime"] == "litert (XNNPACK)"  # the delegate took the graph
    for e, p in zip(entries, paths):
        assert e["size_bytes"] == p.stat().st_size
        assert set(e["latency_ms"]) == {"1", "2"} and e["latency_ms"]["1"]["p50"] > 0
        if e["peak_memory_mb"] is not None:
            assert e["peak_memory_mb"] > 0
    assert entries[0]["op_time_ms"] and entries[0]["energy"] is not None
    assert entries[1]["op_time_ms"] is None and entries[1]["energy"] is None
    assert set(r["ratios"]["1"]) == {str(p) for p in paths}
    from lowbit.cli.bench_cmd import text

    out = text(r)
    assert "LiteRT (XNNPACK)" in out and "n/a" in out


def test_cli_eval_and_bench_with_tflite(d, capsys):
    assert (
        main(
            [
                "eval",
                str(d / "q.tflite"),
                "--data",
                str(d / "x.npy"),
                "--reference",
                str(d / "f.onnx"),
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["runtime"] == "litert (XNNPACK)"
    assert (
        main(["eval", str(d / "q.tflite"), "--data", str(d / "x.npy"), "--reference", str(d / "f.onnx"), "--quiet"])
        == 0
    )
    assert "LiteRT" in capsys.readouterr().out
    assert main(["bench", str(d / "f.onnx"), str(d / "f.tflite"), "--runs", "3", "--no-profile", "--quiet"]) == 0
    assert "LiteRT" in capsys.readouterr().out


def _one_line_error(argv: list[str], capsys, *words: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # LiteRT may print its own INFO line first
    assert "Traceback" not in err and all(w in last for w in words), err


def test_user_mistakes_with_tflite_are_one_line(d, tmp_path, capsys):
    data = str(d / "x.npy")
    _one_line_error(["eval", str(d / "q.tflite"), "--data", data, "--mode", "simulate"], capsys, "simulate", ".tflite")
    with pytest.raises(LowbitError, match="simulate"):
        evaluate(d / "q.tflite", data, mode="simulate", progress=False)
    # not a flatbuffer at all, and a real file cut in half
    (tmp_path / "junk.tflite").write_bytes(b"not a model at all")
    (tmp_path / "cut.tflite").write_bytes((d / "q.tflite").read_bytes()[:2000])
    _one_line_error(["eval", str(tmp_path / "junk.tflite"), "--data", data], capsys, "junk.tflite", "TFLite")
    _one_line_error(["eval", str(tmp_path / "cut.tflite"), "--data", data], capsys, "cut.tflite")
    _one_line_error(["bench", str(d / "f.onnx"), str(tmp_path / "cut.tflite"), "--quiet"], capsys, "cut.tflite")
    _one_line_error(["bench", str(tmp_path / "missing.tflite")], capsys, "missing.tflite", "not found")
    # data of the wrong spatial size for the .tflite (and a direct feed of the wrong shape)
    np.save(tmp_path / "small.npy", np.zeros((4, 3, 8, 8), np.float32))
    _one_line_error(["eval", str(d / "f.tflite"), "--data", str(tmp_path / "small.npy")], capsys, "small.npy")
    with pytest.raises(LowbitError, match=r"takes shape \(N, 3, 16, 16\)"):
        LiteRTSession(d / "f.tflite").run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})
    # a reference with other outputs than the .tflite
    _one_line_error(
        ["eval", str(d / "q.tflite"), "--data", data, "--reference", str(d / "cq.onnx")], capsys, "reference"
    )


def test_builtin_kernels_without_xnnpack(d):
    x = np.load(d / "x.npy")[:8]
    with_x, without = LiteRTSession(d / "q.tflite"), LiteRTSession(d / "q.tflite", xnnpack=False)
    assert with_x.delegate_partitions() >= 1 and without.delegate_partitions() == 0
    a, b = with_x.run(None, {"x": x})[0], without.run(None, {"x": x})[0]
    assert (a.argmax(1) == b.argmax(1)).all() and np.abs(a - b).max() < 0.05
