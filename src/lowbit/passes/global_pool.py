"""Spell a mean over every spatial axis as GlobalAveragePool.

PyTorch's default (dynamo) exporter writes `AdaptiveAvgPool2d(1)` and `x.mean((2, 3))` as ReduceMean, in every
squeeze-excitation block and classifier head. ONNX Runtime has no integer ReduceMean: quantized, each one runs in
float between a DequantizeLinear and a QuantizeLinear. As GlobalAveragePool (the same mean) it runs as
QLinearGlobalAveragePool, and LiteRT reads it as MEAN.
"""

from __future__ import annotations

import onnx_ir as ir


def _axes(node: ir.Node) -> list[int] | None:
    """The reduced axes, from the attribute (opset < 18) or the constant second input (opset 18+)."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return [int(a) for a in attr.as_ints()]
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        c = node.inputs[1].const_value
        return None if c is None else [int(a) for a in c.numpy().reshape(-1)]
    return None  # no axes: every axis, batch and channels included


def _spatial_mean(node: ir.Node) -> bool:
    x = node.inputs[0] if node.inputs else None
    if node.op_type != "ReduceMean" or node.domain != "" or x is None or x.shape is None or x.dtype is None:
        return False
    rank = len(x.shape)
    axes = _axes(node)
    if rank < 3 or axes is None or x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return False
    return sorted(a % rank if -rank <= a < rank else -1 for a in axes) == list(range(2, rank))


def reduce_mean_to_pool(model: ir.Model) -> bool:
    """Replace each ReduceMean over all axes after [N, C] of a float tensor by GlobalAveragePool (followed by a
    Flatten when the ReduceMean dropped the reduced axes). Needs the input's rank (shape inference first)."""
    graph = model.graph
    changed = False
    for node in list(graph):
        if not _spatial_mean(node):
            continue
        x, out = node.inputs[0], node.outputs[0]
        assert x is not None and x.shape is not None
        keep = node.attributes.get_int("keepdims", 1)
        name = node.name or out.name or "mean"
        if keep:
            pool = ir.Node("", "GlobalAveragePool", [x], name=name)
            graph.insert_after(node, pool)
            out.replace_all_uses_with(pool.outputs[0], replace_graph_outputs=True)
        else:
            pool = ir.Node("", "GlobalAveragePool", [x], name=f"{name}_pool")
            flat = ir.Node("", "Flatten", [pool.outputs[0]], [ir.AttrInt64("axis", 1)], name=name)
            graph.insert_after(node, [pool, flat])
            pool.outputs[0].name = f"{name}_pooled"
            pool.outputs[0].type = x.type
            pool.outputs[0].shape = ir.Shape([*x.shape[:2], *([1] * (len(x.shape) - 2))])
            out.replace_all_uses_with(flat.outputs[0], replace_graph_outputs=True)
            pool = flat
        result = pool.outputs[0]
        result.type, result.shape = out.type, out.shape
        tensor_name, out.name = out.name, None
        graph.remove(node, safe=True)
        result.name = tensor_name  # the mean keeps its tensor name: ranges, plans and reports refer to it
        changed = True
    return changed


__all__ = ["reduce_mean_to_pool"]
