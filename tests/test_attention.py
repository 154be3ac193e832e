"""Dynamic int8 attention: ONNX Runtime's com.microsoft.Attention -> QAttention."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import op_counts, rel_rms, rng, run, weight
from lowbit import Recipe, Scheme

DYNAMIC = Recipe(default=Scheme(mode="dynamic"))
B, S, D, HEADS = 2, 6, 32, 4


def attention_model(
    seed: int = 0,
    mask: bool = True,
    extra_inputs: tuple[str, ...] = (),
    present: bool = False,
    weight_input: bool = False,
    **attrs,
) -> onnx.ModelProto:
    """x -> com.microsoft Attention (num_heads 4) -> MatMul; x is also read by a second MatMul ("side")."""
    att_in = ["x", "w_qkv", "b_qkv", "mask" if mask else "", *extra_inputs]
    outs = ["att", "present"] if present else ["att"]
    nodes = [
        helper.make_node("Attention", att_in, outs, name="att", domain="com.microsoft", num_heads=HEADS, **attrs),
        helper.make_node("MatMul", ["att", "w_out"], ["y"], name="out"),
        helper.make_node("MatMul", ["x", "w_side"], ["side"], name="side"),
    ]
    inits = {
        "b_qkv": weight((3 * D,), 2 + seed, 0.1),
        "w_out": weight((D, 8), 3 + seed),
        "w_side": weight((D, 4), 4 + seed),
    }
    if not weight_input:
        inits["w_qkv"] = weight((D, 3 * D), 1 + seed, 0.3)
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, (B, S, D))]
    if mask:
        inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT32, (B, S)))
    if weight_input:
        inputs.append(helper.make_tensor_value_info("w_qkv", TensorProto.FLOAT, (D, 3 * D)))
    shapes = {"past": (2, B, HEADS, 3, D // HEADS), "attention_bias": (1, HEADS, S, S)}
    for name in filter(None, extra_inputs):
        inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[name]))
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, (B, S, 8)),
        helper.make_tensor_value_info("side", TensorProto.FLOAT, (B, S, 4)),
    ]
    if present:
        outputs.append(helper.make_tensor_value_info("present", TensorProto.FLOAT, (2, B, HEADS, S, D // HEADS)))
    g = helper.make_graph(nodes, "att", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def feeds(n: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    r = rng(seed)
    out = []
    for _ in range(n):
        mask = np.ones((B, S), np.int32)
        mask[1, S - 2 :] = 0  # padding in the second sequence
        out.append({"x": r.standard_normal((B, S, D)).astype(np.float32), "mask": mask})
    return out


def qattention(m: onnx.ModelProto) -> onnx.NodeProto:
    found = [n for n in m.graph.node if n.op_type == "QAttention"]
    assert len(found) == 1
    return found[0]


@pytest.mark.parametrize("per_channel", [True, False])
def test_attention_becomes_qattention_close_to_float(per_channel):
    m = attention_model(unidirectional=0, mask_filter_value=-10000.0)
    # Without the overflow guard the weights are plain round-to-nearest (the guard is tested below).
    scheme = Scheme(mode="dynamic", per_channel=per_channel, avoid_overflow=False)
    res = lowbit.quantize(m, recipe=Recipe(default=scheme), progress=False)
    counts = op_counts(res.model)
    assert counts["Attention"] == 0 and counts["MatMulInteger"] == 2
    # x feeds QAttention and the side MatMul through one DynamicQuantizeLinear
    assert counts["DynamicQuantizeLinear"] == 2
    q = qattention(res.model)
    assert q.domain == "com.microsoft"
    attrs = {a.name: helper.get_attribute_value(a) for a in q.attribute}
    assert attrs["num_heads"] == HEADS and attrs["unidirectional"] == 0 and attrs["mask_filter_value"] == -10000.0
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    wq, ws, wz = (inits[q.input[i]] for i in (1, 4, 7))
    assert wq.dtype == np.int8 and wq.shape == (D, 3 * D) and wz.dtype == np.int8
    assert ws.shape == ((3 * D,) if per_channel else ())
    assert q.input[5] == "mask"
    n = res.plan.nodes["att"]
    assert n.quantized and "QAttention" in n.reason
    p = res.plan.tensors["att:1"]
    assert p.dtype == "int8" and len(p.scale) == (3 * D if per_channel else 1)
    data = feeds()
    ref = run(m, data, float_model=True)
    got = run(res.model, data, mode="kernels")
    for a, b in zip(ref, got):
        assert rel_rms(a, b) < 0.03, rel_rms(a, b)
    # the int8 weights really are used: a zeroed weight changes the output
    wq = np.zeros_like(wq)
    for t in res.model.graph.initializer:
        if t.name == q.input[1]:
            t.CopyFrom(numpy_helper.from_array(wq, t.name))
    assert rel_rms(ref[0], run(res.model, data, mode="kernels")[0]) > 0.3


def test_overflow_guard_covers_qattention_weights():
    """These test weights are large enough that every u8 x s8 pair could saturate int16 on AVX2 without VNNI."""
    m = attention_model()
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    assert res.plan.overflow_guard["att"] > 0
    q = qattention(res.model)
    wq = next(numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == q.input[1]).astype(np.int64)
    # worst pair sums along the reduction axis for uint8 inputs: same-sign weights at 255
    a, b = wq[0::2], wq[1::2]
    assert 255 * (np.maximum(a, 0) + np.maximum(b, 0)).max() <= 32767
    assert 255 * (np.minimum(a, 0) + np.minimum(b, 0)).min() >= -32768
    data = feeds()
    assert rel_rms(run(m, data, float_model=True)[0], run(res.model, data, mode="kernels")[0]) < 0.04


def test_same_input_same_bytes_and_plan_reuse_reproduces_them(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(attention_model(), path)
    a = lowbit.quantize(path, tmp_path / "a.onnx", recipe=DYNAMIC, progress=False)
    lowbit.quantize(path, tmp_path / "b.onnx", recipe=DYNAMIC, progress=False)
    c = lowbit.quantize(path, tmp_path / "c.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert (
        (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes() == (tmp_path / "c.onnx").read_bytes()
    )
    assert a.plan.tensors["att:1"] == c.plan.tensors["att:1"]
    # another model with the same plan: its own weights are quantized, same structure
    onnx.save(attention_model(seed=5), tmp_path / "m5.onnx")
    d = lowbit.quantize(tmp_path / "m5.onnx", plan=tmp_path / "a.plan.json", progress=False)
    assert op_counts(d.model)["QAttention"] == 1 and d.plan.tensors["att:1"] != a.plan.tensors["att:1"]


def test_no_mask_and_no_bias_inputs():
    m = attention_model(mask=False)
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    assert qattention(res.model).input[5] == ""
    data = [{"x": f["x"]} for f in feeds(4)]
    assert rel_rms(run(m, data, float_model=True)[0], run(res.model, data, mode="kernels")[0]) < 0.03


@pytest.mark.parametrize(
    "case, reason",
    [
        (dict(weight_input=True), "not a constant"),
        (dict(extra_inputs=("past",)), "past state"),
        (dict(extra_inputs=("", "attention_bias")), "attention_bias"),
        (dict(qkv_hidden_sizes=[D, D, 2 * D]), "qkv_hidden_sizes"),
        (dict(present=True), "present"),
    ],
)
def test_unsupported_attention_stays_float_with_reason(case, reason):
    m = attention_model(**case)
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    counts = op_counts(res.model)
    assert counts["Attention"] == 1 and counts["QAttention"] == 0
    n = res.plan.nodes["att"]
    assert not n.quantized and reason in n.reason and "float" in n.reason
    assert res.plan.nodes["side"].quantized  # its neighbours still quantize


def test_weight_only_and_static_attention_say_why():
    m = attention_model()
    res = lowbit.quantize(m, recipe=Recipe(default=Scheme(mode="weight_only")), progress=False)
    assert "use mode dynamic" in res.plan.nodes["att"].reason and op_counts(res.model)["Attention"] == 1
    res = lowbit.quantize(m, calib=feeds(4), recipe=Recipe(default=Scheme(mode="static")), progress=False)
    assert "use mode dynamic" in res.plan.nodes["att"].reason and op_counts(res.model)["Attention"] == 1


@pytest.mark.slow
def test_minilm_fused_attention_becomes_qattention(tmp_path):
    """The real model through ONNX Runtime's transformers optimizer: six fused Attention nodes, all quantized."""
    import warnings

    import onnxruntime as ort
    from onnxruntime.transformers.optimizer import optimize_model

    from lowbit_zoo import zoo

    plain = zoo.minilm_onnx(tmp_path / "minilm.onnx")
    opt = optimize_model(str(plain), model_type="bert", num_heads=12, hidden_size=384, opt_level=1, use_gpu=False)
    fused = tmp_path / "fused.onnx"
    opt.save_model_to_file(str(fused))
    assert op_counts(onnx.load(fused))["Attention"] == 6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = lowbit.quantize(fused, tmp_path / "q.onnx", recipe=DYNAMIC, progress=False)
    counts = op_counts(res.model)
    assert counts["QAttention"] == 6 and counts["Attention"] == 0 and counts["MatMulInteger"] == 18
    assert all(res.plan.nodes[n].quantized for n in res.plan.nodes if res.plan.nodes[n].op_type == "Attention")

    sentences = zoo.text_sentences(48, "eval", seed=5)

    def embed(path):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        return np.concatenate([sess.run(None, zoo.minilm_tokenize(sentences[i : i + 16]))[0] for i in range(0, 48, 16)])

    ref, got = embed(plain), embed(tmp_path / "q.onnx")
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    # measured 0.9928 mean / 0.984 min over 200 sentences (bench/minilm_attention.py)
    assert cos.mean() >= 0.99 and cos.min() > 0.97, (cos.mean(), cos.min())


@pytest.mark.parametrize("per_channel", [True, False])
def test_affine_weights_keep_their_zero_points(per_channel):
    m = attention_model()
    scheme = Scheme(mode="dynamic", per_channel=per_channel, symmetric_weights=False)
    res = lowbit.quantize(m, recipe=Recipe(default=scheme), progress=False)
    q = qattention(res.model)
    zp = next(numpy_helper.to_array(t) for t in res.model.graph.initializer if t.name == q.input[7])
    assert zp.dtype == np.int8 and zp.shape == ((3 * D,) if per_channel else ()) and zp.any()
    assert res.plan.tensors["att:1"].zero_point == np.ravel(zp).astype(int).tolist()
    data = feeds()
    assert rel_rms(run(m, data, float_model=True)[0], run(res.model, data, mode="kernels")[0]) < 0.03


def test_equal_qkv_hidden_sizes_and_unidirectional_are_kept():
    """QAttention has no qkv_hidden_sizes: equal sizes are what it assumes, so the attribute can go."""
    m = attention_model(qkv_hidden_sizes=[D, D, D], unidirectional=1)
    res = lowbit.quantize(m, recipe=DYNAMIC, progress=False)
    attrs = {a.name: helper.get_attribute_value(a) for a in qattention(res.model).attribute}
    assert "qkv_hidden_sizes" not in attrs and attrs["unidirectional"] == 1
    data = feeds()
    ref = run(m, data, float_model=True)[0]
    assert rel_rms(ref, run(res.model, data, mode="kernels")[0]) < 0.04
    # the causal mask really is applied: the bidirectional float model differs
    assert rel_rms(ref, run(attention_model(), data, float_model=True)[0]) > 0.05
