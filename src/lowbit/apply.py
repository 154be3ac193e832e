"""Turn a layout plus activation parameters into the QDQ graph: weights (with the overflow guard and bias
correction), int32 biases, fused activations, then Q/DQ pairs on every quantized activation."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from .numerics import dequantize
from .plan import Plan, TensorParams
from .planner import Layout
from .ops.matmul import weight_matmul
from .passes.float16 import convert_float16
from .recipe import Scheme
from .attention import dynamic_attention, is_attention
from .recurrent import dynamic_lstm
from .rewrite import (constant_dq, dynamic_matmul, fuse_activation, gather_block_quantized, gather_int4_nibbles,
                      gather_rows_int8, insert_qdq, matmul_nbits, quantize_constant)
from .weights import QuantizedWeight, conv_rows, conv_unrows, guard_overflow, pack_nibbles, quantize_blocks, quantize_weight


def apply(model: ir.Model, layout: Layout, plan: Plan) -> None:
    """Rewrite in place; bias correction uses the per-channel input means recorded in the plan."""
    graph = model.graph
    corrections: dict[str, np.ndarray] = {}
    for node_name, idx, axis in layout.weights:
        node = graph.node(node_name)
        corr = _quantize_weight(model, node, idx, axis, layout, plan)
        if corr is not None:
            corrections[node_name] = corr
    for node_name, idx, act, widx in layout.biases:
        node = graph.node(node_name)
        bias = node.inputs[idx].const_value.numpy().astype(np.float64)
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
    cache: dict[str, tuple] = {}
    for name, scheme in layout.dynamic.items():
        if graph.node(name).op_type == "LSTM":
            dynamic_lstm(model, graph.node(name), scheme, plan)
        elif is_attention(graph.node(name)):
            dynamic_attention(model, graph.node(name), scheme, plan, cache)
        else:
            _dynamic(model, graph.node(name), scheme, plan, cache)
    for name, scheme in layout.weight_only.items():
        _weight_only(model, graph.node(name), scheme, plan)
    if layout.float16:
        convert_float16(model, layout.float16)
    graph.sort()
    for name in [n for n, v in graph.initializers.items() if not v.uses() and not v.is_graph_input()]:
        graph.initializers.pop(name)


def _quantize_weight(model: ir.Model, node: ir.Node, idx: int, axis: int | None, layout: Layout,
                     plan: Plan) -> np.ndarray | None:
    """Quantize one weight input in place; returns the bias correction for the node, if any."""
    scheme = layout.nodes[node.name].scheme
    w = node.inputs[idx].const_value.numpy().astype(np.float32)
    qw = quantize_weight(w, axis, scheme.weights, scheme.symmetric_weights, scheme.reduce_range)
    mean = plan.channel_means.get(node.inputs[0].name)
    act = plan.tensors.get(node.inputs[0].name)
    if scheme.avoid_overflow and act is not None and act.dtype == "uint8" and scheme.weights == "int8":
        qw = _guard(node, w, qw)
        if qw.guarded_channels:
            plan.overflow_guard[node.name] = qw.guarded_channels
    p = TensorParams(scheme.weights, np.atleast_1d(qw.scale).astype(float).tolist(),
                     np.atleast_1d(qw.zero_point).astype(int).tolist(), qw.axis, "weight")
    plan.tensors[f"{node.name}:{idx}"] = p
    node.replace_input_with(idx, constant_dq(model, f"{node.name}_w{idx}", w, qw.q, p))
    if scheme.bias_correction and mean is not None and idx == 1:
        error = dequantize(qw.q, qw.scale, qw.zero_point, qw.axis) - w
        return _output_shift(node, error, np.asarray(mean, np.float64))
    return None


def _transposed_weight(node: ir.Node) -> bool:
    """Whether the weight is stored (N, K), outputs first: Gemm with transB."""
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def _output_shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Expected change of each output channel caused by the weight error, for inputs with this mean."""
    if node.op_type == "Conv":
        m, cg = error.shape[:2]
        group = node.attributes.get_int("group", 1)
        if mean.size != cg * group:
            return None
        per_in = error.reshape(m, cg, -1).sum(axis=2)
        first = (np.arange(m) // (m // group)) * cg
        return np.sum(per_in * mean[first[:, None] + np.arange(cg)], axis=1)
    if node.op_type in ("Gemm", "MatMul") and error.ndim == 2:
        rows = error if _transposed_weight(node) else error.T  # (N, K)
        return rows @ mean if mean.size == rows.shape[1] else None
    return None


def _guard(node: ir.Node, w: np.ndarray, qw: QuantizedWeight) -> QuantizedWeight:
    """Guard the weight rows in kernel order against any uint8 input (up to 255 at every position).

    Bounding by calibrated per-channel maxima instead would change fewer channels, but inputs of the quantized
    model exceed the float model's maxima (errors of earlier layers, unseen data): measured on
    EfficientNet-Lite0 with the AVX2 emulator, pairs still saturated that way, at a gain of under 0.3 dB SQNR.
    """
    if node.op_type == "Conv":
        found = conv_rows(w, node.attributes.get_int("group", 1))
        if found is None:
            return qw  # depthwise: accumulates in int32 directly
        rows = found[0]
        q_rows = conv_rows(qw.q, node.attributes.get_int("group", 1))[0]
        unrows = lambda r: conv_unrows(r, w.shape)  # noqa: E731
    elif node.op_type in ("Gemm", "MatMul") and w.ndim == 2:
        flip = not _transposed_weight(node)
        rows, q_rows = (w.T, qw.q.T) if flip else (w, qw.q)
        unrows = (lambda r: r.T) if flip else (lambda r: r)  # noqa: E731
    else:
        return qw
    if qw.zero_point is not None and np.any(qw.zero_point):
        return qw  # asymmetric weights: ORT's zero-point path differs; not guarded
    per_channel = qw.axis is not None
    bound = np.full(rows.shape, 255, np.int64)
    new_rows, scales, changed = guard_overflow(rows, replace(qw, q=q_rows), bound, per_channel)
    if not changed:
        return qw
    return replace(qw, q=unrows(new_rows).astype(np.int8), scale=scales if per_channel else qw.scale,
                   guarded_channels=changed)


def _matmul_weight(node: ir.Node) -> tuple[np.ndarray, bool, np.ndarray | ir.Value | None]:
    """The weight as stored (alpha folded in), whether it is (N, K), and the bias to add (beta folded in)."""
    _, transposed = weight_matmul(node)
    w = node.inputs[1].const_value.numpy().astype(np.float32)
    bias = None
    if node.op_type == "Gemm":
        w = w * np.float32(node.attributes.get_float("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            beta = np.float32(node.attributes.get_float("beta", 1.0))
            bias = c.const_value.numpy().astype(np.float32) * beta if c.const_value is not None else c
    return w, transposed, bias


def _record(plan: Plan, node: ir.Node, dtype: str, scale: np.ndarray, zp: np.ndarray, axis: int | None,
            block: int | None = None) -> None:
    plan.tensors[f"{node.name}:1" if node.op_type != "Gather" else f"{node.name}:0"] = TensorParams(
        dtype, np.ravel(scale).astype(float).tolist(), np.ravel(zp).astype(int).tolist(), axis, "weight",
        block_size=block)


def _dynamic(model: ir.Model, node: ir.Node, scheme: Scheme, plan: Plan, cache: dict) -> None:
    w, transposed, bias = _matmul_weight(node)
    axis = (0 if transposed else 1) if scheme.per_channel else None
    qw = quantize_weight(w, axis, "int8", scheme.symmetric_weights, scheme.reduce_range)
    # DynamicQuantizeLinear gives uint8 inputs anywhere in [0, 255], so the u8 x s8 guard applies in full.
    if scheme.avoid_overflow:
        qw = _guard(node, w, qw)
        if qw.guarded_channels:
            plan.overflow_guard[node.name] = qw.guarded_channels
    _record(plan, node, "int8", qw.scale, qw.zero_point, 1 if axis is not None else None)
    q = qw.q.T if transposed else qw.q
    per = (lambda a: np.atleast_1d(a)) if axis is not None else (lambda a: np.asarray(a))  # noqa: E731
    dynamic_matmul(model, node, q, per(qw.scale), per(qw.zero_point), bias, cache)


def _weight_only(model: ir.Model, node: ir.Node, scheme: Scheme, plan: Plan) -> None:
    g = model.graph
    if node.op_type == "Gather":
        table = node.inputs[0].const_value.numpy().astype(np.float32)
        if scheme.weights == "int4":
            # A block longer than the row is one scale per row: GatherBlockQuantized takes any power of two >= 16.
            block = scheme.int4_block
            b = quantize_blocks(table, block, scheme.symmetric_weights)
            nb = b.scale.shape[1]
            codes = b.codes.reshape(table.shape[0], -1)[:, : table.shape[1]]
            zp = None if scheme.symmetric_weights else b.zero_point
            q = codes.astype(np.int16) - 8 if zp is None else codes
            _record(plan, node, "int4", b.scale, b.zero_point if zp is not None else np.zeros(b.scale.shape), 1, block)
            if zp is None and table.shape[1] % 2 == 0:
                gather_int4_nibbles(model, node, codes, b.scale.reshape(-1, nb), block)
            else:  # affine blocks or odd rows: ONNX Runtime's (slower) contrib kernel
                gather_block_quantized(model, node, q, b.scale.reshape(-1, nb), zp, block)
        else:
            axis = 0 if scheme.per_channel else None  # per row, or one scale for the table
            qw = quantize_weight(table, axis, scheme.weights, True)
            _record(plan, node, scheme.weights, qw.scale, qw.zero_point, axis)
            gather_rows_int8(model, node, qw.q, qw.scale)
        return
    if node.op_type in ("MatMul", "Gemm") and scheme.weights == "int4":
        w, transposed, bias = _matmul_weight(node)
        rows = w if transposed else w.T  # (N, K)
        b = quantize_blocks(rows, scheme.int4_block, scheme.symmetric_weights)
        zp = None if scheme.symmetric_weights else pack_nibbles(b.zero_point)
        _record(plan, node, "int4", b.scale, b.zero_point, 0, scheme.int4_block)
        matmul_nbits(model, node, pack_nibbles(b.codes), b.scale, zp, rows.shape[1], rows.shape[0],
                     scheme.int4_block, bias)
        return
    # int8 (or uint8) weights behind a DequantizeLinear; the op itself runs in float.
    if node.op_type in ("MatMul", "Gemm"):
        _, transposed = weight_matmul(node)
        axis = (0 if transposed else 1) if scheme.per_channel else None
    elif node.op_type == "Conv":
        axis = 0 if scheme.per_channel else None
    else:  # ConvTranspose: output channels on axis 1 only without groups
        axis = 1 if scheme.per_channel and node.attributes.get_int("group", 1) == 1 else None
    w = node.inputs[1].const_value.numpy().astype(np.float32)
    qw = quantize_weight(w, axis, scheme.weights, scheme.symmetric_weights, scheme.reduce_range)
    p = TensorParams(scheme.weights, np.atleast_1d(qw.scale).astype(float).tolist(),
                     np.atleast_1d(qw.zero_point).astype(int).tolist(), qw.axis, "weight")
    plan.tensors[f"{node.name}:1"] = p
    node.replace_input_with(1, constant_dq(model, f"{node.name}_w1", w, qw.q, p))
