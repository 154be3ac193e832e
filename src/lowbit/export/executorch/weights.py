"""lowbit's int8 weights and biases in the converted PT2E graph.

lowbit's ONNX path changes weights and biases after choosing their scales (`apply._quantize_weight`): the
overflow guard rescales or trims the output channels whose neighbouring products could saturate an int16 on x86
CPUs without VNNI, and bias correction subtracts from each bias the mean output shift the rounded weights cause.
Rather than recompute them in PT2E, `install` copies each conv/linear's integers from lowbit's int8 ONNX model of
the same module (`twin.py`) into the converted graph: the int8 weight and its scales, and the bias as the float
value of its int32 (XNNPACK quantizes that bias with input scale x weight scale, back to the same int32).
A conv/linear lowbit computes in float (the final Gemm, whose logits stay float) gets its weight dequantized from
the same integers: ONNX Runtime's DQ -> Gemm computes exactly that.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...numerics import dequantize

CONV = torch.ops.aten.conv2d.default
LINEAR = torch.ops.aten.linear.default
DEQUANT_CHANNEL = torch.ops.quantized_decomposed.dequantize_per_channel.default
PADS = (torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default)


def _attr(model: torch.fx.GraphModule, target: str) -> torch.Tensor:
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    assert isinstance(obj, torch.Tensor)
    return obj


def _zero_pad(node: torch.fx.Node) -> bool:
    if node.target == torch.ops.aten.constant_pad_nd.default:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        return not value
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return mode == "constant" and not value


def install(model: torch.fx.GraphModule, layers: dict[str, Any]) -> int:
    """After convert_pt2e: each conv/linear named in `layers` (node name -> `twin.TwinLayer`) takes the twin's
    weight and bias. Returns how many layers did."""
    done = 0
    for node in list(model.graph.nodes):
        layer = layers.get(node.name)
        if layer is None or node.op != "call_function" or node.target not in (CONV, LINEAR):
            continue
        w = node.args[1]
        if not isinstance(w, torch.fx.Node):
            continue
        if w.target == DEQUANT_CHANNEL and layer.scale is not None:
            q_node, s_node = w.args[0], w.args[1]
            assert isinstance(q_node, torch.fx.Node) and isinstance(s_node, torch.fx.Node)
            q = _attr(model, str(q_node.target))
            if tuple(q.shape) != layer.weight.shape:
                continue
            scale = np.broadcast_to(np.asarray(layer.scale, np.float32), _attr(model, str(s_node.target)).shape)
            _set(model, w, 0, torch.from_numpy(np.ascontiguousarray(layer.weight.astype(np.int8))))
            _set(model, w, 1, torch.from_numpy(np.array(scale, np.float32)))
        elif w.op == "get_attr":  # a float layer: the same integers, dequantized
            if tuple(_attr(model, str(w.target)).shape) != layer.weight.shape:
                continue
            value = layer.weight.astype(np.float32)
            if layer.scale is not None:
                axis = 0 if np.asarray(layer.scale).size > 1 else None
                value = dequantize(layer.weight, layer.scale, np.zeros(np.shape(layer.scale), np.int32), axis)
            _set(model, node, 1, torch.from_numpy(np.asarray(value, np.float32)))
        else:
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if layer.bias is not None and isinstance(bias, torch.fx.Node) and bias.op == "get_attr":
            _set(model, node, 2, torch.from_numpy(np.ascontiguousarray(layer.bias.astype(np.float32))))
        done += 1
    model.recompile()
    return done


def _set(model: torch.fx.GraphModule, node: torch.fx.Node, index: int, value: torch.Tensor) -> None:
    """Point input `index` of `node` at a new constant of its own (a weight shared by two layers stays intact)."""
    name = f"lowbit_const_{len([n for n in model.graph.nodes if n.op == 'get_attr'])}"
    while hasattr(model, name):
        name += "_"
    model.register_buffer(name, value)
    with model.graph.inserting_before(node):
        new = model.graph.get_attr(name)
    args = list(node.args)
    old, args[index] = args[index], new
    node.args = tuple(args)
    # The replaced constant leaves the module too, or the program would carry both (measured: 9.4 MB vs 5.0).
    if isinstance(old, torch.fx.Node) and old.op == "get_attr" and not old.users:
        target = str(old.target)
        model.graph.erase_node(old)
        if not any(n.op == "get_attr" and n.target == target for n in model.graph.nodes):
            parent, _, leaf = target.rpartition(".")
            delattr(model.get_submodule(parent) if parent else model, leaf)
