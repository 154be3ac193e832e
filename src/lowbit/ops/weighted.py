"""Weights of Conv, Gemm and MatMul as their kernels see them: the stored layout, the u8 x s8 overflow guard in
kernel order, the bias shift a rounded weight causes, and the plan record of a quantized weight."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_ir as ir

from ..decision import Reason
from ..plan import Plan, TensorParams
from ..recipe import Scheme
from ..rewrite import constant_dq
from ..weights import QuantizedWeight, conv_rows, conv_unrows, guard_overflow, quantize_weight
from .base import Skip, const, float_input, has_input, unquantizable, weight_of
from .registry import RewriteContext


def weight_matmul(node: ir.Node) -> tuple[int, bool] | Skip:
    """For dynamic and weight-only modes: (weight input, whether stored (N, K)) of a MatMul/Gemm whose right-hand
    side is a constant matrix, or why not."""
    if (bad := float_input(node)) is not None:
        return bad
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return Skip(Reason.TRANS_A)
        if has_input(node, 2) and const(node, 2) is None and node.attributes.get_float("beta", 1.0) != 1.0:
            return Skip(Reason.COMPUTED_C)
    elif const(node, 0) is not None:
        return Skip(Reason.CONSTANT_LHS)
    b = const(node, 1)
    if b is None:
        return Skip(Reason.RHS_COMPUTED)
    if (bad := unquantizable(b)) is not None:
        return bad
    if b.ndim != 2:
        return Skip(Reason.WEIGHT_RANK, {"rank": b.ndim})
    return 1, node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def transposed_weight(node: ir.Node) -> bool:
    """Whether the weight is stored (N, K), outputs first: Gemm with transB."""
    return node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def output_shift(node: ir.Node, error: np.ndarray, mean: np.ndarray) -> np.ndarray | None:
    """Expected change of each output channel caused by the weight error, for inputs with this mean."""
    if node.op_type == "Conv":
        m, cg = error.shape[:2]
        group = node.attributes.get_int("group", 1)
        if mean.size != cg * group:
            return None
        per_in = error.reshape(m, cg, -1).sum(axis=2)
        first = (np.arange(m) // (m // group)) * cg
        shift: np.ndarray = np.sum(per_in * mean[first[:, None] + np.arange(cg)], axis=1)
        return shift
    if node.op_type in ("Gemm", "MatMul") and error.ndim == 2:
        rows = error if transposed_weight(node) else error.T  # (N, K)
        return rows @ mean if mean.size == rows.shape[1] else None
    return None


def guard(node: ir.Node, w: np.ndarray, qw: QuantizedWeight) -> QuantizedWeight:
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
        q_found = conv_rows(qw.q, node.attributes.get_int("group", 1))
        assert q_found is not None
        q_rows = q_found[0]

        def unrows(r: np.ndarray) -> np.ndarray:
            return conv_unrows(r, w.shape)
    elif node.op_type in ("Gemm", "MatMul") and w.ndim == 2:
        flip = not transposed_weight(node)
        rows, q_rows = (w.T, qw.q.T) if flip else (w, qw.q)

        def unrows(r: np.ndarray) -> np.ndarray:
            return r.T if flip else r
    else:
        return qw
    if qw.zero_point is not None and np.any(qw.zero_point):
        return qw  # asymmetric weights: ORT's zero-point path differs; not guarded
    per_channel = qw.axis is not None
    bound = np.full(rows.shape, 255, np.int64)
    new_rows, scales, changed = guard_overflow(rows, replace(qw, q=q_rows), bound, per_channel)
    if not changed:
        return qw
    return replace(
        qw, q=unrows(new_rows).astype(np.int8), scale=scales if per_channel else qw.scale, guarded_channels=changed
    )


def matmul_weight(node: ir.Node) -> tuple[np.ndarray, bool, np.ndarray | ir.Value | None]:
    """The weight as stored (alpha folded in), whether it is (N, K), and the bias to add (beta folded in)."""
    found = weight_matmul(node)
    assert not isinstance(found, Skip)
    transposed = found[1]
    w = weight_of(node, 1)
    bias: np.ndarray | ir.Value | None = None
    if node.op_type == "Gemm":
        w = w * np.float32(node.attributes.get_float("alpha", 1.0))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = node.inputs[2]
            beta = np.float32(node.attributes.get_float("beta", 1.0))
            bias = c.const_value.numpy().astype(np.float32) * beta if c.const_value is not None else c
    return w, transposed, bias


def record(
    plan: Plan, node: ir.Node, dtype: str, scale: np.ndarray, zp: np.ndarray, axis: int | None, block: int | None = None
) -> None:
    """A weight's parameters in the plan, under "node:input" (input 0 for Gather tables, else 1)."""
    plan.tensors[f"{node.name}:1" if node.op_type != "Gather" else f"{node.name}:0"] = TensorParams(
        dtype,
        np.ravel(scale).astype(float).tolist(),
        np.ravel(zp).astype(int).tolist(),
        axis,
        "weight",
        block_size=block,
    )


def weight_params(dtype: str, qw: QuantizedWeight) -> TensorParams:
    """The plan's record of a quantized weight (scales and zero points as flat lists)."""
    scale = np.atleast_1d(qw.scale).astype(float).tolist()
    return TensorParams(dtype, scale, np.atleast_1d(qw.zero_point).astype(int).tolist(), qw.axis, "weight")


def weight_behind_dq(ctx: RewriteContext, node: ir.Node, axis: int | None, scheme: Scheme) -> None:
    """Weight-only int8 (or uint8): the weight stored quantized behind a DequantizeLinear; the op runs in float."""
    w = weight_of(node, 1)
    qw = quantize_weight(w, axis, scheme.weights, scheme.symmetric_weights, scheme.reduce_range)
    p = weight_params(scheme.weights, qw)
    ctx.plan.tensors[f"{node.name}:1"] = p
    node.replace_input_with(1, constant_dq(ctx.model, f"{node.name}_w1", w, qw.q, p))
