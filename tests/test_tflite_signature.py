"""TFLite export writes a `serving_default` SignatureDef naming the inputs and outputs as the ONNX graph does
(what ai-edge-quantizer and Android's `runSignature` look up), for every precision and io kind."""

from __future__ import annotations

import ai_edge_litert.interpreter as litert
import numpy as np
import onnx
import pytest
from onnx import helper

import lowbit
from helpers import model, weight
from lowbit.export.tflite import convert
from lowbit.export.tflite.writer import _module


def classifier() -> onnx.ModelProto:
    """Conv-Relu -> GlobalAveragePool -> Flatten -> Gemm, with names as PyTorch's exporter writes them."""
    nodes = [
        helper.make_node("Conv", ["input.1", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc", "fcb"], ["logits"], name="fc"),
    ]
    inits = {"w": weight((8, 3, 3, 3), 1), "b": weight((8,), 2, 0.1), "fc": weight((8, 5), 3), "fcb": weight((5,), 4)}
    return model(nodes, {"input.1": (1, 3, 8, 8)}, {"logits": (1, 5)}, inits)


def two_in_two_out() -> onnx.ModelProto:
    """Inputs declared (b, a), outputs declared (total, prod) though prod is computed first: same shapes, so only
    the names tell the tensors apart (total = a @ w + b is not symmetric in a and b)."""
    nodes = [
        helper.make_node("Mul", ["a", "b"], ["prod"], name="mul"),
        helper.make_node("MatMul", ["a", "w"], ["m"], name="matmul"),
        helper.make_node("Add", ["m", "b"], ["total"], name="add"),
    ]
    return model(nodes, {"b": (1, 16), "a": (1, 16)}, {"total": (1, 16), "prod": (1, 16)}, {"w": weight((16, 16), 5)})


def _feeds(m: onnx.ModelProto, seed: int, n: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        vi.name: rng.normal(0, 1, [n] + [d.dim_value for d in vi.type.tensor_type.shape.dim][1:]).astype(np.float32)
        for vi in m.graph.input
    }


def _calib(m: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    return [_feeds(m, 100, 16)]


def _export(m: onnx.ModelProto, kind: str) -> bytes:
    """kind: float32 / float16 / dynamic (float model), or int8-<io> (lowbit's QDQ model, io float/int8/uint8)."""
    if not kind.startswith("int8"):
        return convert(m, precision=kind).data
    io = kind.split("-")[1]
    qmodel = lowbit.quantize(m, calib=_calib(m), progress=False).model
    return convert(qmodel, io=io, calib=_calib(m) if io != "float" else None).data


def _to_tflite(x: np.ndarray, details: dict) -> np.ndarray:
    """Real values as the .tflite input wants them: NHWC, quantized if the input is integer."""
    x = x.transpose(0, 2, 3, 1) if x.ndim == 4 else x
    if details["dtype"] == np.float32:
        return x
    s, z = details["quantization"]
    info = np.iinfo(details["dtype"])
    return np.clip(np.round(x / s) + z, info.min, info.max).astype(details["dtype"])


def _real(y: np.ndarray, details: dict) -> np.ndarray:
    if details["dtype"] == np.float32:
        return y
    s, z = details["quantization"]
    return (y.astype(np.float32) - z) * s


KINDS = ["float32", "float16", "dynamic", "int8-float", "int8-int8", "int8-uint8"]


@pytest.mark.parametrize("kind", KINDS)
def test_serving_default_names_onnx_inputs_and_outputs(kind):
    m = classifier()
    data = _export(m, kind)
    it = litert.Interpreter(model_content=data, num_threads=1)
    assert it.get_signature_list() == {"serving_default": {"inputs": ["input.1"], "outputs": ["logits"]}}
    # the signature points at the subgraph's own input and output tensors
    runner = it.get_signature_runner("serving_default")
    assert runner.get_input_details()["input.1"]["index"] == it.get_input_details()[0]["index"]
    assert runner.get_output_details()["logits"]["index"] == it.get_output_details()[0]["index"]
    # the runner computes what invoke() computes
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    x = _to_tflite(_feeds(m, 1)["input.1"], inp)
    got = runner(**{"input.1": x})
    assert list(got) == ["logits"]
    ref = litert.Interpreter(model_content=data, num_threads=1)
    ref.allocate_tensors()
    ref.set_tensor(inp["index"], x)
    ref.invoke()
    np.testing.assert_array_equal(got["logits"], ref.get_tensor(out["index"]))


def test_signature_def_in_the_flatbuffer():
    """Read back through the schema: one SignatureDef, key serving_default, subgraph 0, names -> tensor indices."""
    data = convert(two_in_two_out()).data
    fm = _module("Model").Model.GetRootAs(data, 0)
    assert fm.SignatureDefsLength() == 1
    sd = fm.SignatureDefs(0)
    assert sd.SignatureKey() == b"serving_default" and sd.SubgraphIndex() == 0
    sg = fm.Subgraphs(0)
    ins = {sd.Inputs(i).Name().decode(): sd.Inputs(i).TensorIndex() for i in range(sd.InputsLength())}
    outs = {sd.Outputs(i).Name().decode(): sd.Outputs(i).TensorIndex() for i in range(sd.OutputsLength())}
    assert list(ins) == ["b", "a"] and list(outs) == ["total", "prod"]  # the ONNX graph's order
    assert list(ins.values()) == list(sg.InputsAsNumpy()) and list(outs.values()) == list(sg.OutputsAsNumpy())
    for name, index in {**ins, **outs}.items():
        assert sg.Tensors(index).Name().decode() == name


@pytest.mark.parametrize("kind", ["float32", "float16", "int8-float", "int8-uint8"])
def test_two_inputs_two_outputs_map_to_the_right_tensors(kind):
    m = two_in_two_out()
    data = _export(m, kind)
    it = litert.Interpreter(model_content=data, num_threads=1)
    sig = it.get_signature_list()["serving_default"]
    assert sorted(sig["inputs"]) == ["a", "b"] and sorted(sig["outputs"]) == ["prod", "total"]
    runner = it.get_signature_runner("serving_default")
    ins, outs = runner.get_input_details(), runner.get_output_details()
    feeds = _feeds(m, 2)
    a, b = feeds["a"], feeds["b"]
    got = runner(**{name: _to_tflite(x, ins[name]) for name, x in feeds.items()})
    got = {name: _real(y, outs[name]) for name, y in got.items()}
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    want = {"prod": a * b, "total": a @ w + b}
    # a swap (a <-> b, or prod <-> total) is off by about the values themselves; int8 by a few output steps
    for name in ("prod", "total"):
        q = outs[name]["quantization"][0] if kind != "int8-float" else float(np.abs(want[name]).max()) / 64
        tol = {"float32": 1e-5, "float16": 1e-2}.get(kind, 3 * q)
        np.testing.assert_allclose(got[name], want[name], atol=tol)
        assert np.abs(got[name] - want["total" if name == "prod" else "prod"]).max() > 10 * tol
    # and invoke() with set_tensor on the same tensor indices agrees bit for bit
    ref = litert.Interpreter(model_content=data, num_threads=1)
    ref.allocate_tensors()
    for name, x in feeds.items():
        ref.set_tensor(ins[name]["index"], _to_tflite(x, ins[name]))
    ref.invoke()
    for name in ("prod", "total"):
        np.testing.assert_array_equal(_real(ref.get_tensor(outs[name]["index"]), outs[name]), got[name])
