"""SmoothQuant: the float function stays the same, activation outliers move into the weights, and only producers
that absorb the division exactly are used."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import run_cli
from lowbit.passes.smooth import find_targets, observe_absmax, smooth

RNG = np.random.default_rng(0)
D, H = 16, 24


def _block() -> onnx.ModelProto:
    """A post-LN transformer block in miniature: LayerNorm read by two MatMuls and a residual Add; a GELU ending in
    `* 0.5` read by a Gemm (transB); a MatMul after a Reshape (not smoothable)."""
    inits = {
        "g": RNG.uniform(0.5, 1.5, D).astype(np.float32) * np.where(np.arange(D) == 3, 20, 1).astype(np.float32),
        "b": RNG.normal(0, 0.1, D).astype(np.float32),
        "wq": RNG.normal(0, 0.2, (D, D)).astype(np.float32),
        "wk": RNG.normal(0, 0.2, (D, D)).astype(np.float32),
        "w1": RNG.normal(0, 0.2, (D, H)).astype(np.float32),
        "w2t": RNG.normal(0, 0.2, (D, H)).astype(np.float32),  # Gemm transB: [N, K]
        "half": np.array(0.5, np.float32),
        "sqrt2": np.array(np.sqrt(2), np.float32),
        "one": np.array(1, np.float32),
        "w3": RNG.normal(0, 0.2, (D, D)).astype(np.float32),
    }
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], axis=-1),
        helper.make_node("MatMul", ["ln", "wq"], ["q"]),
        helper.make_node("MatMul", ["ln", "wk"], ["k"]),
        helper.make_node("Add", ["q", "k"], ["qk"]),
        helper.make_node("Add", ["qk", "ln"], ["res"]),  # the residual also reads ln
        helper.make_node("MatMul", ["res", "w1"], ["h"]),
        helper.make_node("Div", ["h", "sqrt2"], ["hd"]),
        helper.make_node("Erf", ["hd"], ["he"]),
        helper.make_node("Add", ["he", "one"], ["he1"]),
        helper.make_node("Mul", ["h", "he1"], ["hm"]),
        helper.make_node("Mul", ["hm", "half"], ["gelu"]),
        helper.make_node("Gemm", ["gelu", "w2t"], ["y"], transB=1),
        helper.make_node("Reshape", ["res", "shape2"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w3"], ["z"]),
    ]
    inits["shape2"] = np.array([-1, D], np.int64)
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", D]),
        ],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int, seed: int) -> np.ndarray:
    # LayerNorm's scale makes channel 3 twenty times wider than the rest, as trained transformers' scales do.
    return np.random.default_rng(seed).normal(0, 1, (n, D)).astype(np.float32)


def _run(model: onnx.ModelProto | bytes, x: np.ndarray) -> list[np.ndarray]:
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_targets_are_the_exactly_foldable_producers() -> None:
    m = ir.from_proto(_block())
    found = {t.producer.op_type: [r.op_type for r in t.readers] for t in find_targets(m)}
    assert found == {"LayerNormalization": ["MatMul", "MatMul"], "Mul": ["Gemm"]}  # not the MatMuls after Add, Reshape


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_smoothing_keeps_the_float_function_and_flattens_the_outliers(alpha: float) -> None:
    model = _block()
    m = ir.from_proto(model)
    batches = [{"x": _data(32, 1)}]
    names = [str(t.x.name) for t in find_targets(m)]
    before = observe_absmax(m, names, batches)
    scales = smooth(m, alpha, batches)
    assert set(scales) == set(names)
    out = ir.to_proto(m)
    x = _data(64, 2)
    for got, ref in zip(_run(out, x), _run(model, x)):
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    # The MatMuls now read a twin of the LayerNorm whose channels are flatter; the residual reads the original.
    twins = [n for n in m.graph if n.op_type == "LayerNormalization"]
    assert len(twins) == 2
    smoothed = str(twins[1].outputs[0].name)
    after = observe_absmax(m, [smoothed, "gelu"], batches)
    ratio = lambda a: float(a.max() / np.median(a))  # noqa: E731
    assert ratio(after[smoothed]) < 0.75 * ratio(before["ln"])
    assert ratio(after["gelu"]) < ratio(before["gelu"])


def _residual_block() -> onnx.ModelProto:
    """MatMul -> bias Add -> residual Add -> LayerNorm, the weight giving output channel 5 a 40x wider range."""
    w = RNG.normal(0, 0.2, (D, D)).astype(np.float32)
    w[:, 5] *= 40
    inits = {
        "w": w,
        "bias": RNG.normal(0, 0.1, D).astype(np.float32),
        "g": np.ones(D, np.float32),
        "b": np.zeros(D, np.float32),
    }
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("MatMul", ["r", "w"], ["m"]),
        helper.make_node("Add", ["m", "bias"], ["mb"]),
        helper.make_node("Add", ["mb", "x"], ["res"]),
        helper.make_node("LayerNormalization", ["res", "g", "b"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "residual",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_output_outliers_move_into_a_float_mul_before_the_residual(tmp_path: Path) -> None:
    model = _residual_block()
    m = ir.from_proto(model)
    recorded = smooth(m, 0.5, [{"x": _data(64, 6)}])
    assert list(recorded) == ["m (output)"]  # no input target: Relu absorbs nothing
    t = np.asarray(recorded["m (output)"])
    assert t[5] > 10 and np.count_nonzero(t > 1) <= 2
    x = _data(64, 7)
    ref = _run(model, x)[0]
    np.testing.assert_allclose(_run(ir.to_proto(m), x)[0], ref, rtol=0, atol=1e-5 * float(np.abs(ref).max()))
    path = tmp_path / "r.onnx"
    onnx.save(model, path)
    errs = {}
    for alpha in (None, 0.5):
        res = lowbit.quantize(path, calib=_data(64, 6), recipe=lowbit.Recipe(smooth_quant=alpha), progress=False)
        errs[alpha] = float(np.abs(_run(res.model, x)[0] - ref).mean())
        if alpha is not None:
            restore = [k for k in res.plan.nodes if k.endswith("_restore")]
            assert len(restore) == 1 and not res.plan.nodes[restore[0]].quantized  # the Mul stays float
    assert errs[0.5] < 0.5 * errs[None]


def test_plan_records_scales_and_replays_them(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_block(), path)
    calib = _data(64, 3)
    x = _data(128, 4)
    ref = _run(onnx.load(path), x)[0]
    errs = {}
    for alpha in (None, 0.5):
        recipe = lowbit.Recipe(smooth_quant=alpha)
        res = lowbit.quantize(path, tmp_path / f"q{alpha}.onnx", calib=calib, recipe=recipe, progress=False)
        assert res.plan.recipe["smooth_quant"] == alpha
        assert bool(res.plan.smooth_scales) is (alpha is not None)
        errs[alpha] = float(np.abs(_run(res.model, x)[0] - ref).mean())
    assert errs[0.5] < errs[None]  # the outlier channel no longer sets the activation step
    again = lowbit.quantize(path, tmp_path / "again.onnx", plan=tmp_path / "q0.5.plan.json", progress=False)
    assert (tmp_path / "again.onnx").read_bytes() == (tmp_path / "q0.5.onnx").read_bytes()
    assert again.plan.smooth_scales == res.plan.smooth_scales


def test_bad_options_are_one_line_errors(tmp_path: Path) -> None:
    for bad in (1.5, -0.1, "0.5", True):
        with pytest.raises(lowbit.LowbitError, match="smooth_quant"):
            lowbit.Recipe(smooth_quant=bad)  # type: ignore[arg-type]
    path = tmp_path / "m.onnx"
    onnx.save(_block(), path)
    with pytest.raises(lowbit.LowbitError, match="calibration data"):
        lowbit.quantize(path, recipe=lowbit.Recipe(default=lowbit.Scheme(mode="dynamic"), smooth_quant=0.5))


def test_cli_flags_reach_the_plan_and_bad_alpha_is_exit_2(tmp_path: Path) -> None:
    onnx.save(_block(), tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", _data(32, 5))
    args = ["quantize", str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "x.npy"), "--quiet", "--check", "0"]
    args += ["--no-speed-check"]
    done = run_cli(*args, "--smooth-quant", "--equalize", "-o", str(tmp_path / "a.onnx"))
    assert done.returncode == 0, done.stderr
    recipe = json.loads((tmp_path / "a.plan.json").read_text())["recipe"]
    assert recipe["smooth_quant"] == 0.7 and recipe["equalize"] is True
    done = run_cli(*args, "--smooth-quant", "0.5", "-o", str(tmp_path / "b.onnx"))
    assert json.loads((tmp_path / "b.plan.json").read_text())["recipe"]["smooth_quant"] == 0.5
    bad = run_cli(*args, "--smooth-quant", "2", "-o", str(tmp_path / "c.onnx"))
    assert bad.returncode == 2 and "smooth_quant" in bad.stderr and "Traceback" not in bad.stderr
    # A plan records the recipe: re-applying it takes no recipe option.
    again = run_cli(
        "quantize",
        str(tmp_path / "m.onnx"),
        "--plan",
        str(tmp_path / "a.plan.json"),
        "--quiet",
        "--check",
        "0",
        "--no-speed-check",
        "-o",
        str(tmp_path / "d.onnx"),
    )
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "d.onnx").read_bytes() == (tmp_path / "a.onnx").read_bytes()


@pytest.mark.slow
def test_minilm_smoothing_is_exact_in_float_and_lifts_static_int8(tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2: smoothing (18 inputs through LayerNorm twins and GELU's `* 0.5`, 12 outputs into
    the residual sums) leaves the float embedding as it was, and static int8 with alpha 0.7 reaches the issue's
    target, mean cosine >= 0.99 vs float on held-out sentences (0.93 without: bench/RESULTS_RECOVER.md)."""
    from lowbit.passes import prepare
    from lowbit.pipeline import load
    from lowbit_zoo.zoo import minilm_onnx, minilm_tokenize, text_sentences

    model = minilm_onnx(tmp_path / "minilm.onnx")
    calib = minilm_tokenize(text_sentences(64, "calib"))
    sentences = text_sentences(128, "eval")
    m = load(str(model)).model
    prepare(m)
    plain = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    scales = smooth(m, 0.7, [calib])
    assert len(scales) == 30
    smoothed = ort.InferenceSession(ir.to_proto(m).SerializeToString(), providers=["CPUExecutionProvider"])
    np.savez(tmp_path / "calib.npz", **calib)
    res = lowbit.quantize(model, calib=tmp_path / "calib.npz", recipe=lowbit.Recipe(smooth_quant=0.7), progress=False)
    quantized = ort.InferenceSession(res.model.SerializeToString(), providers=["CPUExecutionProvider"])
    cos = []
    for i in range(0, len(sentences), 32):
        feeds = minilm_tokenize(sentences[i : i + 32])
        ref = plain.run(None, feeds)[0]
        np.testing.assert_allclose(smoothed.run(None, feeds)[0], ref, rtol=0, atol=1e-5)  # unit-norm embeddings
        q = quantized.run(None, feeds)[0]
        cos.append((q * ref).sum(1) / np.linalg.norm(q, axis=1) / np.linalg.norm(ref, axis=1))
    assert np.concatenate(cos).mean() >= 0.99


def test_a_damaged_plan_scale_is_a_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(_block(), path)
    lowbit.quantize(
        path, tmp_path / "q.onnx", calib=_data(32, 8), recipe=lowbit.Recipe(smooth_quant=0.5), progress=False
    )
    plan_file = tmp_path / "q.plan.json"
    good = json.loads(plan_file.read_text())
    for damage in ([-1.0] * D, ["x"] * D, [1.0] * (D - 1)):
        plan = json.loads(json.dumps(good))
        plan["smooth_scales"]["ln"] = damage
        plan_file.write_text(json.dumps(plan))
        with pytest.raises(lowbit.LowbitError, match="SmoothQuant scales for 'ln'"):
            lowbit.quantize(path, plan=plan_file, progress=False)
