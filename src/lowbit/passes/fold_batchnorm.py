"""Fold inference-mode BatchNormalization into a linear layer next to it.

Backward, into the Conv, ConvTranspose or Gemm that feeds it (a decoder's upsampling ConvTranspose -> BatchNorm, as
U-Nets and DBNet-style text detectors have; a face embedder's Gemm -> BatchNorm1d). Forward, into the layer that
reads it, where that is exact: a Conv without padding (zero padding in front of a BatchNorm is not zero behind it),
or a Gemm, directly or through a Flatten (ArcFace's BatchNorm2d -> Flatten -> Gemm head). Left alone, each would be a
float op between quantized ones."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..graph.edit import new_constant


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _scaled(w: np.ndarray, factor: np.ndarray, conv: ir.Node) -> np.ndarray:
    """The weights with output channel o scaled by factor[o]. Conv's weights are [C_out, C_in / group, ...];
    ConvTranspose's are [C_in, C_out / group, ...], group g's input rows writing its block of output channels;
    Gemm's B is [K, N], or [N, K] with transB."""
    if conv.op_type == "Gemm":
        return (w * (factor[:, None] if conv.attributes.get_int("transB", 0) else factor[None, :])).astype(w.dtype)
    if conv.op_type == "Conv":
        return (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    group = conv.attributes.get_int("group", 1)
    rows = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
    out = rows * factor.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))
    return out.reshape(w.shape).astype(w.dtype)


def _affine(bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | None:
    """(a, b) with BatchNorm(x) = a * x + b per channel, if its parameters are constants and it is in inference
    mode."""
    training = bn.attributes.get_int("training_mode", 0)
    if bn.op_type != "BatchNormalization" or len(bn.outputs) != 1 or training:
        return None
    gamma, beta, mean, var = (_const(v) for v in bn.inputs[1:5])
    if gamma is None or beta is None or mean is None or var is None or gamma.dtype != np.float32:
        return None
    a = (gamma / np.sqrt(var + bn.attributes.get_float("epsilon", 1e-5))).astype(np.float32)
    return a, (beta - mean * a).astype(np.float32)


def _plain_gemm(node: ir.Node) -> bool:
    """A Gemm computing A x B + C with a constant B and no scaling (alpha, beta 1) or transposed A."""
    return (
        node.op_type == "Gemm"
        and node.attributes.get_float("alpha", 1.0) == 1.0
        and node.attributes.get_float("beta", 1.0) == 1.0
        and not node.attributes.get_int("transA", 0)
        and _const(node.inputs[1]) is not None
        and (len(node.inputs) < 3 or node.inputs[2] is None or _const(node.inputs[2]) is not None)
    )


def _set_weights(graph: ir.Graph, node: ir.Node, w: np.ndarray, b: np.ndarray, stem: str) -> None:
    w_in = node.inputs[1]
    assert w_in is not None
    node.replace_input_with(1, new_constant(graph, f"{w_in.name}_bnfold", w))
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, new_constant(graph, f"{stem}_bias", b.astype(w.dtype)))


def _backward(graph: ir.Graph, bn: ir.Node, a: np.ndarray, shift: np.ndarray) -> bool:
    x = bn.inputs[0]
    assert x is not None  # BatchNormalization's input X is required
    conv = x.producer()
    if conv is None or len(x.uses()) != 1 or x.is_graph_output() or conv.graph is not graph:
        return False
    if conv.op_type not in ("Conv", "ConvTranspose") and not _plain_gemm(conv):
        return False
    w = _const(conv.inputs[1])
    if w is None or w.dtype != np.float32:
        return False
    b = _const(conv.inputs[2]) if len(conv.inputs) > 2 else None
    if conv.op_type == "Gemm" and b is not None and b.size not in (1, a.size):
        return False  # C of another shape (per row) is not a per-channel bias
    _set_weights(graph, conv, _scaled(w, a, conv), (b if b is not None else 0.0) * a + shift, bn.name or "bn")
    out = bn.outputs[0]
    name = out.name
    # The layer's output takes the BN output's place (maybe as a graph output): keep its declared type.
    if conv.outputs[0].type is None:
        conv.outputs[0].type = out.type
    if conv.outputs[0].shape is None:
        conv.outputs[0].shape = out.shape
    out.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
    out.name = None
    conv.outputs[0].name = name
    graph.remove(bn, safe=True)
    return True


def _unpadded(conv: ir.Node) -> bool:
    pads = conv.attributes.get_ints("pads", None)
    return conv.attributes.get_string("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(pads or ())


def _forward(graph: ir.Graph, bn: ir.Node, a: np.ndarray, shift: np.ndarray) -> bool:
    """conv(a * x + b) = conv'(x): each input channel's weights times a, their sum against b into the bias."""
    y, x = bn.outputs[0], bn.inputs[0]
    assert x is not None
    if y.is_graph_output() or len(y.uses()) != 1:
        return False
    reader, flat = next(iter(y.uses())).node, None
    if reader.op_type == "Flatten" and reader.attributes.get_int("axis", 1) == 1 and len(reader.outputs[0].uses()) == 1:
        flat, reader = reader, next(iter(reader.outputs[0].uses())).node
        if flat.outputs[0].is_graph_output():
            return False
    w = _const(reader.inputs[1]) if len(reader.inputs) > 1 else None
    if (
        w is None
        or w.dtype != np.float32
        or reader.graph is not graph
        or reader.inputs[0] is not (flat or bn).outputs[0]
    ):
        return False
    b = _const(reader.inputs[2]) if len(reader.inputs) > 2 else None
    if reader.op_type == "Conv" and flat is None and _unpadded(reader):
        group = reader.attributes.get_int("group", 1)
        per_in = w.shape[1]  # input channels each output channel reads
        if per_in * group != a.size:
            return False
        rows = np.arange(w.shape[0]) // (w.shape[0] // group) * per_in  # first input channel of each row's group
        idx = rows[:, None] + np.arange(per_in)[None, :]  # [C_out, C_in / group] -> input channel
        span = (slice(None), slice(None), *([None] * (w.ndim - 2)))
        new_w = (w * a[idx][span]).astype(np.float32)
        extra = (w * shift[idx][span]).reshape(w.shape[0], -1).sum(1)
    elif _plain_gemm(reader) and (
        flat is not None or len(a) == w.shape[1 if reader.attributes.get_int("transB", 0) else 0]
    ):
        trans = reader.attributes.get_int("transB", 0)
        k = w.shape[1 if trans else 0]
        if k % a.size:
            return False
        # Flatten(axis=1) of [N, C, ...] is channel-major: each channel's values are k / C adjacent columns
        ka, kb = np.repeat(a, k // a.size), np.repeat(shift, k // a.size)
        new_w = (w * (ka[None, :] if trans else ka[:, None])).astype(np.float32)
        extra = w @ kb if trans else kb @ w
        if b is not None and b.size not in (1, extra.size):
            return False
    else:
        return False
    _set_weights(graph, reader, new_w, (b if b is not None else 0.0) + extra, bn.name or "bn")
    (flat or reader).replace_input_with(0, x)
    graph.remove(bn, safe=True)
    return True


def fold_batchnorm(model: ir.Model) -> bool:
    graph = model.graph
    changed = False
    for bn in list(graph):
        found = _affine(bn)
        if found is not None and (_backward(graph, bn, *found) or _forward(graph, bn, *found)):
            changed = True
    return changed
