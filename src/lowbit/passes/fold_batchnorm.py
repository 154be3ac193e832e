"""Fold inference-mode BatchNormalization into the Conv or ConvTranspose that feeds it (a decoder's upsampling
ConvTranspose -> BatchNorm, as U-Nets and DBNet-style text detectors have, would otherwise stay a float op between
quantized ones)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def _const(v: ir.Value | None) -> np.ndarray | None:
    return None if v is None or v.const_value is None else v.const_value.numpy()


def _scaled(w: np.ndarray, factor: np.ndarray, conv: ir.Node) -> np.ndarray:
    """The weights with output channel o scaled by factor[o]. Conv's weights are [C_out, C_in / group, ...];
    ConvTranspose's are [C_in, C_out / group, ...], group g's input rows writing its block of output channels."""
    if conv.op_type == "Conv":
        return (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(w.dtype)
    group = conv.attributes.get_int("group", 1)
    rows = w.reshape(group, w.shape[0] // group, w.shape[1], *w.shape[2:])
    out = rows * factor.reshape(group, 1, w.shape[1], *([1] * (w.ndim - 2)))
    return out.reshape(w.shape).astype(w.dtype)


def fold_batchnorm(model: ir.Model) -> bool:
    graph = model.graph
    changed = False
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or len(bn.outputs) != 1:
            continue
        x = bn.inputs[0]
        assert x is not None  # BatchNormalization's input X is required
        conv = x.producer()
        if conv is None or conv.op_type not in ("Conv", "ConvTranspose") or len(x.uses()) != 1 or x.is_graph_output():
            continue
        w_in = conv.inputs[1]
        w = _const(w_in)
        b = _const(conv.inputs[2]) if len(conv.inputs) > 2 else None
        gamma, beta, mean, var = (_const(v) for v in bn.inputs[1:5])
        if w_in is None or w is None or gamma is None or beta is None or mean is None or var is None:
            continue
        eps = bn.attributes.get_float("epsilon", 1e-5)
        factor = gamma / np.sqrt(var + eps)
        new_w = _scaled(w, factor, conv)
        new_b = ((b if b is not None else 0.0) - mean) * factor + beta
        w_val = ir.Value(name=f"{w_in.name}_bnfold", const_value=ir.tensor(new_w))
        b_val = ir.Value(name=f"{bn.name or bn.outputs[0].name}_bias", const_value=ir.tensor(new_b.astype(w.dtype)))
        for v in (w_val, b_val):
            tensor = v.const_value
            assert tensor is not None
            v.shape = ir.Shape(tensor.shape.numpy())
            v.dtype = tensor.dtype
            graph.register_initializer(v)
        conv.replace_input_with(1, w_val)
        if len(conv.inputs) > 2:
            conv.replace_input_with(2, b_val)
        else:
            conv.resize_inputs(3)
            conv.replace_input_with(2, b_val)
        out = bn.outputs[0]
        name = out.name
        # The conv output takes the BN output's place (maybe as a graph output): keep its declared type.
        if conv.outputs[0].type is None:
            conv.outputs[0].type = out.type
        if conv.outputs[0].shape is None:
            conv.outputs[0].shape = out.shape
        out.replace_all_uses_with(conv.outputs[0], replace_graph_outputs=True)
        out.name = None
        conv.outputs[0].name = name
        graph.remove(bn, safe=True)
        changed = True
    return changed
