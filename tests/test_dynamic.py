"""Dynamic quantization: int8 weights, uint8 activations quantized per input at run time."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import lowbit
from conftest import tiny_cnn
from helpers import model, node, op_counts, optimized, rel_rms, run, samples, weight
from lowbit import LowbitError, Recipe, Rule, Scheme
from lowbit.numerics import dequantize

DYNAMIC = Recipe(default=Scheme(mode="dynamic"))


def mlp(d: int = 16, f: int = 48) -> onnx.ModelProto:
    """Transformer-like block: x -> MatMul -> Relu -> MatMul -> residual Add, plus a second projection of x."""
    return model(
        [
            node("MatMul", ["x", "w1"], ["h"], "up"),
            node("Relu", ["h"], ["r"], "act"),
            node("MatMul", ["r", "w2"], ["o"], "down"),
            node("Add", ["x", "o"], ["s"], "residual"),
            node("MatMul", ["x", "w3"], ["p"], "proj"),
            node("Add", ["s", "p"], ["y"], "out"),
        ],
        {"x": (2, 5, d)},
        {"y": (2, 5, d)},
        {"w1": weight((d, f), 1, 0.3), "w2": weight((f, d), 2, 0.3), "w3": weight((d, d), 3, 0.3)},
    )


def test_dynamic_matmuls_are_integer_and_close_to_float():
    m = mlp()
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)  # no calibration data needed
    counts = op_counts(res.model)
    assert counts["MatMulInteger"] == 3 and counts["MatMul"] == 0
    assert counts["DynamicQuantizeLinear"] == 2  # x is quantized once for both of its MatMuls
    assert counts["QuantizeLinear"] == 0
    feeds = samples(m, 8)
    ref = run(m, feeds, float_model=True)[0]
    for mode in ("simulate", "kernels"):
        assert rel_rms(ref, run(res.model, feeds, mode=mode)[0]) < 0.02
    fused = op_counts(optimized(res.model))
    # ORT's fused integer kernels; a shared DynamicQuantizeLinear feeds MatMulIntegerToFloat directly.
    assert fused["MatMul"] == 0 and fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 3
    nodes = res.plan.nodes
    assert nodes["up"].quantized and "dynamic int8" in nodes["up"].reason and nodes["up"].rule == "default"
    assert not nodes["residual"].quantized and "embedding tables only" in nodes["residual"].reason
    p = res.plan.tensors["up:1"]
    assert p.dtype == "int8" and p.kind == "weight" and len(p.scale) == 48


def test_dynamic_mode_stores_embedding_tables_int8():
    # A transformer's word-embedding table is most of its file; left float, "dynamic int8" would be 65% of float.
    d, v = 32, 400
    m = model(
        [node("Gather", ["table", "ids"], ["e"], "emb"), node("MatMul", ["e", "w"], ["y"], "proj")],
        {"ids": (2, 6)},
        {"y": (2, 6, d)},
        {"table": weight((v, d), 4), "w": weight((d, d), 5, 0.3)},
    )
    m.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    # one scale for this Gaussian table: it reaches 30 dB with it (ops/granularity.py, tests/test_dynamic_forms.py)
    assert res.plan.nodes["emb"].quantized and "int8 per-tensor" in res.plan.nodes["emb"].reason
    assert res.plan.nodes["proj"].quantized and "dynamic int8" in res.plan.nodes["proj"].reason
    assert res.quantized_bytes < 0.3 * res.float_bytes
    ids = {"ids": np.random.default_rng(1).integers(0, v, (2, 6))}
    assert rel_rms(run(m, [ids], float_model=True)[0], run(res.model, [ids], mode="kernels")[0]) < 0.02


def test_output_carries_no_inferred_shapes(tmp_path):
    # Written-out symbolic shapes made ORT fuse Add+LayerNormalization into its slower SkipLayerNormalization.
    m = mlp()
    assert not m.graph.value_info
    res = lowbit.quantize(m, tmp_path / "q.onnx", recipe=DYNAMIC, progress=False)
    assert len(res.model.graph.value_info) == 0
    assert len(onnx.load(str(tmp_path / "q.onnx")).graph.value_info) == 0
    assert [o.type for o in res.model.graph.output] == [o.type for o in m.graph.output]  # outputs keep their shapes


def test_dynamic_weights_match_the_plan():
    m = mlp()
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    q = next(onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == "down_w_q")
    p = res.plan.tensors["down:1"]
    w = onnx.numpy_helper.to_array(m.graph.initializer[1])
    deq = dequantize(q, np.asarray(p.scale, np.float32), np.asarray(p.zero_point), axis=1)
    assert np.abs(deq - w).max() <= max(p.scale) * 0.5 + 1e-6


def test_dynamic_gemm_with_bias_and_transb():
    d, n = 12, 7
    m = model(
        [node("Gemm", ["x", "w", "b"], ["y"], "fc", transB=1, alpha=0.5, beta=2.0)],
        {"x": (4, d)},
        {"y": (4, n)},
        {"w": weight((n, d), 4), "b": weight((n,), 5)},
    )
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    assert op_counts(res.model)["MatMulInteger"] == 1 and op_counts(res.model)["Gemm"] == 0
    feeds = samples(m, 4)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 0.02


def test_convolutions_stay_float_without_data_and_go_static_with_it():
    m = tiny_cnn()
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    assert not res.plan.nodes["conv1"].quantized
    assert "several times slower than float" in res.plan.nodes["conv1"].reason
    assert res.plan.nodes["fc"].quantized and "dynamic" in res.plan.nodes["fc"].reason
    assert op_counts(res.model)["ConvInteger"] == 0
    feeds = [{"x": np.random.default_rng(i).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)} for i in range(8)]
    calib = [f["x"] for f in feeds]
    res = lowbit.quantize(m, calib=calib, recipe=DYNAMIC, progress=False)
    assert res.plan.nodes["conv1"].quantized and "conv1:1" in res.plan.tensors
    assert res.plan.tensors["conv1:1"].dtype == "int8" and op_counts(res.model)["DequantizeLinear"] > 0
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds)[0]) < 0.1


def test_recurrent_ops_stay_float_with_a_reason():
    m = model(
        [node("GRU", ["x", "W", "R"], ["y", "h"], "gru", hidden_size=4)],
        {"x": (3, 1, 5)},
        {"y": (3, 1, 1, 4), "h": (1, 1, 4)},
        {"W": weight((1, 12, 5)), "R": weight((1, 12, 4))},
    )
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    assert not res.plan.nodes["gru"].quantized and "no dynamic integer GRU kernel" in res.plan.nodes["gru"].reason


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"mode": "dynamic", "activations": "uint16"}, "dynamic mode quantizes activations to uint8"),
        ({"mode": "dynamic", "weights": "uint8", "symmetric_weights": False}, "dynamic mode needs int8 weights"),
        ({"mode": "sometimes"}, "'mode' must be one of"),
    ],
)
def test_conflicting_dynamic_options_are_one_line_errors(bad, match):
    with pytest.raises(LowbitError, match=match) as e:
        Recipe.from_dict({"default": bad})
    assert "\n" not in str(e.value)


def test_static_recipe_still_needs_data():
    with pytest.raises(LowbitError, match="calibration data is required"):
        lowbit.quantize(
            mlp(),
            recipe=Recipe(rules=(Rule(op_types=("Add",), scheme=Scheme()),), default=Scheme(mode="dynamic")),
            progress=False,
        )
