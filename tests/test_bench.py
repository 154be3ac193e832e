"""`lowbit bench`: result structure, interleaved order, exact MAC counts, the energy estimate, CLI and errors.

Timings are only checked for ordering and positivity, never for values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import tiny_cnn
from lowbit.cli.main import main
from lowbit.data import input_specs
from lowbit.evaluate import bench
from lowbit.evaluate.energy import count_ops, estimate


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny CNN in float and int8 QDQ form."""
    folder = tmp_path_factory.mktemp("bench")
    f, q = folder / "float.onnx", folder / "int8.onnx"
    model = tiny_cnn()
    onnx.save(model, str(f))
    calib = [np.random.default_rng(0).normal(0, 1, (16, 3, 16, 16)).astype(np.float32)]
    lowbit.quantize(model, q, calib=calib, progress=False)
    return f, q


@pytest.fixture(scope="module")
def result(pair: tuple[Path, Path]) -> dict:
    return bench.benchmark(list(pair), threads=(1, 2), runs=5, warmup=1, progress=False)


def test_result_structure(result: dict, pair: tuple[Path, Path]) -> None:
    json.dumps(result)  # JSON-able as promised
    assert set(result) == {"machine", "models", "ratios"}
    assert set(result["machine"]) == {"cpu", "vnni", "cores"}
    keys = [str(p) for p in pair]
    assert list(result["models"]) == keys
    for key, path in zip(keys, pair):
        entry = result["models"][key]
        assert entry["size_bytes"] == path.stat().st_size
        assert set(entry["latency_ms"]) == {"1", "2"}
        for lat in entry["latency_ms"].values():
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert lat["mean"] > 0
        if sys.platform.startswith("linux"):
            assert entry["peak_memory_mb"] > 0
        assert "estimate" in entry["energy"]["note"]
        en = entry["energy"]
        assert en["total_uj"] == pytest.approx(en["compute_uj"] + en["memory_uj"])
    assert set(result["ratios"]) == {"1", "2"}
    for ratios in result["ratios"].values():
        assert ratios[keys[0]] == 1.0
        assert ratios[keys[1]] > 0


def test_op_time_has_the_kernels_that_ran(result: dict, pair: tuple[Path, Path]) -> None:
    float_ops = result["models"][str(pair[0])]["op_time_ms"]
    int8_ops = result["models"][str(pair[1])]["op_time_ms"]
    assert {"Conv", "Gemm"} <= set(float_ops)
    assert {"QLinearConv", "QGemm"} <= set(int8_ops)
    assert "Conv" not in int8_ops
    assert all(ms >= 0 for ms in float_ops.values()) and sum(int8_ops.values()) > 0
    assert list(int8_ops.values()) == sorted(int8_ops.values(), reverse=True)


def test_same_model_twice_is_kept_apart(pair: tuple[Path, Path]) -> None:
    r = bench.benchmark([pair[0], pair[0]], runs=3, warmup=0, profile=False, progress=False)
    assert list(r["models"]) == [str(pair[0]), f"{pair[0]}#2"]
    assert "op_time_ms" not in r["models"][str(pair[0])]


class FakeSession:
    """Logs creation and runs into a shared list instead of computing anything."""

    def __init__(self, name: str, log: list) -> None:
        self.name, self.log = name, log
        log.append(("create", name))

    def run(self, outputs, feeds) -> None:
        assert feeds["x"].shape == (1, 3, 16, 16)
        self.log.append(("run", self.name))


def test_latency_is_interleaved_and_creation_order_alternates(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list = []
    monkeypatch.setattr(bench, "session", lambda path, mode, threads: FakeSession(path, log))
    feeds = {k: {"x": np.zeros((1, 3, 16, 16), np.float32)} for k in ("a", "b")}
    bar = bench.tqdm(disable=True)
    times = bench._latency({"a": "a", "b": "b"}, feeds, threads=1, runs=6, warmup=0, bar=bar)
    assert [len(v) for v in times.values()] == [6, 6]
    creates = [n for kind, n in log if kind == "create"]
    assert creates == ["a", "b", "b", "a"]  # the two halves create sessions in opposite orders
    cut = [i for i, (kind, _) in enumerate(log) if kind == "create"][2]
    for half in (log[2:cut], log[cut + 2 :]):
        runs = [n for _, n in half]
        rounds = [runs[i : i + 2] for i in range(0, len(runs), 2)]
        assert all(sorted(r) == ["a", "b"] for r in rounds)  # every round runs each model once
        firsts = [r[0] for r in rounds]
        assert all(x != y for x, y in zip(firsts, firsts[1:]))  # and the order alternates


def test_interleaved_times_shares_feeds_and_keeps_every_run(pair: tuple[Path, Path]) -> None:
    x = {"x": np.random.default_rng(2).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
    times = bench.interleaved_times({"float": str(pair[0]), "int8": str(pair[1])}, x, threads=1, runs=5, warmup=1)
    assert sorted(times) == ["float", "int8"] and [len(v) for v in times.values()] == [5, 5]
    assert all(t > 0 for v in times.values() for t in v)


def conv_gemm_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(4, 2, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(size=(10, 64)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c1", "w2"], ["c2"], group=2),
        helper.make_node("Relu", ["c2"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "w3"], ["y"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_mac_count_is_exact() -> None:
    # conv1: 8x8 -> 4x4 (stride 2, pad 1), 4 output channels, each output sums 2 channels x 3x3 = 18 products.
    conv1 = 4 * 4 * 4 * (2 * 3 * 3)
    # conv2: 1x1, group 2: each of 4x4x4 outputs sums 4 / 2 = 2 input channels.
    conv2 = 4 * 4 * 4 * 2
    gemm = 10 * 64
    for batch in (1, 3):
        counts = count_ops(conv_gemm_model(), batch)
        assert counts["macs"] == {"fp32": batch * (conv1 + conv2 + gemm)}
        # conv1's bias (one add per output) and Relu (one per element); Flatten is a view.
        assert counts["adds"] == {"fp32": batch * (64 + 64)}
        assert counts["weight_bytes"] == 4 * (72 + 4 + 8 + 640)


def test_int8_estimate_is_lower_than_float(pair: tuple[Path, Path]) -> None:
    f, q = estimate(onnx.load(str(pair[0]))), estimate(onnx.load(str(pair[1])))
    assert "estimate" in f["note"] and "estimate" in q["note"]
    assert q["macs"] == f["macs"] > 0
    assert q["by_precision"]["int8"]["macs"] == f["by_precision"]["fp32"]["macs"]
    assert "fp32" not in q["by_precision"] or q["by_precision"]["fp32"]["macs"] == 0
    assert q["compute_uj"] < f["compute_uj"]
    assert q["weight_bytes"] < f["weight_bytes"] and q["activation_bytes"] < f["activation_bytes"]
    assert q["total_uj"] < f["total_uj"]


def test_inputs_from_data_and_random(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    data = np.random.default_rng(3).normal(size=(5, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "d.npy", data)
    proto = onnx.load(str(pair[0]))
    feeds = bench._feeds({"m": proto}, batch=2, data=tmp_path / "d.npy")
    np.testing.assert_array_equal(feeds["m"]["x"], data[:2])
    rand = bench.random_inputs(input_specs(proto), batch=3)
    assert rand["x"].shape == (3, 3, 16, 16) and rand["x"].dtype == np.float32


def lowbit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit.cli.main", *args], capture_output=True, text=True)


def test_cli_json_and_text(pair: tuple[Path, Path]) -> None:
    proc = lowbit_cli(
        "bench", str(pair[0]), str(pair[1]), "--runs", "4", "--warmup", "1", "--json", "--no-profile", "--quiet"
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert list(data["ratios"]["1"]) == [str(pair[0]), str(pair[1])]
    assert "op_time_ms" not in data["models"][str(pair[0])]
    text = bench_text(data)
    assert "ESTIMATE" in text and "int8.onnx" in text and "p99" in text


def bench_text(data: dict) -> str:
    from lowbit.cli.bench_cmd import text

    return text(data)


@pytest.mark.parametrize(
    "args, words",
    [
        (["missing.onnx"], ["not found"]),
        (["{bad}"], ["not a readable ONNX model"]),
        (["{model}", "--threads", "0"], ["thread count"]),
        (["{model}", "--threads", "two"], ["thread count"]),
        (["{model}", "--threads", "1", "1"], ["twice"]),
        (["{model}", "--runs", "0"], ["runs"]),
        (["{model}", "--batch", "x"], ["--batch"]),
        (["{model}", "--data", "{bad}"], ["unsupported data file"]),
    ],
)
def test_user_errors_are_one_line(
    args: list[str], words: list[str], tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture
) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not protobuf \xff\xff")
    args = [a.format(bad=bad, model=pair[0]) for a in args]
    assert main(["bench", *args, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lowbit: error:"), err
    for w in words:
        assert w.lower() in err.lower(), err


def test_exporter_padding_subgraph_is_counted_and_model_untouched() -> None:
    # Pad sizes computed by a constant subgraph, as exporters write them: shape inference alone cannot see
    # through it, the prepare passes fold it.
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")]
    nodes = [
        helper.make_node("Constant", [], ["p0"], value=numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64))),
        helper.make_node("Constant", [], ["p1"], value=numpy_helper.from_array(np.array([0, 0, 1, 1], np.int64))),
        helper.make_node("Concat", ["p0", "p1"], ["pads"], axis=0),
        helper.make_node("Pad", ["x", "pads"], ["xp"]),
        helper.make_node("Conv", ["xp", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "pad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    before = model.SerializeToString()
    counts = count_ops(model, 2)
    assert counts["uncounted"] == []
    assert counts["macs"] == {"fp32": 2 * 4 * 6 * 6 * 27}
    assert model.SerializeToString() == before
