"""Models with external data (what models past 2 GB must be): a small transformer-style model saved with its
weights in `float.onnx.data` goes down the same path as a large one. Its output is `OUT.onnx` + `OUT.onnx.data`,
written with its plan (all or nothing), valid for the path-based checker, runnable in ONNX Runtime from its path
and independent of the float model's files. The size thresholds (`graph.external.FILE_BYTES`, `LIMIT_BYTES`) are
lowered so that in-memory models also go through temporary files, as a large one does. The 2.5 GB run is
`bench/large.py` (bench/RESULTS_LARGE.md), not a test."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import lowbit
from conftest import run_cli, tiny_cnn
from lowbit.errors import LowbitError
from lowbit.graph import external
from lowbit.plan import Plan
from lowbit.runtimes import ort as ort_runtime

VOCAB, D, SEQ = 2000, 128, 8
MODES = ["weight_only", "dynamic", "static"]


def tiny_transformer(seed: int = 0) -> onnx.ModelProto:
    """Embedding Gather, then one attention block (QKV/out MatMuls, Softmax) and an FFN with LayerNorms."""
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []

    def w(name: str, *shape: int) -> str:
        inits.append(onnx.numpy_helper.from_array((rng.standard_normal(shape) * 0.05).astype(np.float32), name))
        return name

    def ones(name: str, value: float) -> str:
        inits.append(onnx.numpy_helper.from_array(np.full(D, value, np.float32), name))
        return name

    nodes = [helper.make_node("Gather", [w("embed", VOCAB, D), "tokens"], ["x"], name="embed_gather")]
    nodes.append(helper.make_node("LayerNormalization", ["x", ones("g1", 1), ones("b1", 0)], ["h"], name="ln1"))
    for k in "qkv":
        nodes.append(helper.make_node("MatMul", ["h", w(f"w{k}", D, D)], [k], name=f"mm_{k}"))
    nodes.append(helper.make_node("Transpose", ["k"], ["kt"], name="kt", perm=[0, 2, 1]))
    nodes.append(helper.make_node("MatMul", ["q", "kt"], ["s"], name="scores"))
    nodes.append(helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1))
    nodes.append(helper.make_node("MatMul", ["p", "v"], ["a"], name="attend"))
    nodes.append(helper.make_node("MatMul", ["a", w("wo", D, D)], ["o"], name="mm_o"))
    nodes.append(helper.make_node("Add", ["x", "o"], ["r"], name="res1"))
    nodes.append(helper.make_node("LayerNormalization", ["r", ones("g2", 1), ones("b2", 0)], ["h2"], name="ln2"))
    nodes.append(helper.make_node("MatMul", ["h2", w("w1", D, 4 * D)], ["f"], name="ff1"))
    nodes.append(helper.make_node("Relu", ["f"], ["fr"], name="relu"))
    nodes.append(helper.make_node("MatMul", ["fr", w("w2", 4 * D, D)], ["f2"], name="ff2"))
    nodes.append(helper.make_node("Add", ["r", "f2"], ["hidden"], name="res2"))
    graph = helper.make_graph(
        nodes,
        "tiny_transformer",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", SEQ])],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", SEQ, D])],
        initializer=inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


@pytest.fixture
def small_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """The tiny transformer (~2.8 MB) with external data in its own folder, and random-token calibration data;
    in-memory models past 64 KiB are run and checked through temporary files, as large ones are."""
    monkeypatch.setattr(external, "FILE_BYTES", 64 * 1024)
    folder = tmp_path / "float"
    folder.mkdir()
    model = folder / "float.onnx"
    onnx.save_model(  # every weight external, even LayerNorm's 512 bytes
        tiny_transformer(), str(model), save_as_external_data=True, location="float.onnx.data", size_threshold=0
    )
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).integers(0, VOCAB, (16, SEQ), dtype=np.int64))
    return model, calib


def run(path: Path, tokens: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"tokens": tokens})[0]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def assert_external_pair(out: Path) -> None:
    """OUT.onnx keeps only the graph; every large weight is in OUT.onnx.data, whose hash the .onnx records, and
    the plan records the hash of the .onnx."""
    data = external.data_path(out)
    assert data.is_file() and data.stat().st_size > 10 * out.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    places = {
        e.value for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL for e in t.external_data
    }
    assert data.name in places and not any(p.endswith("float.onnx.data") for p in places)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[external.DATA_SHA256_KEY] == hashlib.sha256(data.read_bytes()).hexdigest()
    plan = Plan.load(out.with_suffix(".plan.json"))
    assert plan.model_sha256 == hashlib.sha256(out.read_bytes()).hexdigest()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("mode", MODES)
def test_external_data_input_is_quantized_to_a_runnable_model_and_data_pair(
    small_external: tuple[Path, Path], tmp_path: Path, mode: str
) -> None:
    model, calib = small_external
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    r = run_cli("quantize", str(model), "-o", str(out), "--mode", mode, "--calib", str(calib), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}, {out}.data and" in r.stdout
    assert_external_pair(out)
    onnx.checker.check_model(str(out))  # by path: the checker reads the data file's layout too
    # Moved away from the float model's folder (which is then gone), the pair still runs: nothing refers back.
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in (out, external.data_path(out)):
        shutil.copy(f, moved / f.name)
    tokens = np.random.default_rng(2).integers(0, VOCAB, (2, SEQ), dtype=np.int64)
    ref = run(model, tokens)
    shutil.rmtree(model.parent)
    got = run(moved / out.name, tokens)
    assert cosine(ref, got) > 0.99
    assert not np.array_equal(ref, got)  # it is the quantized model that ran


def test_calibration_reads_external_weights_from_the_model_folder_not_the_working_one(
    small_external: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, calib = small_external
    monkeypatch.chdir(tmp_path)  # ONNX Runtime resolves external data of a model given as bytes against this
    res = lowbit.quantize(model, tmp_path / "q.onnx", calib=calib, progress=False)
    assert res.external_data
    # Counted with its data file, the float model is what its weights weigh, not the graph alone.
    assert res.float_bytes > model.with_name("float.onnx.data").stat().st_size
    assert_external_pair(tmp_path / "q.onnx")
    # The returned model holds its weights: it runs in memory, without the files.
    assert not external.has_external(res.model)
    tokens = np.zeros((1, SEQ), np.int64)
    sess = ort_runtime.session(res.model)
    np.testing.assert_array_equal(sess.run(None, {"tokens": tokens})[0], run(tmp_path / "q.onnx", tokens))


def test_same_inputs_give_the_same_model_and_data_bytes(small_external: tuple[Path, Path], tmp_path: Path) -> None:
    model, calib = small_external
    outs = [tmp_path / "a" / "q.onnx", tmp_path / "b" / "q.onnx"]  # the .onnx names its data file
    for out in outs:
        out.parent.mkdir()
        lowbit.quantize(model, out, calib=calib, progress=False)
    for f in (lambda p: p, external.data_path):
        assert f(outs[0]).read_bytes() == f(outs[1]).read_bytes()


def test_a_model_past_the_size_limit_is_written_with_external_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float model held in one file whose output would pass protobuf's limit (lowered here) is written as
    model + data, and still checks and runs; below the limit it stays one file."""
    src = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(), str(src))
    lowbit.quantize(src, tmp_path / "small.onnx", recipe=lowbit.Recipe.from_dict({"default": {"mode": "dynamic"}}))
    assert not external.data_path(tmp_path / "small.onnx").exists()
    monkeypatch.setattr(external, "LIMIT_BYTES", 1024)
    out = tmp_path / "big.onnx"
    res = lowbit.quantize(src, out, recipe=lowbit.Recipe.from_dict({"default": {"mode": "dynamic"}}))
    assert not res.external_data
    assert external.data_path(out).is_file()
    onnx.checker.check_model(str(out))
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    want = ort_runtime.session(res.model).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(want, got)


def _old_outputs(out: Path) -> dict[Path, bytes]:
    files = {out: b"old model", out.with_suffix(".plan.json"): b"old plan", external.data_path(out): b"old data"}
    for p, b in files.items():
        p.write_bytes(b)
    return files


def test_a_failure_while_writing_the_data_file_leaves_the_old_files_and_no_temporaries(
    small_external: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, calib = small_external
    out = tmp_path / "q.onnx"
    old = _old_outputs(out)
    real = external.external_form

    def disk_full(proto: onnx.ModelProto, data, location: str) -> onnx.ModelProto:  # noqa: ANN001
        data.write(b"x" * 4096)  # part of the data was written, then the disk filled up
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(external, "external_form", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lowbit.quantize(model, out, calib=calib, progress=False)
    assert {p: p.read_bytes() for p in old} == old
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(external, "external_form", real)
    lowbit.quantize(model, out, calib=calib, progress=False)  # and the next run replaces all three
    assert_external_pair(out)


def test_an_unwritable_data_target_is_refused_before_any_work(
    small_external: tuple[Path, Path], tmp_path: Path
) -> None:
    model, calib = small_external
    out = tmp_path / "q.onnx"
    external.data_path(out).mkdir()  # OUT.onnx.data is a folder: the data file could never be renamed there
    r = run_cli("quantize", str(model), "-o", str(out), "--calib", str(calib), "--quiet")
    assert r.returncode == 2 and "external data file (beside -o)" in r.stderr and "folder" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npy", "float", "q.onnx.data"]


def test_output_whose_data_file_is_the_input_data_is_refused(tmp_path: Path) -> None:
    """-o q.onnx would write q.onnx.data: refused when that is the float model's own data file."""
    folder = tmp_path / "m"
    folder.mkdir()
    model = folder / "float.onnx"
    onnx.save_model(tiny_transformer(), str(model), save_as_external_data=True, location="q.onnx.data")
    with pytest.raises(LowbitError, match="external data file .* input model's external data"):
        lowbit.quantize(model, folder / "q.onnx", recipe=lowbit.Recipe.from_dict({"default": {"mode": "dynamic"}}))
    onnx.checker.check_model(str(model))  # untouched


def test_sessions_of_large_in_memory_models_go_through_files(monkeypatch: pytest.MonkeyPatch) -> None:
    m = tiny_transformer()
    tokens = np.arange(2 * SEQ, dtype=np.int64).reshape(2, SEQ)
    want = ort_runtime.session(m).run(None, {"tokens": tokens})[0]  # from bytes
    monkeypatch.setattr(external, "FILE_BYTES", 1024)
    got = ort_runtime.session(m).run(None, {"tokens": tokens})[0]  # from a temporary file with external data
    np.testing.assert_array_equal(want, got)
    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(m)
    skeleton.graph.initializer[0].data_location = TensorProto.EXTERNAL
    with pytest.raises(ValueError, match="folder"):
        ort_runtime.from_proto(skeleton, ort.SessionOptions())


def test_float_weights_are_unmapped_as_soon_as_they_are_quantized(small_external: tuple[Path, Path]) -> None:
    """The rewrite streams weights: each memory-mapped float weight is closed once its node no longer reads it,
    while the weights left float (LayerNorm's) stay mapped until the verify stage copies them in."""
    import onnx_ir as ir

    from lowbit.apply import apply
    from lowbit.passes import prepare
    from lowbit.pipeline import load
    from lowbit.planner import make_layout

    model, _ = small_external
    loaded = load(model)
    prepare(loaded.model)
    recipe = lowbit.Recipe.from_dict({"default": {"mode": "weight_only"}})
    layout = make_layout(loaded.model, recipe, calibrated=False)
    mapped = {n: v.const_value for n, v in loaded.model.graph.initializers.items()}
    assert all(isinstance(t, ir.ExternalTensor) for t in mapped.values())
    for t in mapped.values():
        t.numpy()  # mapped, as reading the weights maps them
    apply(loaded.model, layout, Plan(recipe=recipe.to_dict()))
    quantized = ["embed", "wq", "wk", "wv", "wo", "w1", "w2"]
    assert [n for n in quantized if mapped[n].raw is not None] == []
    assert all(mapped[n].raw is not None for n in ["g1", "b1", "g2", "b2"])
