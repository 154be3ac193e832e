"""The rewrite stage: a layout plus activation parameters become the quantized graph. Static nodes are rewritten
generically from their OpSpecs: weights (with the overflow guard and bias correction), int32 biases, fused
activations, then Q/DQ pairs on every quantized activation. Every other node is rewritten by its op family's
registered rewrite function, mode by mode in graph order."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from .adaround import grid
from .graph.external import release
from .numerics import dequantize
from .ops import RewriteContext, entry_for
from .ops.base import const, name_of, weight_of
from .ops.registry import MODES
from .ops.weighted import guard, output_shift, weight_params
from .plan import Plan, TensorParams
from .planner import Layout
from .rewrite import constant_dq, fuse_activation, insert_qdq, quantize_constant
from .weights import quantize_weight


def apply(model: ir.Model, layout: Layout, plan: Plan, rounding: dict[str, np.ndarray] | None = None) -> None:
    """Rewrite in place; bias correction uses the per-channel input means recorded in the plan. `rounding`: AdaRound's
    up/down bits by weight ("node:1"), used instead of round-to-nearest for those weights.

    Weights stream through: a float weight loaded lazily from external data (memory-mapped) is unmapped as soon
    as its node no longer reads it, so only the weights being quantized, and the quantized ones, are in memory."""
    graph = model.graph
    corrections: dict[str, np.ndarray] = {}
    for node_name, idx, axis in layout.weights:
        node = graph.node(node_name)
        before = list(node.inputs)
        corr = _quantize_weight(model, node, idx, axis, layout, plan, (rounding or {}).get(f"{node_name}:{idx}"))
        if corr is not None:
            corrections[node_name] = corr
        _release_unused(before)
    for node_name, idx, act, widx in layout.biases:
        node = graph.node(node_name)
        found = const(node, idx)
        assert found is not None, f"{node_name} input {idx} is not a constant"
        bias = found.astype(np.float64)
        if node_name in corrections:
            bias = bias - corrections[node_name]
        w_scale = np.asarray(plan.tensors[f"{node_name}:{widx}"].scale, np.float64)
        s = (np.float64(plan.tensors[act].arrays()[0]) * w_scale).astype(np.float32)
        s = np.broadcast_to(s, bias.shape).copy()
        q = np.clip(np.rint(bias / s.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int32)
        p = TensorParams("int32", s.tolist(), [0] * len(s), 0, "bias")
        plan.tensors[f"{node_name}:{idx}"] = p
        node.replace_input_with(idx, constant_dq(model, f"{node_name}_bias", bias, q, p))
    for name in layout.fused:
        fuse_activation(graph, name)
    values = {v.name: v for v in graph.inputs}
    for node in graph:
        values.update({o.name: o for o in node.outputs})
    for name, p in sorted(plan.tensors.items()):
        if p.kind != "activation":
            continue
        if name in graph.initializers:
            quantize_constant(model, graph.initializers[name], p)
        else:
            insert_qdq(model, values[name], p)
    ctx = RewriteContext(model, plan)
    for mode in MODES:
        for name, (node_mode, scheme) in layout.rewrites.items():
            if node_mode != mode:
                continue
            node = graph.node(name)
            entry = entry_for(mode, node)
            assert entry is not None and entry.rewrite is not None, f"{mode} {node.op_type} has no rewrite"
            before = list(node.inputs)
            entry.rewrite(ctx, node, scheme)
            _release_unused(before)
    ctx.run_deferred()
    graph.sort()
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
        graph.initializers.pop(name)


def _release_unused(values: list[ir.Value | None]) -> None:
    """Unmap the external (memory-mapped) constants among `values` that no node reads any more."""
    for v in values:
        if v is not None and not v.uses() and isinstance(v.const_value, ir.ExternalTensor):
            release(v.const_value)


def _quantize_weight(
    model: ir.Model,
    node: ir.Node,
    idx: int,
    axis: int | None,
    layout: Layout,
    plan: Plan,
    up: np.ndarray | None = None,
) -> np.ndarray | None:
    """Quantize one weight input in place (with AdaRound's `up` bits, if given); returns the bias correction for
    the node, if any."""
    scheme = layout.nodes[name_of(node)].scheme
    assert scheme is not None  # a node with a weight to quantize is quantized, so it has a scheme
    w = weight_of(node, idx)
    qw = quantize_weight(w, axis, scheme.weights, scheme.symmetric_weights, scheme.reduce_range)
    if up is not None:
        g = grid(w, qw.scale, qw.zero_point, axis, scheme)
        qw = replace(qw, q=g.integers(up).astype(qw.q.dtype))
    x = node.inputs[0]
    assert x is not None
    mean = plan.channel_means.get(name_of(x))
    act = plan.tensors.get(name_of(x))
    if scheme.avoid_overflow and act is not None and act.dtype == "uint8" and scheme.weights == "int8":
        qw = guard(node, w, qw)
        if qw.guarded_channels:
            plan.overflow_guard[name_of(node)] = qw.guarded_channels
    p = weight_params(scheme.weights, qw)
    plan.tensors[f"{node.name}:{idx}"] = p
    node.replace_input_with(idx, constant_dq(model, f"{node.name}_w{idx}", w, qw.q, p))
    if scheme.bias_correction and mean is not None and idx == 1:
        error = dequantize(qw.q, qw.scale, qw.zero_point, qw.axis) - w
        return output_shift(node, error, np.asarray(mean, np.float64))
    return None
