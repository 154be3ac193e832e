"""An elementwise chain on one int8 value, rounded between its steps, as a 256-entry table.

A chain the exporter fuses into one TFLite op (x * 0.5 * (1 + erf(x / sqrt 2)) -> GELU) computes the function in one
go and rounds once. lowbit's QDQ model may quantize the chain's intermediate values too (the Erf, the Add, the
first Mul): ONNX Runtime then rounds after each step, and the two runtimes part. On the spindle EEG U-Net 6.3% of
the first GELU's outputs were a step apart, on MiniLM 11% of layer 0's (up to 3 steps). The chain's output is a
function of its int8 input alone, so it has 256 values: ONNX Runtime computes them once, on the chain's own QDQ
sub-model (its kernels, as the int8 ONNX runs it), and the .tflite looks them up: CAST to int32, ADD 128, GATHER.
The same integers by construction (`tests/test_tflite_table.py`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...errors import LowbitError
from .qdq import Graph

OPSET = 17


def chain_table(g: Graph, chain: list[onnx.NodeProto], x: str) -> np.ndarray:
    """The int8 output of `chain` (nodes in order, the last one's output the result) for x = -128..127, as ONNX
    Runtime computes the QDQ model: x and every quantized value of the chain rounded with its parameters."""
    import onnxruntime as ort

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def params(value: str) -> tuple[str, str]:
        qp = g.quant[value]
        s, z = f"{value}__scale", f"{value}__zero"
        inits.append(numpy_helper.from_array(np.asarray(qp.scale[0], np.float32), s))
        inits.append(numpy_helper.from_array(_onnx_ints(g, value, qp.zero_point[0]), z))
        return s, z

    s, z = params(x)
    nodes.append(helper.make_node("DequantizeLinear", ["x_int8", s, z], [x]))
    last = chain[-1].output[0]
    for node in chain:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        for i in copy.input:
            if i in {t.name for t in inits} or i in {o for n in nodes for o in n.output}:
                continue
            if i in g.qconsts:  # an int8 constant behind a DequantizeLinear: ORT's kernels take it as integers
                qt = g.qconsts[i]
                if qt.quant.scale.size != 1:
                    raise LowbitError(f"node {node.name}: a per-channel constant operand {i} cannot be tabulated")
                inits += [
                    numpy_helper.from_array(_onnx_ints(g, i, qt.data), f"{i}__int8"),
                    numpy_helper.from_array(np.asarray(qt.quant.scale[0], np.float32), f"{i}__scale"),
                    numpy_helper.from_array(_onnx_ints(g, i, qt.quant.zero_point[0]), f"{i}__zero"),
                ]
                nodes.append(helper.make_node("DequantizeLinear", [f"{i}__int8", f"{i}__scale", f"{i}__zero"], [i]))
            elif i in g.consts:
                inits.append(numpy_helper.from_array(np.asarray(g.consts[i]), i))
        y = copy.output[0]
        if y == last:
            copy.output[0] = f"{y}__float"
            s, z = params(y)
            nodes += [copy, helper.make_node("QuantizeLinear", [copy.output[0], s, z], ["y_int8"])]
        elif y in g.quant:  # rounded here in the ONNX model: Q -> DQ under the same name
            copy.output[0] = f"{y}__float"
            s, z = params(y)
            nodes += [
                copy,
                helper.make_node("QuantizeLinear", [copy.output[0], s, z], [f"{y}__int8"]),
                helper.make_node("DequantizeLinear", [f"{y}__int8", s, z], [y]),
            ]
        else:
            nodes.append(copy)
    xs = _onnx_ints(g, x, np.arange(-128, 128))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x_int8", helper.np_dtype_to_tensor_dtype(xs.dtype), [256])],
        [helper.make_empty_tensor_value_info("y_int8")],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    try:
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"x_int8": xs})
    except Exception as e:  # noqa: BLE001 - ORT raises several unrelated types for a bad model
        raise LowbitError(
            f"node {chain[-1].name or last}: cannot tabulate its int8 chain in ONNX Runtime "
            f"({str(e).splitlines()[0][:200]})"
        ) from None
    return (np.asarray(y, np.int16) - (128 if last in g.uint8 else 0)).astype(np.int8)


def _onnx_ints(g: Graph, name: str, values: object) -> np.ndarray:
    """int8 integers as the ONNX model holds them: uint8 (shifted back by 128) where it did."""
    v = np.asarray(values, np.int16)
    return (v + 128).astype(np.uint8) if name in g.uint8 else v.astype(np.int8)


def rounded_inside(g: Graph, chain: list[onnx.NodeProto], x: str) -> bool:
    """The chain's input and output are int8 and the ONNX model rounds at least one value in between."""
    return x in g.quant and chain[-1].output[0] in g.quant and any(n.output[0] in g.quant for n in chain[:-1])
