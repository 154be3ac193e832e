"""A float HardSigmoid / HardSwish between int8 tensors rounds the same in ONNX Runtime and LiteRT once its output
scale is off half steps (lowbit.targets.island_rounding).

Each test feeds all 256 int8 inputs. With an output scale chosen so that one of the op's outputs sits at a half
step, ONNX Runtime (QuantizeLinear divides by the scale) and LiteRT (QUANTIZE multiplies by its reciprocal) give
different integers; after snap_island_scales they give the same ones everywhere."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session
from lowbit.targets.island_rounding import ISLAND_OPS, clear_of_half_steps, snap_island_scales

S_IN, Z_IN, Z_OUT = np.float32(0.047), -3, -128
SHAPE = [1, 1, 16, 16]


def island(op: str, s_out: np.float32) -> onnx.ModelProto:
    attrs = {"alpha": 1 / 6, "beta": 0.5} if op == "HardSigmoid" else {}
    inits = [
        numpy_helper.from_array(np.array(S_IN, np.float32), "si"),
        numpy_helper.from_array(np.array(Z_IN, np.int8), "zi"),
        numpy_helper.from_array(np.array(s_out, np.float32), "so"),
        numpy_helper.from_array(np.array(Z_OUT, np.int8), "zo"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "si", "zi"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "si", "zi"], ["xd"]),
        helper.make_node(op, ["xd"], ["h"], name="gate", **attrs),
        helper.make_node("QuantizeLinear", ["h", "so", "zo"], ["hq"]),
        helper.make_node("DequantizeLinear", ["hq", "so", "zo"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "island",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, SHAPE)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _outputs(op: str) -> np.ndarray:
    x = (np.arange(-128, 128) - Z_IN).astype(np.float32) * S_IN
    return ISLAND_OPS[op](x, island(op, np.float32(1)).graph.node[2])


def _bad_scale(op: str) -> np.float32:
    """The first float32 scale up from 6/255 for which numpy's division and reciprocal multiply round one of the
    op's outputs differently (the two runtimes' QUANTIZE rules)."""
    y = _outputs(op)
    bits = int(np.array(np.float32(6 / 255 if op == "HardSwish" else 1 / 255), np.float32).view(np.int32))
    for k in range(1 << 20):
        s = np.array(bits + k, np.int32).view(np.float32)[()]
        if not np.array_equal(np.rint(y / s), np.rint(y * (np.float32(1) / s))):
            return s
    raise AssertionError("no such scale")


def _integers(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """ONNX Runtime's and LiteRT's int8 output for all 256 int8 inputs."""
    s_out = np.float32(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "so")))
    x = ((np.arange(-128, 128) - Z_IN).astype(np.float32) * S_IN).reshape(SHAPE)
    y_ort = session(model, "kernels").run(None, {"x": x})[0]
    it = litert.Interpreter(model_content=convert(model, io="int8").data, num_threads=1)  # XNNPACK
    it.allocate_tensors()
    it.set_tensor(it.get_input_details()[0]["index"], np.arange(-128, 128, dtype=np.int8).reshape(1, 16, 16, 1))
    it.invoke()
    out = it.get_output_details()[0]
    assert out["quantization"] == (s_out, Z_OUT)
    q_lite = it.get_tensor(out["index"]).transpose(0, 3, 1, 2).astype(np.int64)
    return np.rint(y_ort / s_out).astype(np.int64) + Z_OUT, q_lite


@pytest.mark.parametrize("op", ["HardSigmoid", "HardSwish"])
def test_snapped_island_rounds_the_same_in_both_runtimes(op):
    bad = _bad_scale(op)
    model = island(op, bad)
    q_ort, q_lite = _integers(model)
    assert not np.array_equal(q_ort, q_lite)  # the half step is real in the runtimes, not only in numpy
    assert int(np.abs(q_ort - q_lite).max()) == 1

    assert snap_island_scales(model) == ["gate"]
    new = np.float32(numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "so")))
    assert new != bad and abs(new / bad - 1) < 1e-4  # a nudge, not a new range
    assert clear_of_half_steps(_outputs(op), new)
    q_ort, q_lite = _integers(model)
    np.testing.assert_array_equal(q_ort, q_lite)
    assert snap_island_scales(model) == []  # clear already: re-applying changes nothing


def test_a_scale_clear_of_half_steps_is_left_alone():
    model = island("HardSigmoid", np.float32(1 / 255))
    before = model.SerializeToString()
    if clear_of_half_steps(_outputs("HardSigmoid"), np.float32(1 / 255)):
        assert snap_island_scales(model) == [] and model.SerializeToString() == before
    else:  # then it must move
        assert snap_island_scales(model) == ["gate"]


def test_a_shared_scale_is_not_moved():
    """Another tensor reads the same scale initializer: moving it would change that tensor too."""
    model = island("HardSigmoid", _bad_scale("HardSigmoid"))
    model.graph.node.append(helper.make_node("QuantizeLinear", ["x", "so", "zo"], ["other"]))
    assert snap_island_scales(model) == []
