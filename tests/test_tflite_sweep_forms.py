"""Forms the second sweep of third-party models found the TFLite export refusing.

paddle2onnx's GELU (PP-OCRv5/v6: `Div(x, sqrt 2) -> Erf -> Add 1 -> Mul x -> Mul 0.5`, its constants scalars shared
by every GELU) followed by a 1x1 conv: lowbit's prepare folds the `* 0.5` into the conv's weights, leaving
`x * (1 + erf(x / sqrt 2))`. The TFLite export refused the model ("Erf: no TFLite equivalent"); now the chain is one
table lookup giving the int8 ONNX's integers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.tflite import convert
from test_tflite import run_ort, run_tflite


def _paddle_gelu_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f32 = np.float32
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(f32), "w0"),
        numpy_helper.from_array((rng.standard_normal((8, 8, 1, 1)) * 0.4).astype(f32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 8, 1, 1)) * 0.4).astype(f32), "w2"),
        numpy_helper.from_array(np.array(np.sqrt(2), f32), "sqrt2"),  # shared by both GELUs, as paddle2onnx does
        numpy_helper.from_array(np.array(1.0, f32), "one"),
        numpy_helper.from_array(np.array(0.5, f32), "half"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1])]

    def gelu(x: str, y: str) -> list[onnx.NodeProto]:
        return [
            helper.make_node("Div", [x, "sqrt2"], [f"{y}_d"]),
            helper.make_node("Erf", [f"{y}_d"], [f"{y}_e"]),
            helper.make_node("Add", [f"{y}_e", "one"], [f"{y}_a"]),
            helper.make_node("Mul", [x, f"{y}_a"], [f"{y}_m"]),
            helper.make_node("Mul", [f"{y}_m", "half"], [y]),
        ]

    nodes += gelu("c0", "g0")
    nodes.append(helper.make_node("Conv", ["g0", "w1"], ["c1"]))
    nodes += gelu("c1", "g1")
    nodes.append(helper.make_node("Conv", ["g1", "w2"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "paddle_gelu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 12, 12])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_gelu_whose_half_went_into_the_next_conv_exports_as_the_int8_onnx_computes():
    rng = np.random.default_rng(1)
    calib = [rng.standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(16)]
    qmodel = lowbit.quantize(_paddle_gelu_model(), calib=calib, progress=False).model
    assert "Erf" in {n.op_type for n in qmodel.graph.node}
    result = convert(qmodel)
    assert not result.fallbacks and not result.float_nodes, result.to_dict()
    assert "GELU" not in result.ops and result.ops.get("GATHER", 0) >= 1, result.ops
    x = rng.standard_normal((1, 3, 12, 12)).astype(np.float32)
    ref = run_ort(qmodel, x)
    got = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    step = float(np.abs(ref).max()) / 100
    assert np.abs(got - ref).max() <= 2 * step, np.abs(got - ref).max()
    assert np.corrcoef(got.ravel(), ref.ravel())[0, 1] > 0.999


def test_unnamed_divs_sharing_one_divisor_quantize():
    """Both GELUs' Divs are unnamed and read one `sqrt2`: each reciprocal used to get the same initializer name
    (onnx-ir: "Initializer 'sqrt2_reciprocal_' is already registered", a traceback)."""
    model = _paddle_gelu_model()
    assert not any(n.name for n in model.graph.node if n.op_type == "Div")
    calib = [np.random.default_rng(2).standard_normal((1, 3, 12, 12)).astype(np.float32) for _ in range(4)]
    result = lowbit.quantize(model, calib=calib, progress=False)
    x = calib[0]
    ref = run_ort(_paddle_gelu_model(), x)
    assert np.corrcoef(run_ort(result.model, x).ravel(), ref.ravel())[0, 1] > 0.99


def _elu_model(alpha: float = 1.0) -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) * 0.4).astype(np.float32), "w0"),
        numpy_helper.from_array((rng.standard_normal((4, 8, 3, 3)) * 0.4).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Elu", ["c0"], ["e"], alpha=alpha),
        helper.make_node("Conv", ["e", "w1"], ["y"], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "elu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 10, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_elu_exports_as_tflite_elu_between_int8_convs():
    """madmom's CNNs (key, chords, beats TCN) use ELU: the export said "Elu: no TFLite equivalent"."""
    rng = np.random.default_rng(4)
    calib = [rng.standard_normal((1, 3, 10, 10)).astype(np.float32) for _ in range(16)]
    qmodel = lowbit.quantize(_elu_model(), calib=calib, progress=False).model
    result = convert(qmodel)
    assert result.ops.get("ELU") == 1, result.ops
    x = rng.standard_normal((1, 3, 10, 10)).astype(np.float32)
    ref = run_ort(qmodel, x)
    got = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    step = float(np.abs(ref).max()) / 100
    assert np.abs(got - ref).max() <= 2 * step, np.abs(got - ref).max()
    float_model = _elu_model(alpha=0.5)  # TFLite's ELU has alpha 1: any other is refused in one line
    with pytest.raises(LowbitError, match="alpha 0.5"):
        convert(float_model)
