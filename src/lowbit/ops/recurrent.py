"""Dynamic int8 recurrent layers: ONNX LSTM -> ONNX Runtime's com.microsoft.DynamicQuantizeLSTM.

The contrib op takes the LSTM's inputs unchanged except W and R, which are int8 and stored transposed
relative to ONNX LSTM: W (num_directions, input_size, 4*hidden), R (num_directions, hidden, 4*hidden), followed
by W_scale, W_zero_point, R_scale, R_zero_point of shape (num_directions,) per tensor or
(num_directions, 4*hidden) per output channel. The kernel quantizes X and the hidden state to uint8 at every
step and runs u8 x s8 GEMMs, so the same int16 pair-overflow guard as dynamic MatMul applies.

With `per_channel` (the default) W and R get one scale per direction unless a scale per gate row is measurably
more accurate (`granularity.py`): ONNX Runtime's kernel runs per-row scales 1.11-1.13x slower (keyword-spotting
example). The guard stays on either way: it changes only the weights, so it costs nothing at run time.

ONNX Runtime has no integer kernel for GRU or RNN; those stay float (their MatMul/Gemm neighbours still
quantize).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from ..decision import Reason, granularity
from ..plan import TensorParams
from ..recipe import Scheme
from ..rewrite import MS_DOMAIN, add_initializer
from ..weights import QuantizedWeight, cheaper_of, guard_overflow, quantize_weight
from .base import Skip, Take, name_of, weight_of
from .granularity import ENOUGH_DB, GAIN_DB, one_scale_is_enough, shown, sqnr_db
from .registry import RewriteContext, register


def decide(node: ir.Node, scheme: Scheme) -> Skip | Take:
    """DynamicQuantizeLSTM when the LSTM and the scheme allow it, else why not."""
    if scheme.mode != "dynamic":
        return Skip(Reason.LSTM_NOT_DYNAMIC, {"mode": scheme.mode.replace("_", "-")})
    if not scheme.symmetric_weights:
        return Skip(Reason.LSTM_ASYMMETRIC)
    if node.domain not in ("", "ai.onnx"):
        return Skip(Reason.LSTM_DOMAIN, {"domain": node.domain})
    if node.attributes.get_int("layout", 0) != 0:
        return Skip(Reason.LSTM_BATCH_FIRST)
    for i, what in ((1, "W"), (2, "R")):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is None or v.const_value is None or len(v.const_value.shape) != 3:
            return Skip(Reason.LSTM_WEIGHT, {"what": what})
    if not scheme.per_channel:
        return Take(Reason.DYNAMIC_LSTM, {"granularity": granularity(False)})
    one = {what: _sqnr(weight_of(node, i), replace(scheme, per_channel=False)) for i, what in ((1, "W"), (2, "R"))}
    rows = {what: _sqnr(weight_of(node, i), scheme) for i, what in ((1, "W"), (2, "R"))}
    return Take(
        Reason.DYNAMIC_LSTM,
        {
            "granularity": granularity(not all(one_scale_is_enough(one[k], rows[k]) for k in one)),
            "sqnr_db": {
                "per-tensor": {k: shown(v) for k, v in one.items()},
                "per-channel": {k: shown(v) for k, v in rows.items()},
            },
            "rule": f"one scale per direction unless W or R is below {ENOUGH_DB:g} dB with it and per gate row "
            f"gains >= {GAIN_DB:g} dB",
        },
    )


def gate_scheme(node: ir.Node, scheme: Scheme) -> Scheme:
    """The scheme W and R are quantized with: per gate row only where one scale per direction loses too much."""
    if not scheme.per_channel:
        return scheme
    one = replace(scheme, per_channel=False)
    weights = [weight_of(node, i) for i in (1, 2)]
    enough = all(one_scale_is_enough(_sqnr(w, one), _sqnr(w, scheme)) for w in weights)
    return one if enough else scheme


def _sqnr(w: np.ndarray, scheme: Scheme) -> float:
    """SQNR of the weight as the kernel will get it (with the overflow guard when the scheme has it)."""
    qw = _quantize_gates(w, scheme)
    scale = qw.scale.reshape(qw.scale.shape + (1,) * (3 - qw.scale.ndim))
    return sqnr_db(w, qw.q.astype(np.float64) * scale)


def decide_other(node: ir.Node, scheme: Scheme) -> Skip:
    """GRU, RNN and ONNX's own attention ops: ONNX Runtime has no integer kernel for GRU/RNN."""
    if node.op_type in ("GRU", "RNN"):
        return Skip(Reason.NO_RECURRENT_KERNEL, {"op": node.op_type})
    return Skip(Reason.RECURRENT_NOT_IMPLEMENTED, {"mode": scheme.mode.replace("_", "-"), "op": node.op_type})


def _quantize_gates(w: np.ndarray, scheme: Scheme) -> QuantizedWeight:
    """Quantize an ONNX-layout LSTM weight (D, 4H, K): one scale per direction, or per (direction, gate row).
    Each (4H, K) slice is in kernel order already (rows are outputs, K is the reduction axis)."""
    d, n, k = w.shape
    if scheme.per_channel:
        qw = quantize_weight(w.reshape(d * n, k), 0, "int8", scheme.symmetric_weights, scheme.reduce_range)
        q, scale, zp = qw.q.reshape(d, n, k), qw.scale.reshape(d, n), qw.zero_point.reshape(d, n)
    else:
        per = [quantize_weight(w[i], None, "int8", scheme.symmetric_weights, scheme.reduce_range) for i in range(d)]
        q = np.stack([p.q for p in per])
        scale = np.array([p.scale for p in per], np.float32)
        zp = np.array([p.zero_point for p in per]).astype(np.int8)
    guarded = 0
    # The kernel feeds uint8 anywhere in [0, 255] (dynamic ranges), so every weight pair is guarded in full.
    if scheme.avoid_overflow:
        q, scale = q.copy(), scale.copy()
        bound = np.full((n, k), 255, np.int64)
        for i in range(d):
            one = QuantizedWeight(q[i], scale[i] if scheme.per_channel else scale[i].reshape(()), zp[i], None)
            rows, s, changed = guard_overflow(w[i], one, bound, scheme.per_channel)
            if changed and not scheme.per_channel:
                rows, scale[i] = cheaper_of(w[i], rows, scale[i], bound)
            q[i] = rows
            if scheme.per_channel:
                scale[i] = s
            guarded += changed
    return QuantizedWeight(q.astype(np.int8), np.asarray(scale, np.float32), np.asarray(zp, np.int8), None, guarded)


def rewrite(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    """Replace an ONNX LSTM by DynamicQuantizeLSTM with int8 W and R; record their parameters in the plan."""
    model, plan = ctx.model, ctx.plan
    g, name = model.graph, name_of(node)
    model.opset_imports.setdefault(MS_DOMAIN, 1)
    inputs: list[ir.Value | None] = list(node.inputs) + [None] * (8 - len(node.inputs))
    quantized: list[ir.Value] = []
    guarded = 0
    scheme = gate_scheme(node, scheme)
    for idx, what in ((1, "W"), (2, "R")):
        w = weight_of(node, idx)
        qw = _quantize_gates(w, scheme)
        guarded += qw.guarded_channels
        # Plan: flat per (direction, gate row) along axis 1 of the ONNX weight, or one per direction (axis 0).
        plan.tensors[f"{name}:{idx}"] = TensorParams(
            "int8",
            qw.scale.ravel().astype(float).tolist(),
            qw.zero_point.ravel().astype(int).tolist(),
            1 if scheme.per_channel else 0,
            "weight",
        )
        quantized += [
            add_initializer(g, f"{name}_{what}_q", np.ascontiguousarray(qw.q.transpose(0, 2, 1)), share=True),
            add_initializer(g, f"{name}_{what}_s", qw.scale),
            add_initializer(g, f"{name}_{what}_zp", qw.zero_point),
        ]
    if guarded:
        plan.overflow_guard[name] = guarded
    w_q, w_s, w_zp, r_q, r_s, r_zp = quantized
    attrs = [a for a in node.attributes.values() if a.name != "layout"]
    new = ir.Node(
        MS_DOMAIN,
        "DynamicQuantizeLSTM",
        [inputs[0], w_q, r_q, *inputs[3:8], w_s, w_zp, r_s, r_zp],
        attrs,
        num_outputs=len(node.outputs),
        name=f"{name}_DynamicQuantizeLSTM",
    )
    for old, out in zip(node.outputs, new.outputs):
        out.shape = old.shape
        if old.dtype is not None:
            out.dtype = old.dtype
    g.insert_after(node, new)
    for old, out in zip(node.outputs, new.outputs):
        old_name = old.name
        old.replace_all_uses_with(out, replace_graph_outputs=True)
        old.name = None
        out.name = old_name
    g.remove(node, safe=True)


register("dynamic", ["LSTM"], decide, rewrite, domain="*")
register(["weight_only"], ["LSTM"], decide, domain="*")
register(["dynamic", "weight_only"], ["GRU", "RNN", "Attention", "MultiHeadAttention"], decide_other, domain="*")
