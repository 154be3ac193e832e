"""Weight-only quantization: int8 per-channel weights behind DequantizeLinear, int4 blocks as MatMulNBits,
embedding tables gathered from int8 / int4 rows; activations stay float."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lowbit
from conftest import tiny_cnn
from helpers import model, node, op_counts, rel_rms, run, samples, weight
from lowbit import LowbitError, Recipe, Scheme
from lowbit.weights import quantize_blocks


def int4(block: int = 32, symmetric: bool = True) -> Recipe:
    return Recipe(default=Scheme(mode="weight_only", weights="int4", block_size=block, symmetric_weights=symmetric))


def linear(k: int = 80, n: int = 24) -> onnx.ModelProto:
    return model(
        [node("MatMul", ["x", "w"], ["y"], "proj")], {"x": (3, 4, k)}, {"y": (3, 4, n)}, {"w": weight((k, n), 7)}
    )


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block", [32, 64])
def test_matmulnbits_computes_with_lowbits_own_dequantized_weights(block, symmetric):
    m = linear()  # K = 80: the last block is partial
    res = lowbit.quantize(m, recipe=int4(block, symmetric), progress=False)
    assert op_counts(res.model)["MatMulNBits"] == 1 and op_counts(res.model)["MatMul"] == 0
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    deq = quantize_blocks(w.T, block, symmetric).dequantize().T
    feeds = samples(m, 4)
    got = run(res.model, feeds, mode="kernels")[0]
    want = np.concatenate([f["x"] @ deq for f in feeds])
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    ref = run(m, feeds, float_model=True)[0]
    assert rel_rms(ref, got) < 0.15  # 4-bit weights: a real, bounded error
    assert res.plan.tensors["proj:1"].dtype == "int4"
    assert "MatMulNBits" in res.plan.nodes["proj"].reason and f"blocks of {block}" in res.plan.nodes["proj"].reason


def test_int4_rounding_error_is_within_half_a_step():
    w = weight((5, 70), 3)
    b = quantize_blocks(w, 32, symmetric=False)
    err = np.abs(b.dequantize() - w).reshape(5, -1)
    steps = np.repeat(b.scale, 32, axis=1)[:, :70]
    assert np.all(err <= steps / 2 + 1e-6)


def test_int4_is_smaller_and_gemm_bias_transb_handled():
    d, n = 64, 32
    m = model(
        [node("Gemm", ["x", "w", "b"], ["y"], "fc", transB=1, alpha=2.0)],
        {"x": (4, d)},
        {"y": (4, n)},
        {"w": weight((n, d), 4), "b": weight((n,), 5)},
    )
    res = lowbit.quantize(m, recipe=int4(), progress=False)
    feeds = samples(m, 4)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 0.15
    assert res.quantized_bytes < 0.4 * res.float_bytes


def test_int8_weight_only_keeps_float_activations():
    m = tiny_cnn()
    res = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="weight_only")), progress=False)
    counts = op_counts(res.model)
    assert counts["QuantizeLinear"] == 0 and counts["DequantizeLinear"] == 3  # conv1, conv2, fc weights
    assert counts["Conv"] == 2 and counts["Gemm"] == 1
    feeds = [{"x": np.random.default_rng(i).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)} for i in range(4)]
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds, mode="kernels")[0]) < 0.02
    assert res.plan.nodes["fc"].reason.startswith("weight-only int8 per-channel")
    assert not res.plan.nodes["add"].quantized and "no weights" in res.plan.nodes["add"].reason


def embedding(v: int = 50, d: int = 64, opset: int = 17) -> onnx.ModelProto:
    table = weight((v, d), 9)
    g = helper.make_graph(
        [node("Gather", ["table", "ids"], ["e"], "emb"), node("Relu", ["e"], ["y"], "relu")],
        "emb",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, d])],
        [onnx.numpy_helper.from_array(table, "table")],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize(
    "recipe",
    [Recipe(default=Scheme(mode="weight_only")), int4(32), int4(32, False)],
    ids=["int8", "int4", "int4-affine"],
)
def test_embedding_rows(recipe):
    m = embedding()
    res = lowbit.quantize(m, recipe=recipe, progress=False)
    ids = {"ids": np.random.default_rng(0).integers(0, 50, (2, 6))}
    ref, got = run(m, [ids], float_model=True)[0], run(res.model, [ids], mode="kernels")[0]
    limit = 0.01 if recipe.default.weights == "int8" else 0.15
    assert rel_rms(ref, got) < limit
    assert res.plan.nodes["emb"].quantized and "Gather" not in [
        n.op_type for n in res.model.graph.node if n.input and n.input[0] == "table"
    ]
    # + a scale per row (block); int4 also a few unpacking nodes, which weigh in this 13 KB toy
    assert res.quantized_bytes < (0.32 if recipe.default.weights == "int8" else 0.25) * res.float_bytes


def test_int4_on_a_conv_is_a_one_line_error():
    rec = Recipe(default=Scheme(mode="weight_only", weights="int4"))
    with pytest.raises(LowbitError, match="int4 weights cannot be used on Conv node 'conv1'") as e:
        lowbit.quantize(tiny_cnn(), recipe=rec, progress=False)
    assert "\n" not in str(e.value)
    # The preset keeps convolutions int8.
    res = lowbit.quantize(tiny_cnn(), recipe=lowbit.recipe.preset("weight-only-int4"), progress=False)
    assert res.plan.nodes["conv1"].quantized and "int8" in res.plan.nodes["conv1"].reason
    assert "MatMulNBits" in res.plan.nodes["fc"].reason


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"mode": "dynamic", "weights": "int4"}, "int4 weights need mode weight_only or static"),
        ({"weights": "int4", "block_size": 32}, "block_size applies to weight_only int4"),
        ({"mode": "weight_only", "block_size": 32}, "block_size applies to weight_only int4"),
        ({"mode": "weight_only", "weights": "int4", "block_size": 48}, "'block_size' must be one of"),
    ],
)
def test_bad_int4_options(bad, match):
    with pytest.raises(LowbitError, match=match):
        Recipe.from_dict({"default": bad})
