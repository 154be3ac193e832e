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
    unique, n = name, 1
    while unique in graph.initializers:  # each fold of a chain makes new values; the old ones go unused
        unique, n = f"{name}_{n}", n + 1
    value = ir.Value(name=unique, const_value=ir.tensor(array))
    value.shape = ir.Shape(array.shape)
    value.dtype = ir.DataType.FLOAT
    graph.register_initializer(value)
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


def fold_affine(model: ir.Model) -> bool:
    """Fold constant per-channel Mul/Add/Sub after Conv and ConvTranspose (group 1), repeatedly (Mul then Add)."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if node.op_type in ("Conv", "ConvTranspose") and len(node.outputs) == 1:
            while _fold_one(graph, node):
                changed = True
    return changed
