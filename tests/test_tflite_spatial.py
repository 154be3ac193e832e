"""TRANSPOSE_CONV, RESIZE_* and standalone PAD in LiteRT against ONNX Runtime: float, and int8 within one step."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lowbit
from lowbit.errors import LowbitError
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session
from test_tflite import _model, run_ort, run_tflite
from test_tflite_int8 import _tflite_int

C, S = 4, 6  # channels, input height/width


def _out_shape(nodes: list, inits: list) -> list[int]:
    probe = _model(nodes, inits, [1, C, S, S], "y", None)
    x = np.zeros((1, C, S, S), np.float32)
    return list(run_ort(probe, x).shape)


def single(op: str, inputs: list[str], inits: list | None = None, after_conv: bool = False, **attrs) -> onnx.ModelProto:
    """x -> op -> y; after_conv puts a 1x1 conv first (lowbit quantizes data movement next to quantized ops)."""
    nodes = [helper.make_node(op, ["c" if after_conv else "x"] + inputs, ["y"], name=op.lower(), **attrs)]
    inits = list(inits or [])
    if after_conv:
        w = np.random.default_rng(9).normal(0, 0.5, (C, C, 1, 1)).astype(np.float32)
        nodes.insert(0, helper.make_node("Conv", ["x", "wc"], ["c"], name="conv"))
        inits.append(numpy_helper.from_array(w, "wc"))
    return _model(nodes, inits, [1, C, S, S], "y", _out_shape(nodes, inits))


def _weights(k: int, cout: int = 3) -> list:
    rng = np.random.default_rng(k)
    return [
        numpy_helper.from_array(rng.normal(0, 0.4, (C, cout, k, k)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (cout,)).astype(np.float32), "b"),
    ]


def _scales(*v) -> list:
    return [
        numpy_helper.from_array(np.array([], np.float32), "roi"),
        numpy_helper.from_array(np.array(v, np.float32), "scales"),
    ]


def _pads(*v, value: float | None = None) -> list:
    out = [numpy_helper.from_array(np.array(v, np.int64), "pads")]
    if value is not None:
        out.append(numpy_helper.from_array(np.array(value, np.float32), "value"))
    return out


CASES: dict = {  # name: (op, extra inputs, initializers, attributes)
    "convT_k4s2p1_same": ("ConvTranspose", ["w", "b"], _weights(4), dict(strides=[2, 2], pads=[1, 1, 1, 1])),
    "convT_k2s2_valid": ("ConvTranspose", ["w", "b"], _weights(2), dict(strides=[2, 2])),
    "convT_k3s1p1_same": ("ConvTranspose", ["w"], _weights(3)[:1], dict(pads=[1, 1, 1, 1])),
    "bilinear_half_pixel": ("Resize", ["roi", "scales"], _scales(1, 1, 2, 2), dict(mode="linear")),
    "bilinear_align_corners": (
        "Resize",
        ["roi", "scales"],
        _scales(1, 1, 2, 2),
        dict(mode="linear", coordinate_transformation_mode="align_corners"),
    ),
    "bilinear_asymmetric": (
        "Resize",
        ["roi", "scales"],
        _scales(1, 1, 2, 2),
        dict(mode="linear", coordinate_transformation_mode="asymmetric"),
    ),
    "nearest_torch": (
        "Resize",
        ["roi", "scales"],
        _scales(1, 1, 2, 2),
        dict(mode="nearest", coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    ),
    "nearest_half_pixel": ("Resize", ["roi", "scales"], _scales(1, 1, 3, 3), dict(mode="nearest")),
    "nearest_align_corners": (
        "Resize",
        ["roi", "scales"],
        _scales(1, 1, 2, 2),
        dict(mode="nearest", coordinate_transformation_mode="align_corners", nearest_mode="round_prefer_ceil"),
    ),
    "pad_zero": ("Pad", ["pads"], _pads(0, 0, 1, 2, 0, 0, 3, 0), {}),
    "pad_value": ("Pad", ["pads", "value"], _pads(0, 0, 1, 1, 0, 0, 1, 1, value=0.5), {}),
    "pad_reflect": ("Pad", ["pads"], _pads(0, 0, 2, 1, 0, 0, 1, 2), dict(mode="reflect")),
}


def build(case: str, after_conv: bool = False) -> onnx.ModelProto:
    op, inputs, inits, attrs = CASES[case]
    return single(op, inputs, inits, after_conv, **attrs)


OPS = {
    "convT": "TRANSPOSE_CONV",
    "bilinear": "RESIZE_BILINEAR",
    "nearest": "RESIZE_NEAREST_NEIGHBOR",
    "pad_zero": "PAD",
    "pad_value": "PADV2",
    "pad_reflect": "MIRROR_PAD",
}


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (1, C, S, S)).astype(np.float32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_matches_ort(case):
    model = build(case)
    result = convert(model)
    assert result.ops[next(v for k, v in OPS.items() if case.startswith(k))] == 1 and not result.transposes
    x = _x(1)
    y = run_tflite(result.data, x).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(y, run_ort(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "case", ["convT_k4s2p1_same", "convT_k2s2_valid", "bilinear_half_pixel", "nearest_torch", "pad_zero", "pad_reflect"]
)
def test_int8_within_one_step_of_ort(case):
    model = build(case, after_conv=not case.startswith("convT"))
    calib = [np.random.default_rng(i).normal(0, 1, (1, C, S, S)).astype(np.float32) for i in range(16)]
    qmodel = lowbit.quantize(model, calib=calib, progress=False).model
    result = convert(qmodel, io="int8")
    assert result.quantized and not result.float_nodes and "DEQUANTIZE" not in result.ops
    x = _x(2)
    y_tfl, s, z = _tflite_int(result.data, x)
    s_in, z_in = litert.Interpreter(model_content=result.data).get_input_details()[0]["quantization"]
    xq = ((np.clip(np.round(x / s_in) + z_in, -128, 127) - z_in) * s_in).astype(np.float32)
    q_ort = np.round(session(qmodel, "kernels").run(None, {"x": xq})[0] / s) + z
    assert np.abs(q_ort - y_tfl).max() <= 1


@pytest.mark.parametrize(
    "build,message",
    [
        (
            lambda: single(
                "ConvTranspose", ["w"], _weights(3)[:1], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]
            ),
            "crop the output in a way TFLite",
        ),
        (
            lambda: single(
                "Resize",
                ["roi", "scales"],
                _scales(1, 1, 2, 2),
                mode="linear",
                coordinate_transformation_mode="tf_half_pixel_for_nn",
            ),
            "has no TFLite RESIZE_BILINEAR form",
        ),
        (lambda: single("Resize", ["roi", "scales"], _scales(1, 1, 2, 2), mode="cubic"), "cubic resize"),
        (
            lambda: single("Resize", ["roi", "scales"], _scales(1, 1, 2, 2), mode="nearest", nearest_mode="ceil"),
            "picks other source",
        ),
        (lambda: single("Pad", ["pads"], _pads(0, 0, 1, 1, 0, 0, 1, 1), mode="edge"), "pad mode edge"),
    ],
)
def test_unmappable_parameters_are_one_line_errors(build, message):
    with pytest.raises(LowbitError, match=rf"^node \w+ \(\w+\): .*{message}"):
        convert(build())
