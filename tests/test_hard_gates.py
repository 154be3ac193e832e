"""onnxruntime target: HardSwish / HardSigmoid run as a requantization (+ QLinearMul), no float island, and compute
what the DQ -> op -> Q form computes to within one quantization step."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import model, node, samples, weight
from lowbit.decision import Reason
from lowbit.evaluate.lint import lint
from lowbit.ops.activation import requantize_hard_gates


def qdq_gate(op: str, dtype: int, x_scale: float, x_zp: int, y_scale: float, y_zp: int, **attrs) -> onnx.ModelProto:
    """x_q -> DequantizeLinear -> op -> QuantizeLinear -> y_q, over every 8-bit input value."""
    np_type = np.uint8 if dtype == TensorProto.UINT8 else np.int8
    inits = [
        numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
        numpy_helper.from_array(np.array(x_zp, np_type), "xz"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "ys"),
        numpy_helper.from_array(np.array(y_zp, np_type), "yz"),
    ]
    g = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["x", "xs", "xz"], ["xf"], name="dq"),
            helper.make_node(op, ["xf"], ["yf"], name="gate", **attrs),
            helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["y"], name="q"),
        ],
        "gate",
        [helper.make_tensor_value_info("x", dtype, [256])],
        [helper.make_tensor_value_info("y", dtype, [256])],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def run_all_values(m: onnx.ModelProto, dtype: int) -> np.ndarray:
    x = np.arange(256).astype(np.uint8).view(np.uint8 if dtype == TensorProto.UINT8 else np.int8)
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0].astype(np.int32)


@pytest.mark.parametrize("dtype", [TensorProto.UINT8, TensorProto.INT8])
@pytest.mark.parametrize(
    ("op", "x_scale", "y_scale", "y_zp_offset"),
    [
        ("HardSwish", 0.05, 0.04, 10),  # x in ~[-6.4, 6.4]: both clips inside the input grid
        ("HardSwish", 0.01, 0.006, 64),  # x in ~[-1.3, 1.3]: no clip reached, finer gate grid
        ("HardSigmoid", 0.05, 1 / 255, 0),  # the gate's own output grid [0, 1]
        ("HardSigmoid", 0.02, 0.6 / 255, 0),  # a narrower calibrated output grid
    ],
)
def test_requantized_gate_matches_the_float_island(
    op: str, x_scale: float, y_scale: float, y_zp_offset: int, dtype: int
) -> None:
    qmin = 0 if dtype == TensorProto.UINT8 else -128
    m = qdq_gate(
        op,
        dtype,
        x_scale,
        qmin + 128,
        y_scale,
        qmin + y_zp_offset,
        **({"alpha": 1 / 6, "beta": 0.5} if op == "HardSigmoid" else {}),
    )
    before = run_all_values(m, dtype)
    assert requantize_hard_gates(m) == ["gate"]
    onnx.checker.check_model(m, full_check=True)
    assert op not in [n.op_type for n in m.graph.node]
    after = run_all_values(m, dtype)
    # The gate's offset 255 * 0.5 is rounded to a whole step: at most one step off, and rarely.
    assert np.max(np.abs(after - before)) <= 1
    assert np.mean(after != before) < 0.35


def gated(op: str) -> onnx.ModelProto:
    """Conv -> op -> Conv, and a squeeze-excite gate: GAP -> Conv -> Relu -> Conv -> HardSigmoid -> Mul. The input
    has 8 channels: a 3-channel image stem stays float for the onnxruntime target (test_image_stem.py)."""
    return model(
        [
            node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
            node(op, ["c0"], ["a0"], name="act"),
            node("GlobalAveragePool", ["a0"], ["p"], name="gap"),
            node("Conv", ["p", "w1", "b1"], ["s1"], name="fc1"),
            node("Relu", ["s1"], ["r1"], name="relu"),
            node("Conv", ["r1", "w2", "b2"], ["s2"], name="fc2"),
            node("HardSigmoid", ["s2"], ["g"], name="gate", alpha=1 / 6, beta=0.5),
            node("Mul", ["a0", "g"], ["m"], name="scale"),
            node("Conv", ["m", "w3"], ["y"], name="conv3"),
        ],
        {"x": (1, 8, 8, 8)},
        {"y": None},
        {
            "w0": weight((8, 8, 3, 3), 0, 0.6),
            "b0": weight((8,), 1),
            "w1": weight((4, 8, 1, 1), 2),
            "b1": weight((4,), 3),
            "w2": weight((8, 4, 1, 1), 4, 2.0),
            "b2": weight((8,), 5),
            "w3": weight((4, 8, 1, 1), 6),
        },
        opset=17,
    )


def test_squeeze_excite_and_hard_swish_have_no_float_island() -> None:
    m = gated("HardSwish")
    calib = samples(m, n=16, low=-3, high=3)
    plain = lowbit.quantize(m, calib=calib, progress=False)
    fast = lowbit.quantize(m, calib=calib, recipe=lowbit.Recipe(target="onnxruntime"), progress=False)
    assert [f["kind"] for f in lint(plain.model, plan=plain.plan)] == ["no-integer-kernel", "no-integer-kernel"]
    assert all("onnxruntime" in f["fix"] for f in lint(plain.model, plan=plain.plan))
    assert lint(fast.model, plan=fast.plan) == []
    assert {n: fast.plan.nodes[n].code for n in ("act", "gate")} == {
        "act": Reason.REQUANTIZED_GATE,
        "gate": Reason.REQUANTIZED_GATE,
    }
    assert "requantization" in fast.plan.nodes["act"].reason
    kinds = {n.op_type for n in fast.model.graph.node}
    assert not kinds & {"HardSwish", "HardSigmoid"}
    # Same integers as the portable model to within a step here and there: compare the outputs in float.
    feeds = samples(m, n=8, seed=7, low=-3, high=3)
    s_plain = ort.InferenceSession(plain.model.SerializeToString(), providers=["CPUExecutionProvider"])
    s_fast = ort.InferenceSession(fast.model.SerializeToString(), providers=["CPUExecutionProvider"])
    s_float = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    err_plain = max(np.abs(s_plain.run(None, f)[0] - s_float.run(None, f)[0]).max() for f in feeds)
    err_fast = max(np.abs(s_fast.run(None, f)[0] - s_float.run(None, f)[0]).max() for f in feeds)
    assert err_fast <= 1.5 * err_plain + 1e-3, (err_fast, err_plain)


def test_portable_target_keeps_the_qdq_form() -> None:
    m = gated("HardSwish")
    plain = lowbit.quantize(m, calib=samples(m, n=8, low=-3, high=3), progress=False)
    assert {"HardSwish", "HardSigmoid"} <= {n.op_type for n in plain.model.graph.node}
    assert plain.plan.nodes["act"].code is Reason.STATIC


def test_same_bytes_again_and_from_the_plan() -> None:
    m = gated("HardSwish")
    recipe = lowbit.Recipe(target="onnxruntime")
    first = lowbit.quantize(m, calib=samples(m, n=8, low=-3, high=3), recipe=recipe, progress=False)
    again = lowbit.quantize(m, calib=samples(m, n=8, low=-3, high=3), recipe=recipe, progress=False)
    replay = lowbit.quantize(m, plan=first.plan, progress=False)
    assert again.model.SerializeToString() == first.model.SerializeToString()
    assert replay.model.SerializeToString() == first.model.SerializeToString()


def _ort_optimized(m: onnx.ModelProto, tmp_path) -> onnx.ModelProto:
    """The graph ONNX Runtime runs (its QDQ fusions applied), as it saves it."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def test_gates_run_as_fused_integer_ops_in_onnx_runtime(tmp_path) -> None:
    """HardSwish's gate is a shift and requantization ORT fuses into QLinearAdd; the SE gate's Conv quantizes straight
    onto the gate's grid (no Q -> DQ pair between them). Nothing between the model's first Q and last DQ runs as a
    float op or a standalone QuantizeLinear/DequantizeLinear."""
    m = gated("HardSwish")
    fast = lowbit.quantize(m, calib=samples(m, n=16, low=-3, high=3), recipe=lowbit.Recipe(target="onnxruntime"))
    g = fast.model.graph
    gate = next(n for n in g.node if n.name == "gate_gate")
    assert next(n for n in g.node if gate.input[0] in n.output).op_type == "Conv"  # fc2's output, quantized once
    assert "s2" not in {n.input[0] for n in g.node if n.op_type == "QuantizeLinear" and n is not gate}
    names = {t.name for t in g.initializer}
    assert all(i in names or i == "" for n in g.node for i in n.input[1:] if n.op_type.endswith("Linear"))
    assert len(names) == len({i for n in g.node for i in n.input} & names)  # nothing left unread
    ops = [(n.domain, n.op_type) for n in _ort_optimized(fast.model, tmp_path).graph.node]
    inner = ops[1:-1]  # the input's QuantizeLinear and the output's DequantizeLinear (or Transposes) at the edges
    assert all(d == "com.microsoft" or op == "Transpose" for d, op in inner), ops
    assert ops.count(("com.microsoft", "QLinearAdd")) == 1  # the HardSwish gate
    assert ops.count(("com.microsoft", "QLinearMul")) == 2  # HardSwish's x * gate and the SE scale


@pytest.mark.parametrize("dtype", [TensorProto.UINT8, TensorProto.INT8])
def test_the_shifted_gate_is_exact_where_the_float_island_is(dtype: int) -> None:
    """The Add form puts beta / alpha exactly (no rounding of 127.5 steps): against the DQ -> HardSwish -> Q island over
    every input value, at most one step off, and less often than the rounded zero point was (< 0.35)."""
    qmin = 0 if dtype == TensorProto.UINT8 else -128
    m = qdq_gate("HardSwish", dtype, 0.05, qmin + 128, 0.04, qmin + 10)
    before = run_all_values(m, dtype)
    requantize_hard_gates(m)
    assert "Add" in [n.op_type for n in m.graph.node]
    after = run_all_values(m, dtype)
    assert np.max(np.abs(after - before)) <= 1
    assert np.mean(after != before) < 0.1
