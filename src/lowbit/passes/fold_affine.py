"""Fold a per-channel constant Mul, Add or Sub that follows a convolution into its weights and bias.

Exporters write BatchNorm as arithmetic (`Conv -> Mul(scale) -> Add(shift)`, e.g. Keras/tf2onnx or a model whose
BatchNorm was folded by hand). Left alone, the Conv's output is quantized before the scale with one range for
all channels, set by the channels the scale nearly zeroes: on the captcha CRNN of the real-world corpus that cost
4 points of CTC exact match (a synthetic block: 9.5 dB SQNR as exported, 37.6 dB folded; bench/RESULTS_RECOGNIZERS.md).
Folded, the scale sits in the per-channel weight scales, where it costs nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph.edit import new_constant
from .fold_batchnorm import _const


def _channel_constant(c: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """c as one value per output channel, if broadcasting it against an output of `rank` dims ([N, C, ...])
    applies one value per channel and leaves the output's shape as it is; None otherwise."""
    if c.ndim > rank or c.dtype != np.float32:
        return None
    if c.size == 1:
        return np.full(channels, c.reshape(()), np.float32)
    shape = (1,) * (rank - c.ndim) + c.shape
    if shape[1] != channels or any(d != 1 for i, d in enumerate(shape) if i != 1):
        return None
    return c.reshape(channels)


def _set(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, name: str) -> None:
    value = new_constant(graph, name, array)
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _fold_one(graph: ir.Graph, conv: ir.Node) -> bool:
    out = conv.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return False
    op = uses[0].node
    if op.op_type not in ("Mul", "Add", "Sub") or len(op.inputs) != 2 or op.graph is not graph:
        return False
    this = 0 if op.inputs[0] is out else 1
    if op.op_type == "Sub" and this != 0:  # c - conv would flip the weights' sign: rare, left alone
        return False
    w = _const(conv.inputs[1])
    c = _const(op.inputs[1 - this])
    if w is None or c is None or w.dtype != np.float32:
        return False
    transposed = conv.op_type == "ConvTranspose"
    if transposed and conv.attributes.get_int("group", 1) != 1:
        return False
    axis = 1 if transposed else 0  # the weights' output-channel axis
    channels = w.shape[axis]
    per_channel = _channel_constant(c, channels, w.ndim)
    if per_channel is None:
        return False
    bias = _const(conv.inputs[2]) if len(conv.inputs) > 2 else None
    bias = np.zeros(channels, np.float32) if bias is None else bias
    stem = conv.name or out.name or "conv"
    if op.op_type == "Mul":
        shape = [1] * w.ndim
        shape[axis] = channels
        _set(graph, conv, 1, (w * per_channel.reshape(shape)).astype(np.float32), f"{stem}_affine_w")
        _set(graph, conv, 2, (bias * per_channel).astype(np.float32), f"{stem}_affine_b")
    else:
        sign = 1.0 if op.op_type == "Add" else -1.0
        _set(graph, conv, 2, (bias + sign * per_channel).astype(np.float32), f"{stem}_affine_b")
    result = op.outputs[0]
    name = result.name
    if out.type is None:
        out.type = result.type
    result.replace_all_uses_with(out, replace_graph_outputs=True)
    result.name = None
    out.name = name
    graph.remove(op, safe=True)
    return True


def _scalar_before(graph: ir.Graph, x: ir.Value | None, op_type: str) -> tuple[ir.Node, ir.Value, float] | None:
    """The Mul/Add by a one-element float constant that makes `x`, read by one node only: (node, its data input,
    the constant)."""
    op = x.producer() if x is not None else None
    if op is None or op.op_type != op_type or op.graph is not graph or len(op.inputs) != 2 or op.domain != "":
        return None
    if x is None or x.is_graph_output() or len(x.uses()) != 1:
        return None
    for this in (0, 1):
        c = _const(op.inputs[1 - this])
        data = op.inputs[this]
        if c is not None and c.size == 1 and c.dtype == np.float32 and data is not None and _const(data) is None:
            return op, data, float(c.reshape(()))
    return None


def _unpadded(conv: ir.Node) -> bool:
    pads = conv.attributes.get_ints("pads", None)
    return conv.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads or ())


def _fold_before(graph: ir.Graph, conv: ir.Node) -> bool:
    """Fold a scalar affine `a * h + b` (PP-LCNetV3's learnable affine after each activation) into the Conv reading
    it, so the activation is quantized once instead of three times (after it, after the Mul, after the Add):
    conv(a * h) = (a * W) conv h, exactly, padding included; conv(h + b) = conv(h) + b * sum(W) only where no padding
    adds zeros, so a padded conv takes `a` only, the shift moved before it (a * h + b = a * (h + b / a))."""
    w = _const(conv.inputs[1])
    if conv.op_type != "Conv" or w is None or w.dtype != np.float32:
        return False
    stem = conv.name or "conv"
    bias = _const(conv.inputs[2]) if len(conv.inputs) > 2 else None
    bias = np.zeros(w.shape[0], np.float32) if bias is None else bias
    add = _scalar_before(graph, conv.inputs[0], "Add")
    if add is not None and _unpadded(conv):
        op, data, b = add
        _set(graph, conv, 2, (bias + b * w.reshape(w.shape[0], -1).sum(1)).astype(np.float32), f"{stem}_shift_b")
    elif add is not None:
        op, data, b = add
        mul = _scalar_before(graph, data, "Mul")
        if mul is None or mul[2] == 0.0:
            return False
        inner, h, a = mul
        # a * h + b -> (h + b / a) then a into the weights: the Add reads h directly, the Mul goes
        shift = next(i for i, v in enumerate(op.inputs) if v is not data)
        _set(graph, op, shift, np.array(b / a, np.float32), f"{stem}_shift")
        op.replace_input_with(1 - shift, h)
        graph.remove(inner, safe=True)
        _set(graph, conv, 1, (w * a).astype(np.float32), f"{stem}_scale_w")
        return True
    else:
        mul = _scalar_before(graph, conv.inputs[0], "Mul")
        if mul is None:
            return False
        op, data, a = mul
        _set(graph, conv, 1, (w * a).astype(np.float32), f"{stem}_scale_w")
    conv.replace_input_with(0, data)
    graph.remove(op, safe=True)
    return True


def fold_affine(model: ir.Model) -> bool:
    """Fold constant per-channel Mul/Add/Sub after Conv and ConvTranspose (group 1), repeatedly (Mul then Add), and
    a scalar Mul/Add before a Conv."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if node.op_type in ("Conv", "ConvTranspose") and len(node.outputs) == 1:
            while _fold_one(graph, node):
                changed = True
            while _fold_before(graph, node):
                changed = True
    return changed
