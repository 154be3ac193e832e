"""Dynamic int8 attention: ONNX Runtime's fused com.microsoft.Attention -> com.microsoft.QAttention.

Facts from QAttention's schema (ONNX Runtime contrib ops): inputs are input (uint8/int8), weight (int8/uint8,
(input_hidden, 3 * hidden), the Attention weight unchanged), bias (float, required), input_scale (scalar),
weight_scale (scalar, or 1-D of 3 * hidden: per column), mask_index, input_zero_point, weight_zero_point (scalar
or per column), past; outputs output and present. Attributes: num_heads, unidirectional, scale,
mask_filter_value, do_rotary, past_present_share_buffer. There is no qkv_hidden_sizes, rotary_embedding_dim or
attention_bias, so Attention nodes that use them stay float. The input is quantized per call by
DynamicQuantizeLinear (uint8), shared with any other quantized reader of the same tensor.

lowbit keeps past/present (decoder caches) float too: the past input is untested with QAttention here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from .plan import Plan, TensorParams
from .recipe import Scheme
from .recurrent import _cheaper_of
from .rewrite import MS_DOMAIN, _init, dynamic_quantize
from .weights import QuantizedWeight, guard_overflow, quantize_weight

# Attention attributes QAttention takes as they are.
_COPIED = ("num_heads", "unidirectional", "scale", "mask_filter_value", "do_rotary")


def is_attention(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN and node.op_type == "Attention"


def attention_float_reason(node: ir.Node, scheme: Scheme) -> str | None:
    """Why this com.microsoft Attention cannot become a QAttention under `scheme`, or None when it can."""
    if scheme.mode != "dynamic":
        return (f"{scheme.mode.replace('_', '-')} Attention: ONNX Runtime's only integer attention is dynamic "
                "(QAttention); use mode dynamic")
    if scheme.weights != "int8":
        return f"QAttention takes int8 weights; {scheme.weights} Attention weights are not supported"
    inputs = list(node.inputs)
    x = inputs[0]
    if x is None or x.dtype not in (None, ir.DataType.FLOAT):
        return "Attention input is not float32 (DynamicQuantizeLinear quantizes float32 only)"
    w = inputs[1] if len(inputs) > 1 else None
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return "Attention weight is not a constant 2-D tensor: QAttention needs int8 weights stored in the model; stays float"
    for i, what in ((4, "past state"), (5, "attention_bias"), (6, "past_sequence_length")):
        if i < len(inputs) and inputs[i] is not None:
            return f"Attention with {what} (input {i}): lowbit's QAttention form takes none; stays float"
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].name:
        if node.outputs[1].uses() or node.outputs[1].is_graph_output():
            return "Attention with a present (key/value cache) output: lowbit's QAttention form takes none; stays float"
    attrs = node.attributes
    sizes = attrs.get_ints("qkv_hidden_sizes", None)
    if sizes is not None and len(set(sizes)) != 1:
        return f"Attention with unequal qkv_hidden_sizes {list(sizes)}: QAttention has no such attribute; stays float"
    if "rotary_embedding_dim" in attrs:
        return "Attention with rotary_embedding_dim: QAttention has no such attribute; stays float"
    if attrs.get_int("past_present_share_buffer", 0):
        return "Attention with past_present_share_buffer: lowbit's QAttention form takes no cache; stays float"
    return None


def _quantize_qkv(w: np.ndarray, scheme: Scheme) -> QuantizedWeight:
    """(input_hidden, 3 * hidden) weight; per column (axis 1, one scale per Q/K/V output) or per tensor."""
    axis = 1 if scheme.per_channel else None
    qw = quantize_weight(w, axis, "int8", scheme.symmetric_weights, scheme.reduce_range)
    zp_any = np.any(qw.zero_point)
    # DynamicQuantizeLinear gives uint8 inputs anywhere in [0, 255], so the u8 x s8 guard applies in full.
    if not scheme.avoid_overflow or zp_any:
        return qw
    rows = w.T  # kernel order: outputs x reduction
    bound = np.full(rows.shape, 255, np.int64)
    q_rows, scales, changed = guard_overflow(rows, replace(qw, q=qw.q.T), bound, scheme.per_channel)
    if not changed:
        return qw
    if scheme.per_channel:
        return QuantizedWeight(q_rows.T.astype(np.int8), scales, qw.zero_point, axis, changed)
    q_rows, s = _cheaper_of(rows, q_rows, np.float32(qw.scale), bound)
    return QuantizedWeight(q_rows.T.astype(np.int8), np.asarray(s, np.float32), qw.zero_point, None, changed)


def dynamic_attention(model: ir.Model, node: ir.Node, scheme: Scheme, plan: Plan, cache: dict) -> None:
    """Replace a com.microsoft Attention by QAttention with int8 weights; record their parameters in the plan."""
    g, name = model.graph, node.name
    inputs: list[ir.Value | None] = list(node.inputs) + [None] * (4 - len(node.inputs))
    w = inputs[1].const_value.numpy().astype(np.float32)
    qw = _quantize_qkv(w, scheme)
    if qw.guarded_channels:
        plan.overflow_guard[name] = qw.guarded_channels
    plan.tensors[f"{name}:1"] = TensorParams(
        "int8", np.ravel(qw.scale).astype(float).tolist(), np.ravel(qw.zero_point).astype(int).tolist(),
        qw.axis, "weight")
    xq, xs, xz = dynamic_quantize(model, inputs[0], cache)
    wq = _init(g, f"{name}_w_q", np.ascontiguousarray(qw.q, np.int8))
    ws = _init(g, f"{name}_w_s", np.asarray(qw.scale, np.float32))
    wz = _init(g, f"{name}_w_zp", np.asarray(qw.zero_point, np.int8))
    bias = inputs[2]
    if bias is None:  # QAttention requires a bias
        bias = _init(g, f"{name}_zero_bias", np.zeros(w.shape[1], np.float32))
    attrs = [a for a in node.attributes.values() if a.name in _COPIED]
    new = ir.Node(MS_DOMAIN, "QAttention", [xq, wq, bias, xs, ws, inputs[3], xz, wz], attrs,
                  name=f"{name}_QAttention")
    out, old = new.outputs[0], node.outputs[0]
    out.dtype, out.shape = old.dtype or ir.DataType.FLOAT, old.shape
    g.insert_after(node, new)
    old_name = old.name
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    old.name = None
    out.name = old_name
    g.remove(node, safe=True)
