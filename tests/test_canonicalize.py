"""Canonicalization: decomposed hard-swish / hard-sigmoid become one op, Div by a constant a Mul, and the float
function stays what it was (ONNX Runtime before and after); shapes that are not the pattern are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

import lowbit
from helpers import model, node, samples
from lowbit.passes import canonicalize

X = {"x": (1, 4, 5, 5)}


def c(v: float) -> np.ndarray:
    return np.array(v, np.float32)


def run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def canon(m: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    irm = ir.serde.deserialize_model(m)
    changed = canonicalize(irm)
    return ir.serde.serialize_model(irm), changed


def ops(m: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in m.graph.node]


def same_function(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    onnx.checker.check_model(after, full_check=True)
    x = np.random.default_rng(0).uniform(-6, 6, X["x"]).astype(np.float32)
    x.flat[:5] = [-3.0, 3.0, 0.0, -2.9999998, 3.0000002]  # the kinks
    np.testing.assert_allclose(run(after, x), run(before, x), rtol=1e-6, atol=1e-6)


def hard_swish_div(opset: int = 13, **names: str) -> onnx.ModelProto:
    """x * Clip(x + 3, 0, 6) / 6, as torch's legacy exporter writes it, then a Relu reading the result."""
    return model(
        [
            node("Add", ["x", "three"], ["a"]),
            node("Clip", ["a", "zero", "six"], ["c"]),
            node("Mul", ["x", "c"], ["m"]),
            node("Div", ["m", "six"], [names.get("out", "y")], name="div"),
        ],
        X,
        {names.get("out", "y"): None},
        {"three": c(3), "zero": c(0), "six": c(6)},
        opset=opset,
    )


@pytest.mark.parametrize("opset", [13, 14, 17])
def test_decomposed_hard_swish_becomes_hard_swish(opset: int) -> None:
    m = hard_swish_div(opset)
    out, changed = canon(m)
    assert changed and ops(out) == ["HardSwish"]
    assert {o.domain: o.version for o in out.opset_import}[""] == max(opset, 14)
    assert out.graph.node[0].name == "div" and out.graph.output[0].name == "y"
    same_function(m, out)


def test_hard_swish_with_a_scaled_gate_and_commuted_operands() -> None:
    # x * (Clip(3 + x, 0, 6) * (1/6)): the gate becomes HardSigmoid, then x * HardSigmoid(x) a HardSwish.
    m = model(
        [
            node("Add", ["three", "x"], ["a"]),
            node("Clip", ["a", "zero", "six"], ["c"]),
            node("Mul", ["sixth", "c"], ["g"]),
            node("Mul", ["g", "x"], ["y"]),
        ],
        X,
        {"y": None},
        {"three": c(3), "zero": c(0), "six": c(6), "sixth": c(1 / 6)},
    )
    out, _ = canon(m)
    assert ops(out) == ["HardSwish"]
    same_function(m, out)


def test_hard_sigmoid_and_squeeze_excite_gate() -> None:
    # SE: gate = Clip(s + 3, 0, 6) / 6 of a pooled branch, multiplied into the feature map (not hard-swish).
    m = model(
        [
            node("GlobalAveragePool", ["x"], ["p"]),
            node("Add", ["p", "three"], ["a"]),
            node("Clip", ["a", "zero", "six"], ["c"]),
            node("Div", ["c", "six"], ["g"]),
            node("Mul", ["g", "x"], ["y"]),
        ],
        X,
        {"y": None},
        {"three": c(3), "zero": c(0), "six": c(6)},
    )
    out, _ = canon(m)
    assert ops(out) == ["GlobalAveragePool", "HardSigmoid", "Mul"]
    hs = out.graph.node[1]
    assert {a.name: a.f for a in hs.attribute} == pytest.approx({"alpha": 1 / 6, "beta": 0.5})
    same_function(m, out)


def test_existing_hard_sigmoid_times_x() -> None:
    m = model(
        [node("HardSigmoid", ["x"], ["g"], alpha=1 / 6, beta=0.5), node("Mul", ["x", "g"], ["y"])],
        X,
        {"y": None},
        opset=17,
    )
    out, _ = canon(m)
    assert ops(out) == ["HardSwish"]
    same_function(m, out)


def test_div_by_constant_becomes_mul() -> None:
    m = model([node("Div", ["x", "d"], ["y"])], X, {"y": None}, {"d": c(7.3)})
    out, changed = canon(m)
    assert changed and ops(out) == ["Mul"]
    same_function(m, out)


# Clip(x + 3, 0, 5) is not hard-sigmoid's gate; a Clip output that another node reads must stay observable.
@pytest.mark.parametrize("case", ["wrong_bound", "shared"])
def test_non_matches_are_left_alone(case: str) -> None:
    inits = {"three": c(3), "zero": c(0), "five": c(5), "six": c(6)}
    wrong_bound = model(
        [
            node("Add", ["x", "three"], ["a"]),
            node("Clip", ["a", "zero", "five"], ["c"]),
            node("Mul", ["x", "c"], ["m"]),
            node("Div", ["m", "six"], ["y"]),
        ],
        X,
        {"y": None},
        inits,
    )
    shared = model(
        [
            node("Add", ["x", "three"], ["a"]),
            node("Clip", ["a", "zero", "six"], ["c"]),
            node("Mul", ["x", "c"], ["m"]),
            node("Div", ["m", "six"], ["y"]),
            node("Relu", ["c"], ["r"]),
        ],
        X,
        {"y": None, "r": None},
        inits,
    )
    m = wrong_bound if case == "wrong_bound" else shared
    out, _ = canon(m)
    assert "HardSwish" not in ops(out) and "HardSigmoid" not in ops(out)
    assert ops(out).count("Clip") == 1 and "Div" not in ops(out)  # Div by a constant still becomes Mul
    same_function(m, out)


def test_other_x_and_integer_div_are_left_alone() -> None:
    # Mul(z, Clip(x + 3, 0, 6)) / 6 with z != x is no hard-swish; an integer Div truncates and stays Div.
    m = model(
        [
            node("Add", ["x", "three"], ["a"]),
            node("Clip", ["a", "zero", "six"], ["c"]),
            node("Neg", ["x"], ["z"]),
            node("Mul", ["z", "c"], ["m"]),
            node("Div", ["m", "six"], ["y"]),
        ],
        X,
        {"y": None},
        {"three": c(3), "zero": c(0), "six": c(6)},
    )
    out, _ = canon(m)
    assert "HardSwish" not in ops(out)
    same_function(m, out)
    g = helper.make_graph(
        [helper.make_node("Div", ["i", "d"], ["o"])],
        "int",
        [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("o", onnx.TensorProto.INT64, [3])],
        [onnx.numpy_helper.from_array(np.array(2, np.int64), "d")],
    )
    out, changed = canon(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert not changed and ops(out) == ["Div"]


def test_quantize_sees_one_hard_swish() -> None:
    # Through the pipeline (opset 11 upgraded to 13, then 14 for HardSwish): one quantized activation, no Div.
    m = hard_swish_div(opset=11)
    result = lowbit.quantize(m, calib=samples(m, n=8, low=-6, high=6), progress=False)
    kinds = [n.op_type for n in result.model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert kinds == ["HardSwish"]
    assert result.plan.nodes["div"].quantized
