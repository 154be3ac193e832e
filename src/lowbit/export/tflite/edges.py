"""The graph's edges: input and output tensors in the io kind asked for (float, int8, uint8), and int8 parameters
for a model output the quantizer left float (a classifier's last layer) when its range can be known."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ...errors import LowbitError
from ...graph.io import load_proto
from .context import Context
from .qdq import Graph
from .writer import QuantParams, Tensor


def quantize_float_outputs(
    g: Graph,
    model: str | Path | onnx.ModelProto,
    outputs: list[str],
    calib: Any,
    preprocess: Any,
    ranges: dict[str, list],
    required: bool,
) -> None:
    """A weighted layer the quantizer left float at the model's edge (a classifier's last Gemm) runs int8 when the
    output's range is known: from the plan (`Plan.output_ranges`, calibrated on the float model when it was
    quantized), or measured on `calib` when it is given (ONNX Runtime, the int8 model). Then one
    DEQUANTIZE at the edge replaces QUANTIZE + float kernel + DEQUANTIZE. `required` (integer io): a range must
    be found."""
    producer = {o: n for n in g.nodes for o in n.output}
    todo = []
    for name in outputs:
        node = producer.get(name)
        if name in g.quant or node is None or node.op_type not in ("Gemm", "MatMul", "Conv"):
            continue
        if node.input[1] in g.qconsts and node.input[0] in g.quant:
            todo.append(name)
    from ...numerics import scale_zero_point

    def give(n: str, lo: float, hi: float) -> None:
        scale, zp = scale_zero_point(lo, hi, "int8", symmetric=False)
        g.quant[n] = QuantParams(np.asarray(scale, np.float32).reshape(1), np.asarray(zp, np.int64).reshape(1))

    if calib is None:  # data given on purpose wins over the plan's range (measured on the float model)
        for n in [n for n in todo if n in ranges]:
            give(n, float(ranges[n][0]), float(ranges[n][1]))
            todo.remove(n)
    if not todo or (calib is None and not required):
        return
    if calib is None:
        raise LowbitError(
            f"output {todo[0]} is float in the model and no plan beside it records its range (lowbit keeps a "
            "weighted layer's model output float); pass --calib DATA so the export can measure it, re-quantize "
            "with this lowbit (its plan records output ranges), or use --io float"
        )
    from ...data import input_specs, open_data
    from ...runtimes.ort import session, with_outputs

    proto = load_proto(model)
    sess = session(with_outputs(proto, todo), "kernels")
    index = [o.name for o in sess.get_outputs()]
    lo, hi = {n: np.inf for n in todo}, {n: -np.inf for n in todo}
    for batch in open_data(calib, input_specs(proto), preprocess=preprocess):
        values = sess.run(None, batch)
        for n in todo:
            v = values[index.index(n)]
            lo[n], hi[n] = min(lo[n], float(v.min())), max(hi[n], float(v.max()))
    for n in todo:
        give(n, lo[n], hi[n])


def _is_transpose(node: onnx.NodeProto, perm: list[int]) -> bool:
    return node.op_type == "Transpose" and [list(a.ints) for a in node.attribute if a.name == "perm"] == [perm]


def channels_last(g: Graph, name: str) -> bool:
    """Whether input `name` reaches only Transposes from NHWC to NCHW, directly or through elementwise arithmetic
    with constants (tf2onnx's Keras models: `x * 1/127.5 - 1`, then the layout change): declared as it is, the
    .tflite takes the photo in the layout the ONNX model does, and those Transposes write nothing."""
    seen, todo = set(), [name]
    while todo:
        value = todo.pop()
        readers = [n for n in g.nodes if value in n.input]
        if not readers:
            return False
        for n in readers:
            if _is_transpose(n, [0, 3, 1, 2]):
                continue
            if n.op_type not in ("Add", "Sub", "Mul", "Div") or any(i != value and i not in g.consts for i in n.input):
                return False
            if n.output[0] not in seen:
                seen.add(n.output[0])
                todo.append(n.output[0])
    return True


def edge_input(ctx: Context, name: str, io: str, nhwc: bool = True) -> int:
    """The input as the .tflite declares it: 4-D NHWC (`nhwc`), or as the ONNX model has it (already channels-last:
    its readers turn it to NCHW)."""
    q = ctx.quant(name)
    if io == "float" or q is None:
        if io != "float":
            raise LowbitError(f"--io {io}: input {name} is not quantized in the model; use --io float")
        return ctx.produce(name, "f", nhwc)
    if io == "int8":
        return ctx.produce(name, "q", nhwc)
    idx = ctx.fm.add_tensor(
        Tensor(name, ctx.shape(name, nhwc), "uint8", quant=QuantParams(q.scale, q.zero_point + 128))
    )
    out = ctx.produce(name, "q", nhwc)
    ctx.fm.tensors[out].name = f"{name}_int8"
    ctx.op("QUANTIZE", [idx], [out])
    return idx


def made_channels_last(g: Graph, name: str) -> bool:
    """Whether output `name` is a Transpose from NCHW to NHWC: the ONNX model hands it on channels-last already,
    so the .tflite declares it as it is (the Transpose writes nothing)."""
    node = next((n for n in g.nodes if name in n.output), None)
    return node is not None and _is_transpose(node, [0, 2, 3, 1])


def edge_output(ctx: Context, name: str, onnx_name: str, io: str, nhwc: bool = True) -> int:
    """The output as the .tflite declares it: 4-D NHWC (`nhwc`), whatever layout computed it, or as it is."""
    q = ctx.quant(name)
    if io == "float" or q is None:
        if io != "float":
            raise LowbitError(f"--io {io}: output {onnx_name} is not quantized in the model; use --io float")
        idx = ctx.get(name, "f", nhwc)
    else:
        idx = ctx.get(name, "q", nhwc)
        if io == "uint8":
            src = idx
            idx = ctx.fm.add_tensor(
                Tensor(onnx_name, ctx.fm.tensors[src].shape, "uint8", quant=QuantParams(q.scale, q.zero_point + 128))
            )
            ctx.op("QUANTIZE", [src], [idx])
    ctx.fm.tensors[idx].name = onnx_name
    return idx
