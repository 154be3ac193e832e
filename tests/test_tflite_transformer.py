"""Transformer ops in TFLite (float32, float16, dynamic-range) against ONNX Runtime, and MiniLM end to end."""

from __future__ import annotations

from pathlib import Path

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session

V, L, D, H = 50, 8, 32, 2  # vocabulary, tokens, width, heads


def _c(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def tiny_encoder() -> onnx.ModelProto:
    """Embedding + additive attention mask + one attention layer + erf-GELU MLP + masked mean + L2 norm."""
    rng = np.random.default_rng(0)
    w = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
    inits = [
        _c("emb", w(V, D)),
        _c("pos", w(1, L, D)),
        _c("g", 1 + w(D)),
        _c("b", w(D)),
        _c("wq", w(D, D)),
        _c("wk", w(D, D)),
        _c("wv", w(D, D)),
        _c("bq", w(D)),
        _c("w1", w(D, 2 * D)),
        _c("w2", w(2 * D, D)),
        _c("heads", np.array([1, L, H, D // H], np.int64)),
        _c("back", np.array([1, L, D], np.int64)),
        _c("one", np.float32(1)),
        _c("big", np.float32(-1e4)),
        _c("zero", np.float32(0)),
        _c("sqrt2", np.float32(np.sqrt(2))),
        _c("half", np.float32(0.5)),
        _c("scale", np.float32(D**-0.5)),
        _c("ax1", np.array([1], np.int64)),
        _c("ax12", np.array([1, 2], np.int64)),
        _c("eps", np.float32(1e-9)),
        _c("mshape", np.array([1, H, L, L], np.int64)),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["emb", "ids"], ["e"], name="embed"),
        n("Add", ["e", "pos"], ["e2"], name="add_pos"),
        n("LayerNormalization", ["e2", "g", "b"], ["h"], axis=-1, epsilon=1e-12, name="ln"),
        # mask: (1 - float(mask)) * -1e4, broadcast over heads and queries; also a bool path through Where
        n("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT, name="cast"),
        n("Sub", ["one", "mf"], ["inv"], name="inv"),
        n("Mul", ["inv", "big"], ["madd"], name="madd"),
        n("Unsqueeze", ["madd", "ax12"], ["m4"], name="unsq"),
        n("Expand", ["m4", "mshape"], ["m4e"], name="expand"),
        n("Cast", ["mask"], ["mb"], to=TensorProto.BOOL, name="cast_bool"),
        n("Unsqueeze", ["mb", "ax12"], ["mb4"], name="unsq_b"),
        n("Where", ["mb4", "zero", "big"], ["mw"], name="where"),
        n("Add", ["m4e", "mw"], ["mask4"], name="masks"),
        n("MatMul", ["h", "wq"], ["q0"], name="q"),
        n("Add", ["q0", "bq"], ["q1"], name="q_bias"),
        n("MatMul", ["h", "wk"], ["k0"], name="k"),
        n("MatMul", ["h", "wv"], ["v0"], name="v"),
        n("Reshape", ["q1", "heads"], ["q2"], name="q_heads"),
        n("Transpose", ["q2"], ["q3"], perm=[0, 2, 1, 3]),
        n("Reshape", ["k0", "heads"], ["k2"], name="k_heads"),
        n("Transpose", ["k2"], ["k3"], perm=[0, 2, 3, 1]),
        n("Reshape", ["v0", "heads"], ["v2"], name="v_heads"),
        n("Transpose", ["v2"], ["v3"], perm=[0, 2, 1, 3]),
        n("MatMul", ["q3", "k3"], ["s0"], name="scores"),
        n("Mul", ["s0", "scale"], ["s1"], name="scaled"),
        n("Add", ["s1", "mask4"], ["s2"], name="masked"),
        n("Softmax", ["s2"], ["p"], axis=-1, name="softmax"),
        n("MatMul", ["p", "v3"], ["c0"], name="context"),
        n("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["c1", "back"], ["c2"], name="merge"),
        n("Add", ["c2", "h"], ["r"], name="residual"),
        n("MatMul", ["r", "w1"], ["f0"], name="ff1"),
        n("Div", ["f0", "sqrt2"], ["f1"], name="gelu_div"),
        n("Erf", ["f1"], ["f2"], name="gelu_erf"),
        n("Add", ["f2", "one"], ["f3"], name="gelu_add"),
        n("Mul", ["f0", "f3"], ["f4"], name="gelu_mul"),
        n("Mul", ["f4", "half"], ["f5"], name="gelu_half"),
        n("MatMul", ["f5", "w2"], ["f6"], name="ff2"),
        n("Pow", ["f6", "two"], ["f7"], name="square"),
        n("Sqrt", ["f7"], ["f8"], name="sqrt"),
        n("Unsqueeze", ["mf", "neg1"], ["mf3"], name="unsq_m"),
        n("Mul", ["f8", "mf3"], ["f9"], name="apply_mask"),
        n("ReduceSum", ["f9", "ax1"], ["sum"], keepdims=0, name="pool_sum"),
        n("ReduceSum", ["mf3", "ax1"], ["cnt"], keepdims=0, name="pool_cnt"),
        n("Clip", ["cnt", "eps"], ["cnt1"], name="clip"),
        n("Div", ["sum", "cnt1"], ["mean"], name="pool"),
        n("ReduceL2", ["mean"], ["norm"], axes=[1], keepdims=1, name="l2"),
        n("Div", ["mean", "norm"], ["y"], name="normalize"),
    ]
    inits += [_c("two", np.float32(2)), _c("neg1", np.array([-1], np.int64))]
    graph = helper.make_graph(
        nodes,
        "enc",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, [1, L]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, [1, L]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_litert(data: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    it = litert.Interpreter(model_content=data, num_threads=1)
    it.allocate_tensors()
    for d in it.get_input_details():
        it.set_tensor(d["index"], feeds[d["name"]])
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _feeds(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((1, L), np.int64)
    mask[0, rng.integers(3, L) :] = 0
    return {"ids": rng.integers(0, V, (1, L)).astype(np.int64), "mask": mask}


def test_tiny_encoder_float_matches_ort():
    model = tiny_encoder()
    result = convert(model)
    for op in ("GATHER", "BATCH_MATMUL", "GELU", "RSQRT", "SELECT_V2", "BROADCAST_TO", "CAST", "SUM", "SQRT"):
        assert op in result.ops, op
    assert result.ops["FULLY_CONNECTED"] == 5 and result.ops["BATCH_MATMUL"] == 2 and result.ops["GELU"] == 1
    sess = session(model)
    for seed in range(3):
        feeds = _feeds(seed)
        np.testing.assert_allclose(run_litert(result.data, feeds), sess.run(None, feeds)[0], rtol=1e-4, atol=2e-6)


@pytest.mark.parametrize("precision,tol", [("float16", 2e-3), ("dynamic", 3e-2)])
def test_tiny_encoder_float16_and_dynamic_close_to_ort(precision, tol):
    model = tiny_encoder()
    result = convert(model, precision=precision)
    sess = session(model)
    for seed in range(3):
        feeds = _feeds(seed)
        y, ref = run_litert(result.data, feeds), sess.run(None, feeds)[0]
        assert np.abs(y - ref).max() < tol * np.abs(ref).max()


def test_symbolic_sequence_needs_shape(tmp_path: Path):
    model = tiny_encoder()
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.type.tensor_type.shape.dim[1].dim_param = "sequence"
    with pytest.raises(LowbitError, match=r"pass --shape ids=1xsequence with every name replaced"):
        convert(model)
    with pytest.raises(LowbitError, match="the model has no input tokens"):
        convert(model, shapes={"tokens": (1, L)})
    result = convert(model, shapes={"ids": (1, L), "mask": (1, L)})
    feeds = _feeds(0)
    np.testing.assert_allclose(
        run_litert(result.data, feeds), session(tiny_encoder()).run(None, feeds)[0], rtol=1e-4, atol=2e-6
    )


def test_lowbit_dynamic_mode_onnx_becomes_hybrid_kernels_with_its_own_weights():
    import lowbit

    model = tiny_encoder()
    dyn = lowbit.quantize(model, recipe=lowbit.Recipe(default=lowbit.Scheme(mode="dynamic")), progress=False).model
    assert sum(n.op_type == "MatMulInteger" for n in dyn.graph.node) == 5
    result = convert(dyn)
    assert result.precision == "dynamic" and result.ops["FULLY_CONNECTED"] == 5
    m = __import__("tflite.Model", fromlist=["Model"]).Model.GetRootAs(result.data, 0)
    sg = m.Subgraphs(0)
    in_file = {
        m.Buffers(sg.Tensors(i).Buffer()).DataAsNumpy().tobytes()
        for i in range(sg.TensorsLength())
        if sg.Tensors(i).Type() == 9 and sg.Tensors(i).Buffer()
    }
    # the file carries the quantizer's own int8 weights, transposed to FULLY_CONNECTED's (out, in)
    expected = {
        np.ascontiguousarray(numpy_helper.to_array(t).T).tobytes()
        for t in dyn.graph.initializer
        if t.name.endswith("_w_q")
    }
    assert len(expected) == 5 and expected <= in_file
    sess, ref = session(dyn), session(model)
    for seed in range(3):
        feeds = _feeds(seed)
        y, y_dyn, y_float = run_litert(result.data, feeds), sess.run(None, feeds)[0], ref.run(None, feeds)[0]
        # activations quantized per row (TFLite) vs per tensor (ONNX Runtime): both near float, near each other
        assert np.abs(y - y_dyn).max() < 0.03 * np.abs(y_float).max()
        assert np.abs(y - y_float).max() < 0.03 * np.abs(y_float).max()


@pytest.mark.parametrize("per_channel", [True, False])
def test_lowbit_weight_only_onnx_computes_what_its_graph_says(per_channel):
    import lowbit

    scheme = lowbit.Scheme(mode="weight_only", per_channel=per_channel)
    wo = lowbit.quantize(tiny_encoder(), recipe=lowbit.Recipe(default=scheme), progress=False).model
    result = convert(wo)  # int8 tables and weights stay int8: GATHER + CAST + MUL, DEQUANTIZE for the weights
    assert result.precision == "weight_only" and result.ops["DEQUANTIZE"] == 5
    sess = session(wo, "simulate")  # the graph as written (ORT's fused kernels quantize activations too)
    for seed in range(2):
        feeds = _feeds(seed)
        np.testing.assert_allclose(run_litert(result.data, feeds), sess.run(None, feeds)[0], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_minilm_float_and_dynamic_range_in_litert(tmp_path: Path) -> None:
    from lowbit_zoo.zoo import minilm_onnx, minilm_tokenize, text_sentences

    path = minilm_onnx(tmp_path / "minilm.onnx")
    n = 64
    feeds = minilm_tokenize(text_sentences(16, "eval"), max_length=n)
    feeds = {k: np.pad(v, ((0, 0), (0, n - v.shape[1]))) for k, v in feeds.items()}
    ref = session(path).run(None, feeds)[0]
    shapes = {"input_ids": (1, n), "attention_mask": (1, n)}
    cos = {}
    for precision in ("float32", "dynamic"):
        result = convert(path, precision=precision, shapes=shapes)
        y = np.concatenate(
            [run_litert(result.data, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(len(ref))]
        )
        cos[precision] = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
        if precision == "dynamic":
            assert result.ops["FULLY_CONNECTED"] == 36 and len(result.data) < 0.3 * 90e6
    # lowbit's own dynamic-mode ONNX: same hybrid kernels, the quantizer's int8 weights
    import lowbit

    dyn = lowbit.quantize(path, recipe=lowbit.Recipe(default=lowbit.Scheme(mode="dynamic")), progress=False).model
    result = convert(dyn, shapes=shapes)
    assert result.precision == "dynamic" and result.ops["FULLY_CONNECTED"] == 36
    y = np.concatenate([run_litert(result.data, {k: v[i : i + 1] for k, v in feeds.items()}) for i in range(len(ref))])
    cos["lowbit dynamic"] = (y * ref).sum(1) / np.linalg.norm(y, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos["float32"].min() > 0.99999
    # measured at 128 tokens on 8 sentences: min 0.9984 (mean 0.9989); lowbit dynamic 0.9987 (0.9989)
    assert cos["dynamic"].min() > 0.995 and cos["lowbit dynamic"].min() > 0.995


def test_tiny_encoder_int8_runs_attention_matmuls_on_dequantized_int8():
    import importlib

    import lowbit

    qmodel = lowbit.quantize(tiny_encoder(), calib=[_feeds(i) for i in range(16)], progress=False).model
    result = convert(qmodel)  # the classifier's Clip runs as int8 MAXIMUM / MINIMUM (no fallback)
    # the mask arithmetic and the residual Adds before LayerNormalization are float in the ONNX model already
    assert result.fallbacks == []
    m = importlib.import_module("tflite.Model").Model.GetRootAs(result.data, 0)
    sg = m.Subgraphs(0)
    bmm = [
        sg.Operators(i)
        for i in range(sg.OperatorsLength())
        if m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode() == 126
    ]
    # float products of the int8 operands: LiteRT's int8 BATCH_MATMUL rounds apart (test_tflite_batch_matmul.py)
    assert len(bmm) == 2 and all(sg.Tensors(int(j)).Type() == 0 for op in bmm for j in op.InputsAsNumpy())
    sess = session(qmodel)
    for seed in range(3):
        feeds = _feeds(seed)
        y, ref = run_litert(result.data, feeds).ravel(), sess.run(None, feeds)[0].ravel()
        assert float(y @ ref / np.linalg.norm(y) / np.linalg.norm(ref)) > 0.999
