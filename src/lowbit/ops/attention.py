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

from ..decision import Reason, granularity
from ..plan import TensorParams
from ..recipe import Scheme
from ..rewrite import MS_DOMAIN, add_initializer, dynamic_quantize
from ..weights import QuantizedWeight, cheaper_of, guard_overflow, quantize_weight
from .base import Skip, Take, name_of, weight_of
from .registry import RewriteContext, register

# Attention attributes QAttention takes as they are.
_COPIED = ("num_heads", "unidirectional", "scale", "mask_filter_value", "do_rotary")


def is_attention(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN and node.op_type == "Attention"


def decide_static(node: ir.Node, scheme: Scheme) -> Skip:
    return Skip(Reason.STATIC_ATTENTION)


def decide(node: ir.Node, scheme: Scheme) -> Skip | Take:
    """QAttention when this com.microsoft Attention and the scheme allow it, else why not."""
    if scheme.mode != "dynamic":
        return Skip(Reason.ATTENTION_NOT_DYNAMIC, {"mode": scheme.mode.replace("_", "-")})
    if scheme.weights != "int8":
        return Skip(Reason.ATTENTION_WEIGHT_TYPE, {"weights": scheme.weights})
    inputs = list(node.inputs)
    x = inputs[0]
    if x is None or x.dtype not in (None, ir.DataType.FLOAT):
        return Skip(Reason.ATTENTION_INPUT)
    w = inputs[1] if len(inputs) > 1 else None
    if w is None or w.const_value is None or len(w.const_value.shape) != 2:
        return Skip(Reason.ATTENTION_WEIGHT)
    for i, what in ((4, "past state"), (5, "attention_bias"), (6, "past_sequence_length")):
        if i < len(inputs) and inputs[i] is not None:
            return Skip(Reason.ATTENTION_EXTRA_INPUT, {"what": what, "index": i})
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].name:
        if node.outputs[1].uses() or node.outputs[1].is_graph_output():
            return Skip(Reason.ATTENTION_PRESENT)
    attrs = node.attributes
    sizes = attrs.get_ints("qkv_hidden_sizes", None)
    if sizes is not None and len(set(sizes)) != 1:
        return Skip(Reason.ATTENTION_QKV_SIZES, {"sizes": list(sizes)})
    if "rotary_embedding_dim" in attrs:
        return Skip(Reason.ATTENTION_ROTARY)
    if attrs.get_int("past_present_share_buffer", 0):
        return Skip(Reason.ATTENTION_SHARED_BUFFER)
    return Take(Reason.DYNAMIC_ATTENTION, {"granularity": granularity(scheme.per_channel, "per-column")})


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
    q_rows, s = cheaper_of(rows, q_rows, np.float32(qw.scale), bound)
    return QuantizedWeight(q_rows.T.astype(np.int8), np.asarray(s, np.float32), qw.zero_point, None, changed)


def rewrite(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    """Replace a com.microsoft Attention by QAttention with int8 weights; record their parameters in the plan."""
    model, plan = ctx.model, ctx.plan
    g, name = model.graph, name_of(node)
    inputs: list[ir.Value | None] = list(node.inputs) + [None] * (4 - len(node.inputs))
    w = weight_of(node, 1)
    qw = _quantize_qkv(w, scheme)
    if qw.guarded_channels:
        plan.overflow_guard[name] = qw.guarded_channels
    plan.tensors[f"{name}:1"] = TensorParams(
        "int8",
        np.ravel(qw.scale).astype(float).tolist(),
        np.ravel(qw.zero_point).astype(int).tolist(),
        qw.axis,
        "weight",
    )
    x = node.inputs[0]
    assert x is not None  # decide checked it is float32
    xq, xs, xz = dynamic_quantize(model, x, ctx.shared)
    wq = add_initializer(g, f"{name}_w_q", np.ascontiguousarray(qw.q, np.int8), share=True)
    ws = add_initializer(g, f"{name}_w_s", np.asarray(qw.scale, np.float32))
    wz = add_initializer(g, f"{name}_w_zp", np.asarray(qw.zero_point, np.int8))
    bias = inputs[2]
    if bias is None:  # QAttention requires a bias
        bias = add_initializer(g, f"{name}_zero_bias", np.zeros(w.shape[1], np.float32))
    attrs = [a for a in node.attributes.values() if a.name in _COPIED]
    new = ir.Node(MS_DOMAIN, "QAttention", [xq, wq, bias, xs, ws, inputs[3], xz, wz], attrs, name=f"{name}_QAttention")
    out, old = new.outputs[0], node.outputs[0]
    out.dtype, out.shape = old.dtype or ir.DataType.FLOAT, old.shape
    g.insert_after(node, new)
    old_name = old.name
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    old.name = None
    out.name = old_name
    g.remove(node, safe=True)


register("static", ["Attention"], decide_static, domain=MS_DOMAIN)
register("dynamic", ["Attention"], decide, rewrite, domain=MS_DOMAIN)
register("weight_only", ["Attention"], decide, domain=MS_DOMAIN)
