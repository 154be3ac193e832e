"""An If with a constant condition (the whole body inside, as some exporters leave it) is replaced by its taken
branch in prepare, so the branch's nodes get quantized; an If on a computed condition stays an If, and the branch the
calibration data takes is quantized inside it (tests/test_branches.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import nodes_of, rel_rms, run, samples, weight


def _branch(name: str, scale: float) -> onnx.GraphProto:
    """x -> Conv (weights a Constant inside the branch) -> Relu -> Mul(scale)."""
    w = helper.make_node("Constant", [], [f"{name}_w"], value=numpy_helper.from_array(weight((4, 3, 3, 3), 1)))
    k = helper.make_node("Constant", [], [f"{name}_k"], value=numpy_helper.from_array(np.array(scale, np.float32)))
    conv = helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_c"], name=f"{name}_conv", pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"], name=f"{name}_relu")
    mul = helper.make_node("Mul", [f"{name}_r", f"{name}_k"], [f"{name}_y"], name=f"{name}_mul")
    out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, (1, 4, 8, 8))
    return helper.make_graph([w, k, conv, relu, mul], name, [], [out])


def _wrapped(cond: bool | None) -> onnx.ModelProto:
    """The body inside an If on a constant `cond` (None: on a condition computed from the input)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 3, 8, 8))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 4, 8, 8))
    if cond is None:
        pre = [
            helper.make_node("ReduceMax", ["x"], ["mx"], keepdims=0, name="max"),
            helper.make_node("Greater", ["mx", "zero"], ["cond"], name="test"),
        ]
        inits = [numpy_helper.from_array(np.array(-100.0, np.float32), "zero")]
    else:
        pre = [helper.make_node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(cond)))]
        inits = []
    node = helper.make_node(
        "If", ["cond"], ["y"], name="wrap", then_branch=_branch("then", 2.0), else_branch=_branch("else", -1.0)
    )
    g = helper.make_graph([*pre, node], "wrapped", [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_constant_if_is_inlined_and_quantized() -> None:
    for cond in (True, False):
        m = _wrapped(cond)
        res = lowbit.quantize(m, calib=samples(m, 16), progress=False)
        taken = "then" if cond else "else"
        assert res.plan.nodes[f"{taken}_conv"].quantized
        assert not nodes_of(res.model, "If") and [o.name for o in res.model.graph.output] == ["y"]
        feeds = samples(m, 8, seed=4)
        ref, got = run(m, feeds, float_model=True)[0], run(res.model, feeds)[0]
        assert rel_rms(ref, got) < 0.05


def test_if_on_a_computed_condition_stays() -> None:
    m = _wrapped(None)
    res = lowbit.quantize(m, calib=samples(m, 8), progress=False)
    assert len(nodes_of(res.model, "If")) == 1 and not res.plan.nodes["wrap"].quantized
    assert res.plan.nodes["then_conv"].quantized and "else_conv" not in res.plan.nodes  # random data: max > -100
    feeds = samples(m, 4, seed=4)
    assert rel_rms(run(m, feeds, float_model=True)[0], run(res.model, feeds)[0]) < 0.05
