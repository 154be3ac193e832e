"""TFLite's int8 LOGISTIC, SOFTMAX and TANH write fixed output parameters (1/256 and 1/128 steps); give lowbit's
Sigmoid/Softmax/Tanh outputs exactly those, so the exported .tflite needs no requantization after them.

With another output scale the export runs LOGISTIC (rounded to 1/256) then a QUANTIZE to the model's scale: two
roundings where ONNX Runtime's QLinearSigmoid table rounds once. On the corpus YOLO-style head (SiLU everywhere)
that made 30% of the first Sigmoid's outputs one step apart from ONNX Runtime's, and the difference grew through
the network (top-class agreement with the int8 ONNX 0.983). With the fixed parameters both runtimes round
sigmoid(x) once, to the same grid.

Only outputs whose calibrated step is at least half the fixed one move: a narrower range (a gate that stays below
0.1) keeps its finer scale in ONNX Runtime, and the .tflite requantizes it as before. A model output keeps its scale
too: on the corpus DBNet, thresholding the probability map at 0.5 on the 1/256 grid (0.5 is a grid point) cost 1
point of IoU against float (0.827 -> 0.816).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from ..graph.index import GraphIndex

# op -> (scale, int8 zero point); uint8 zero points are 128 more (the .tflite's int8 is the uint8 value - 128)
FIXED = {"Sigmoid": (1.0 / 256, -128), "Softmax": (1.0 / 256, -128), "Tanh": (1.0 / 128, 0)}


def fix_output_params(model: onnx.ModelProto) -> dict[str, tuple[float, int]]:
    """Set the fixed parameters on each quantized Sigmoid/Softmax/Tanh output (its QuantizeLinear and the
    DequantizeLinear nodes reading it get new one-value initializers). Changes `model` in place; returns
    tensor -> (scale, zero point) for what changed."""
    g = GraphIndex(model.graph)
    outputs = {o.name for o in model.graph.output}
    changed: dict[str, tuple[float, int]] = {}
    for node in list(model.graph.node):
        fixed = FIXED.get(node.op_type)
        src = g.producer_node(node.input[0]) if fixed else None
        if fixed is None or src is None or src.op_type != "DequantizeLinear":
            continue
        readers = g.reader_nodes(node.output[0])
        if len(readers) != 1 or readers[0].op_type != "QuantizeLinear" or len(readers[0].input) != 3:
            continue
        q = readers[0]
        dqs = g.reader_nodes(q.output[0])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs):
            continue
        if any(d.output[0] in outputs for d in dqs):
            continue  # a model output (a probability map) keeps its scale: thresholds at 0.5 fall between steps
        if q.input[1] not in g.inits or q.input[2] not in g.inits:
            continue
        old_scale, zp = numpy_helper.to_array(g.inits[q.input[1]]), numpy_helper.to_array(g.inits[q.input[2]])
        if old_scale.size != 1 or zp.dtype not in (np.int8, np.uint8):
            continue
        scale, zero = fixed[0], fixed[1] + (128 if zp.dtype == np.uint8 else 0)
        if float(old_scale) < scale / 2 or (float(old_scale) == np.float32(scale) and int(zp) == zero):
            continue  # a narrow range keeps its scale; a re-applied plan's parameters are fixed already
        name = node.output[0]
        s_new = numpy_helper.from_array(np.array(scale, np.float32), q.input[1])
        z_new = numpy_helper.from_array(np.array(zero, zp.dtype), q.input[2])
        mine = {id(n) for n in (q, *dqs)}
        shared = any(i in (q.input[1], q.input[2]) for n in model.graph.node if id(n) not in mine for i in n.input)
        if shared:  # other tensors use these initializers: give this one its own
            s_new.name, z_new.name = f"{name}_fixed_s", f"{name}_fixed_zp"
            model.graph.initializer.extend([s_new, z_new])
            for n in (q, *dqs):
                n.input[1], n.input[2] = s_new.name, z_new.name
        else:  # in place: same names and order as a re-applied plan writes, so the bytes are the same
            g.inits[q.input[1]].CopyFrom(s_new)
            g.inits[q.input[2]].CopyFrom(z_new)
            for n in dqs:
                n.input[1], n.input[2] = q.input[1], q.input[2]
        changed[name] = (scale, zero)
    return changed
