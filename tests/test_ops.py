"""Per-op-family tests of lowbit.quantize on tiny float models.

For each case: the QDQ graph has the expected shape (weight/bias DQs, Q/DQ around activations, shared scales),
it passes the ONNX checker, runs in ONNX Runtime with and without graph optimizations, stays within a stated
error of the float model, and ORT fuses it into the intended integer kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import pytest

import lowbit
from helpers import (
    attr,
    dq_source,
    init,
    input_scale,
    model,
    node,
    nodes_of,
    op_counts,
    optimized,
    output_qparams,
    quantize,
    rel_rms,
    run,
    samples,
    weight,
)

I64 = np.int64


@dataclass
class Case:
    model: onnx.ModelProto
    op: str  # name of the node under test
    tol: float  # relative RMS error bound against the float model (8-bit activations, int8 weights)
    kernels: tuple[str, ...] = ()  # op types ORT's optimized graph must contain
    gone: tuple[str, ...] = ()  # float op types that must not remain after ORT's optimizations
    shares_scale: tuple[str, ...] = ()  # nodes whose output Q must use their input DQ's scale/zero point
    weighted: bool = False
    weight_axis: int | None = None
    bias: bool = False
    activations: tuple[int, ...] = (0,)
    extra: Callable | None = field(default=None, repr=False)
    # after ORT's optimizations only the graph's own boundary is float: one Q per input, one DQ per output
    integer: bool = True


# ---------------------------------------------------------------------------------------------- builders


def conv_model(bias=True, group=1, cin=3, cout=4, k=3, hw=8, relu=None, wscale=0.5):
    x = (1, cin, hw, hw)
    w = weight((cout, cin // group, k, k), seed=1, scale=wscale)
    inits = {"w": w}
    ins = ["x", "w"]
    if bias:
        inits["b"] = weight((cout,), seed=2, scale=0.2)
        ins.append("b")
    nodes = [node("Conv", ins, ["c" if relu else "y"], name="op", pads=[1] * 4, group=group)]
    if relu == "Relu":
        nodes.append(node("Relu", ["c"], ["y"], name="act"))
    elif relu == "Clip":
        inits["lo"], inits["hi"] = np.array(0.0, np.float32), np.array(6.0, np.float32)
        nodes.append(node("Clip", ["c", "lo", "hi"], ["y"], name="act"))
    return model(nodes, {"x": x}, {"y": (1, cout, hw, hw)}, inits)


def unary_model(op, shape=(1, 4, 8, 8), out_shape=None, extra_inits=None, extra_inputs=(), **attrs):
    return model(
        [node(op, ["x", *extra_inputs], ["y"], name="op", **attrs)], {"x": shape}, {"y": out_shape}, extra_inits
    )


def binary_model(op, shape=(1, 4, 8, 8), **attrs):
    return model([node(op, ["a", "b"], ["y"], name="op", **attrs)], {"a": shape, "b": shape}, {"y": None})


def between_convs(
    mid: list[onnx.NodeProto],
    mid_in: str,
    mid_out: str,
    tail: list[onnx.NodeProto],
    inits: dict,
    out_shape=None,
    cin=3,
    c1=4,
    hw=8,
):
    """x -> Conv(name conv1) -> mid... -> tail -> y: data movement sandwiched between quantized ops."""
    inits = {"w1": weight((c1, cin, 3, 3), seed=3), "b1": weight((c1,), seed=4, scale=0.2), **inits}
    nodes = [node("Conv", ["x", "w1", "b1"], [mid_in], name="conv1", pads=[1] * 4), *mid, *tail]
    return model(nodes, {"x": (1, cin, hw, hw)}, {"y": out_shape}, inits)


def _cases() -> dict[str, Callable[[], Case]]:
    c: dict[str, Callable[[], Case]] = {}
    conv_kw = dict(op="op", tol=0.03, kernels=("QLinearConv",), gone=("Conv",), weighted=True, weight_axis=0)
    c["conv_bias"] = lambda: Case(conv_model(), bias=True, **conv_kw)
    c["conv_nobias"] = lambda: Case(conv_model(bias=False), **conv_kw)
    c["conv_grouped"] = lambda: Case(conv_model(group=2, cin=4, cout=6), bias=True, **conv_kw)
    c["conv_depthwise"] = lambda: Case(conv_model(group=4, cin=4, cout=4), bias=True, **conv_kw)
    c["conv_relu_fused"] = lambda: Case(conv_model(relu="Relu"), bias=True, extra=_fused_relu, **conv_kw)
    c["conv_clip_fused"] = lambda: Case(conv_model(relu="Clip", wscale=2.0), bias=True, extra=_fused_clip, **conv_kw)

    def conv_transpose():
        m = model(
            [node("ConvTranspose", ["x", "w", "b"], ["y"], name="op", strides=[2, 2])],
            {"x": (1, 4, 4, 4)},
            {"y": (1, 3, 8, 8)},
            {"w": weight((4, 3, 2, 2), 5), "b": weight((3,), 6, 0.2)},
        )
        # ORT's CPU provider has no QDQ ConvTranspose fusion (QLinearConvTranspose is XNNPACK-only): it runs in
        # float between the DQs, so only the graph shape and the error are checked.
        return Case(m, "op", 0.03, weighted=True, weight_axis=1, bias=True, extra=_convtranspose_on_dq, integer=False)

    c["conv_transpose"] = conv_transpose

    def gemm(trans_b):
        w = weight((8, 16) if trans_b else (16, 8), 7)
        m = model(
            [node("Gemm", ["x", "w", "b"], ["y"], name="op", transB=trans_b)],
            {"x": (1, 16)},
            {"y": (1, 8)},
            {"w": w, "b": weight((8,), 8, 0.2)},
        )
        return Case(
            m, "op", 0.03, kernels=("QGemm",), gone=("Gemm",), weighted=True, weight_axis=0 if trans_b else 1, bias=True
        )

    c["gemm_transB0"] = lambda: gemm(0)
    c["gemm_transB1"] = lambda: gemm(1)

    def matmul_const():
        m = model(
            [node("MatMul", ["x", "w"], ["y"], name="op")],
            {"x": (1, 5, 16)},
            {"y": (1, 5, 8)},
            {"w": weight((16, 8), 9)},
        )
        # A model output stays float, so ORT runs MatMulIntegerToFloat instead of QLinearMatMul.
        return Case(m, "op", 0.03, kernels=("MatMulIntegerToFloat",), gone=("MatMul",), weighted=True, weight_axis=1)

    c["matmul_const"] = matmul_const

    def matmul_two():
        m = model([node("MatMul", ["a", "b"], ["y"], name="op")], {"a": (1, 4, 8), "b": (1, 8, 6)}, {"y": (1, 4, 6)})
        return Case(m, "op", 0.03, kernels=("QLinearMatMul",), gone=("MatMul",), activations=(0, 1))

    c["matmul_two_activations"] = matmul_two

    c["add"] = lambda: Case(binary_model("Add"), "op", 0.02, kernels=("QLinearAdd",), gone=("Add",), activations=(0, 1))
    c["mul"] = lambda: Case(binary_model("Mul"), "op", 0.03, kernels=("QLinearMul",), gone=("Mul",), activations=(0, 1))
    c["concat"] = lambda: Case(
        binary_model("Concat", axis=1), "op", 0.02, kernels=("QLinearConcat",), gone=("Concat",), activations=(0, 1)
    )
    # MaxPool has no QLinear kernel: ORT drops the Q/DQ pair around it and runs its uint8 MaxPool.
    c["maxpool"] = lambda: Case(
        unary_model("MaxPool", kernel_shape=[2, 2], strides=[2, 2]),
        "op",
        0.02,
        shares_scale=("op",),
        extra=_maxpool_on_uint8,
    )
    c["averagepool"] = lambda: Case(
        unary_model("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
        "op",
        0.02,
        kernels=("QLinearAveragePool",),
        gone=("AveragePool",),
    )
    c["globalaveragepool"] = lambda: Case(
        unary_model("GlobalAveragePool"), "op", 0.03, kernels=("QLinearGlobalAveragePool",), gone=("GlobalAveragePool",)
    )
    # A mean over every spatial axis is a global average pool (passes/global_pool.py)
    c["reducemean_spatial"] = lambda: Case(
        unary_model("ReduceMean", axes=[2, 3], keepdims=1),
        "op",
        0.03,
        kernels=("QLinearGlobalAveragePool",),
        gone=("ReduceMean",),
    )
    # No integer kernel in ORT's CPU provider for these: they run in float between Q/DQ.
    c["reducemean"] = lambda: Case(unary_model("ReduceMean", axes=[1], keepdims=1), "op", 0.03, integer=False)
    c["sigmoid"] = lambda: Case(unary_model("Sigmoid"), "op", 0.02, kernels=("QLinearSigmoid",), gone=("Sigmoid",))
    c["softmax"] = lambda: Case(
        unary_model("Softmax", axis=-1), "op", 0.03, kernels=("QLinearSoftmax",), gone=("Softmax",)
    )
    c["hardswish"] = lambda: Case(unary_model("HardSwish"), "op", 0.03, integer=False)
    c["leakyrelu"] = lambda: Case(
        unary_model("LeakyRelu", alpha=0.1), "op", 0.02, kernels=("QLinearLeakyRelu",), gone=("LeakyRelu",)
    )

    # Data movement between quantized ops: it shares its input's scale.
    def resize():
        m = between_convs(
            [node("Resize", ["c1", "", "scales"], ["r"], name="op", mode="nearest")],
            "c1",
            "r",
            [node("Conv", ["r", "w2"], ["y"], name="conv2")],
            {"scales": np.array([1, 1, 2, 2], np.float32), "w2": weight((2, 4, 1, 1), 10)},
            hw=4,
        )
        return Case(m, "op", 0.03, kernels=("QLinearConv",), gone=("Conv",), shares_scale=("op",))

    c["resize_nearest"] = resize

    def reshape():
        m = between_convs(
            [node("Reshape", ["c1", "shape"], ["r"], name="op")],
            "c1",
            "r",
            [node("Gemm", ["r", "w2"], ["y"], name="fc")],
            {"shape": np.array([1, 64], I64), "w2": weight((64, 5), 11)},
            hw=4,
        )
        return Case(m, "op", 0.03, kernels=("QGemm", "QLinearConv"), gone=("Gemm", "Conv"), shares_scale=("op",))

    c["reshape"] = reshape

    def flatten():
        m = between_convs(
            [node("Flatten", ["c1"], ["r"], name="op", axis=1)],
            "c1",
            "r",
            [node("Gemm", ["r", "w2"], ["y"], name="fc")],
            {"w2": weight((64, 5), 12)},
            hw=4,
        )
        return Case(m, "op", 0.03, kernels=("QGemm",), gone=("Gemm",), shares_scale=("op",))

    c["flatten"] = flatten

    def transpose():
        m = between_convs(
            [node("Transpose", ["c1"], ["r"], name="op", perm=[0, 2, 3, 1])],
            "c1",
            "r",
            [node("MatMul", ["r", "w2"], ["y"], name="mm")],
            {"w2": weight((4, 3), 13)},
            hw=4,
        )
        return Case(m, "op", 0.03, kernels=("MatMulIntegerToFloat",), gone=("MatMul",), shares_scale=("op",))

    c["transpose"] = transpose

    def squeeze():
        m = model(
            [
                node("GlobalAveragePool", ["x"], ["g"], name="gap"),
                node("Squeeze", ["g", "axes"], ["s"], name="op"),
                node("Gemm", ["s", "w2"], ["y"], name="fc"),
            ],
            {"x": (1, 4, 8, 8)},
            {"y": (1, 5)},
            {"axes": np.array([2, 3], I64), "w2": weight((4, 5), 14)},
        )
        return Case(m, "op", 0.05, kernels=("QGemm", "QLinearGlobalAveragePool"), shares_scale=("op",))

    c["squeeze"] = squeeze

    def unsqueeze():
        m = model(
            [
                node("Gemm", ["x", "w1"], ["g"], name="fc"),
                node("Unsqueeze", ["g", "axes"], ["u"], name="op"),
                node("Conv", ["u", "w2"], ["y"], name="conv2"),
            ],
            {"x": (1, 16)},
            {"y": (1, 3, 1, 1)},
            {"axes": np.array([2, 3], I64), "w1": weight((16, 8), 15), "w2": weight((3, 8, 1, 1), 16)},
        )
        return Case(m, "op", 0.03, kernels=("QGemm", "QLinearConv"), gone=("Conv", "Gemm"), shares_scale=("op",))

    c["unsqueeze"] = unsqueeze

    def slice_():
        m = between_convs(
            [node("Slice", ["c1", "st", "en", "ax"], ["r"], name="op")],
            "c1",
            "r",
            [node("Conv", ["r", "w2"], ["y"], name="conv2")],
            {
                "st": np.array([1], I64),
                "en": np.array([3], I64),
                "ax": np.array([1], I64),
                "w2": weight((3, 2, 1, 1), 17),
            },
        )
        return Case(m, "op", 0.03, kernels=("QLinearConv",), gone=("Conv",), shares_scale=("op",))

    c["slice"] = slice_

    def gather():
        m = between_convs(
            [node("Gather", ["c1", "idx"], ["r"], name="op", axis=1)],
            "c1",
            "r",
            [node("Conv", ["r", "w2"], ["y"], name="conv2")],
            {"idx": np.array([0, 2, 3], I64), "w2": weight((3, 3, 1, 1), 18)},
        )
        return Case(m, "op", 0.03, kernels=("QLinearConv",), gone=("Conv",), shares_scale=("op",))

    c["gather"] = gather

    def split():
        m = between_convs(
            [node("Split", ["c1", "sp"], ["p", "q"], name="op", axis=1)],
            "c1",
            "p",
            [node("Add", ["p", "q"], ["y"], name="add")],
            {"sp": np.array([2, 2], I64)},
        )
        return Case(m, "op", 0.03, kernels=("QLinearConv", "QLinearAdd"), gone=("Conv", "Add"), shares_scale=("op",))

    c["split"] = split
    return c


CASES = _cases()


# ------------------------------------------------------------------------------------------- extra checks


def _fused_relu(case: Case, res: lowbit.QuantizeResult) -> None:
    m = res.model
    assert not nodes_of(m, "Relu")
    assert res.plan.nodes["act"].reason.startswith("folded into the output range of op")
    conv = nodes_of(m, "Conv")[0]
    _, zp = output_qparams(m, conv)
    assert zp.dtype == np.uint8 and int(zp) == 0  # the clamp at q=0 is the Relu
    assert res.plan.tensors["y"].range[0] == 0.0


def _fused_clip(case: Case, res: lowbit.QuantizeResult) -> None:
    m = res.model
    assert not nodes_of(m, "Clip")
    conv = nodes_of(m, "Conv")[0]
    scale, zp = output_qparams(m, conv)
    assert int(zp) == 0
    lo, hi = res.plan.tensors["y"].range
    assert lo == 0.0 and 0.0 < hi <= 6.0
    # the weights are large enough that the raw conv output exceeds 6: the upper clamp must still hold
    feeds = samples(case.model, 4, seed=9)
    raw = run(
        model(
            [node("Conv", ["x", "w", "b"], ["c"], pads=[1] * 4)],
            {"x": (1, 3, 8, 8)},
            {"c": None},
            {"w": init(case.model, "w"), "b": init(case.model, "b")},
        ),
        feeds,
        float_model=True,
    )[0]
    assert raw.max() > 6.0 and raw.min() < 0.0
    for mode in ("simulate", "kernels"):
        y = run(m, feeds, mode)[0]
        assert y.min() >= 0.0 and y.max() <= 6.0 + float(scale) / 2


def _convtranspose_on_dq(case: Case, res: lowbit.QuantizeResult) -> None:
    opt = optimized(res.model)
    (ct,) = nodes_of(opt, "ConvTranspose")
    for i in range(3):
        assert [n.op_type for n in opt.graph.node if ct.input[i] in n.output] == ["DequantizeLinear"]


def _maxpool_on_uint8(case: Case, res: lowbit.QuantizeResult) -> None:
    opt = optimized(res.model)
    pools = nodes_of(opt, "MaxPool")
    assert len(pools) == 1
    feeding = [n for n in opt.graph.node if pools[0].input[0] in n.output]
    assert feeding and feeding[0].op_type == "QuantizeLinear"  # runs on the uint8 tensor


# --------------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def results() -> dict[str, tuple[Case, lowbit.QuantizeResult]]:
    return {}


def _get(results, name):
    if name not in results:
        case = CASES[name]()
        results[name] = (case, quantize(case.model))
    return results[name]


@pytest.mark.parametrize("name", list(CASES))
def test_graph_structure(results, name):
    case, res = _get(results, name)
    m = res.model
    onnx.checker.check_model(m, full_check=True)
    assert res.plan.nodes[case.op].quantized, res.plan.nodes[case.op].reason
    (n,) = [x for x in m.graph.node if x.name == case.op]
    for i in case.activations:
        dq = dq_source(m, n.input[i])
        q = [p for p in m.graph.node if dq.input[0] in p.output]
        assert q and q[0].op_type == "QuantizeLinear"  # activations are Q -> DQ, not stored quantized
        assert init(m, dq.input[1]).ndim == 0  # per-tensor activation scale
    if case.weighted:
        wdq = dq_source(m, n.input[1])
        wq = init(m, wdq.input[0])
        assert wq.dtype == np.int8
        assert attr(wdq, "axis") == case.weight_axis
        ws = init(m, wdq.input[1])
        assert ws.shape == (wq.shape[case.weight_axis],)
        assert not np.any(init(m, wdq.input[2]))  # symmetric int8
        # dequantized weights are close to the float ones
        (float_node,) = [x for x in case.model.graph.node if x.name == case.op]
        w_float = init(case.model, float_node.input[1])
        shape = [1] * wq.ndim
        shape[case.weight_axis] = -1
        assert np.max(np.abs(wq * ws.reshape(shape) - w_float)) <= ws.max() * 0.51 + 1e-7
    if case.bias:
        bdq = dq_source(m, n.input[2])
        bq = init(m, bdq.input[0])
        assert bq.dtype == np.int32
        a_scale, _ = input_scale(m, n, 0)
        w_scale = init(m, dq_source(m, n.input[1]).input[1])
        np.testing.assert_allclose(init(m, bdq.input[1]), (a_scale * w_scale).astype(np.float32), rtol=1e-6)
    if case.op not in case.shares_scale and not (n.op_type in ("Gemm", "MatMul") and is_graph_output(m, n)):
        s, z = output_qparams(m, n)
        assert s.ndim == 0 and s > 0
    for shared in case.shares_scale:
        (sn,) = [x for x in m.graph.node if x.name == shared]
        assert res.plan.nodes[shared].reason == "shares its input's scale"
        s_in, z_in = input_scale(m, sn, 0)
        for i in range(len(sn.output)):
            s_out, z_out = output_qparams(m, sn, i)
            assert s_out == s_in and z_out == z_in and z_out.dtype == z_in.dtype
    if case.extra is not None:
        case.extra(case, res)


def is_graph_output(m: onnx.ModelProto, n: onnx.NodeProto) -> bool:
    return any(o.name in n.output for o in m.graph.output)


@pytest.mark.parametrize("name", list(CASES))
def test_accuracy_both_modes(results, name):
    case, res = _get(results, name)
    # In-distribution inputs (the calibration samples): the error is quantization noise, not clipping of values
    # that 16 samples never showed the observers.
    feeds = samples(case.model)
    ref = run(case.model, feeds, float_model=True)
    for mode in ("simulate", "kernels"):
        got = run(res.model, feeds, mode)
        assert len(got) == len(ref)
        for r, g in zip(ref, got):
            assert g.shape == r.shape
            err = rel_rms(r, g)
            assert err < case.tol, f"{mode}: relative RMS error {err:.4f} >= {case.tol}"
            assert err > 0.0 or np.allclose(r, np.round(r))  # the model really is quantized


@pytest.mark.parametrize("name", list(CASES))
def test_ort_fuses_integer_kernel(results, name):
    case, res = _get(results, name)
    opt = optimized(res.model)
    ops = op_counts(opt)
    if case.integer:
        # Model outputs made by a weighted Gemm/MatMul stay float (QGemm writes float): no DequantizeLinear.
        assert ops["QuantizeLinear"] == len(opt.graph.input) and ops["DequantizeLinear"] <= len(opt.graph.output), dict(
            ops
        )
    else:
        # the op runs in float on dequantized inputs (ORT rewrites HardSwish as HardSigmoid * x)
        assert not [k for k in ops if k.startswith("QLinear")] and ops["DequantizeLinear"] > len(opt.graph.output)
    for k in case.kernels:
        assert ops[k] >= 1, f"{k} missing after ORT optimization: {dict(ops)}"
    for g in case.gone:
        assert ops[g] == 0, f"float {g} left after ORT optimization: {dict(ops)}"
