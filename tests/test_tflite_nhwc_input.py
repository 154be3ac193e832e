"""An ONNX model whose input is already NHWC (tf2onnx's Keras models: the input, maybe rescaled, then a Transpose to
NCHW) exports with its input declared as it is, and the layout Transposes write no TRANSPOSE."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
import tflite

import lowbit
from helpers import model, node, weight
from lowbit.export.tflite import convert
from lowbit.runtimes.ort import session

H, W, C = 12, 12, 3


def _keras_like(rescale: bool, also_read: bool = False) -> onnx.ModelProto:
    """x [1, H, W, C] -> (x * 1/127.5 - 1) -> Transpose(0,3,1,2) -> Conv -> Relu -> Transpose(0,2,3,1) -> y NHWC."""
    first = "x"
    nodes = []
    inits = {"w": weight((8, C, 3, 3), 1), "b": weight((8,), 2)}
    if rescale:
        inits |= {"s": np.array(1 / 127.5, np.float32), "o": np.array(-1.0, np.float32)}
        nodes += [node("Mul", ["x", "s"], ["xs"]), node("Add", ["xs", "o"], ["xo"])]
        first = "xo"
    nodes += [
        node("Transpose", [first], ["t"], perm=[0, 3, 1, 2]),
        node("Conv", ["t", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("Transpose", ["r"], ["y"], perm=[0, 2, 3, 1]),
    ]
    outputs = {"y": (1, H, W, 8)}
    if also_read:  # the input read in its own layout too: it cannot be declared both ways
        nodes.append(node("ReduceMax", ["x"], ["m"], keepdims=0))
        outputs["m"] = ()
    return model(nodes, {"x": (1, H, W, C)}, outputs, inits)


def _samples(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.uniform(0, 255, (1, H, W, C)).astype(np.float32)} for _ in range(n)]


def _transposes(data: bytes) -> int:
    m = tflite.Model.GetRootAsModel(data, 0)
    sg = m.Subgraphs(0)
    codes = [m.OperatorCodes(sg.Operators(i).OpcodeIndex()).BuiltinCode() for i in range(sg.OperatorsLength())]
    return codes.count(tflite.BuiltinOperator.TRANSPOSE)


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "rescaled"])
def test_a_channels_last_input_is_declared_as_it_is(rescale: bool) -> None:
    q = lowbit.quantize(_keras_like(rescale), calib=_samples(8, 0), progress=False).model
    result = convert(q)
    it = litert.Interpreter(model_content=result.data, num_threads=1)
    it.allocate_tensors()
    assert tuple(it.get_input_details()[0]["shape"]) == (1, H, W, C)  # was (1, W, C, H): ONNX dims read as NCHW
    assert _transposes(result.data) == 0
    x = _samples(1, 5)[0]["x"]
    it.set_tensor(it.get_input_details()[0]["index"], x)
    it.invoke()
    got = it.get_tensor(it.get_output_details()[0]["index"])
    ref = session(q, "kernels").run(None, {"x": x})[0]
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()  # one output step at most, near a half


def test_an_input_also_read_in_its_own_layout_stays_nhwc() -> None:
    q = lowbit.quantize(_keras_like(False, also_read=True), calib=_samples(8, 0), progress=False).model
    it = litert.Interpreter(model_content=convert(q).data, num_threads=1)
    assert tuple(it.get_input_details()[0]["shape"]) == (1, W, C, H)


def test_lowbits_runner_feeds_such_a_file_the_onnx_models_data(tmp_path) -> None:
    from lowbit.runtimes.litert import LiteRTSession

    q = lowbit.quantize(_keras_like(True), calib=_samples(8, 0), progress=False).model
    path = tmp_path / "m.tflite"
    path.write_bytes(convert(q).data)
    x = np.concatenate([s["x"] for s in _samples(4, 7)])
    got = LiteRTSession(path).run(None, {"x": x})[0]
    sess = session(q, "kernels")
    ref = np.concatenate([sess.run(None, {"x": x[i : i + 1]})[0] for i in range(len(x))])
    assert got.shape == ref.shape == (4, H, W, 8)
    assert np.abs(got - ref).max() <= 0.03 * np.abs(ref).max()
