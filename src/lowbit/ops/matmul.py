"""Gemm and MatMul. Static: constant right-hand sides are weights (per output column), otherwise both sides are
activations. Dynamic: int8 weights, uint8 inputs quantized per call (DynamicQuantizeLinear + MatMulInteger).
Weight-only: int8 weights behind a DequantizeLinear, or int4 blocks as ONNX Runtime's MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..decision import Reason, granularity
from ..recipe import Scheme
from ..rewrite import dynamic_matmul, matmul_nbits
from ..weights import pack_nibbles, quantize_blocks, quantize_weight
from .base import OpSpec, Skip, Take, const, float_input, has_input, name_of, unquantizable
from .registry import RewriteContext, register
from .weighted import guard, matmul_weight, record, weight_behind_dq, weight_matmul


def _outputs(node: ir.Node) -> tuple[int, ...]:
    """A model output made by a weighted Gemm/MatMul stays float: ONNX Runtime's QGemm and
    MatMulIntegerToFloat write float directly, so this costs no speed and keeps the logits exact."""
    return () if node.outputs[0].is_graph_output() else (0,)


def gemm(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if node.attributes.get_int("transA", 0):
        return Skip(Reason.TRANS_A)
    b = const(node, 1)
    if b is None:
        return OpSpec(activations=(0, 1))
    if (bad := unquantizable(b)) is not None:
        return bad
    if b.ndim != 2:
        return Skip(Reason.WEIGHT_RANK, {"rank": b.ndim})
    axis = 0 if node.attributes.get_int("transB", 0) else 1
    bias = None
    if has_input(node, 2):
        c = const(node, 2)
        if c is not None and (bad := unquantizable(c)) is not None:
            return bad
        unit = node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0
        if c is None or c.ndim != 1 or not unit:
            return OpSpec(weight=(1, axis), outputs=_outputs(node))  # C stays float: not a plain per-column bias
        bias = 2
    return OpSpec(weight=(1, axis), bias=bias, outputs=_outputs(node))


def matmul(node: ir.Node, scheme: Scheme) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if const(node, 0) is not None:
        return Skip(Reason.CONSTANT_LHS)
    b = const(node, 1)
    if b is None:
        return OpSpec(activations=(0, 1))
    if (bad := unquantizable(b)) is not None:
        return bad
    if b.ndim != 2:
        return OpSpec(activations=(0,), weight=(1, None))
    return OpSpec(weight=(1, 1), outputs=_outputs(node))


def decide_dynamic(node: ir.Node, scheme: Scheme) -> Skip | Take:
    found = weight_matmul(node)
    if isinstance(found, Skip):
        return found
    return Take(Reason.DYNAMIC_MATMUL, {"granularity": granularity(scheme.per_channel)})


def weight_only_details(scheme: Scheme, rows: bool = False) -> Take:
    """How weight-only quantizes a matrix (MatMulNBits) or an embedding table (`rows`)."""
    if scheme.weights == "int4":
        return Take(
            Reason.WEIGHT_ONLY_INT4,
            {
                "symmetry": "symmetric" if scheme.symmetric_weights else "affine",
                "block": scheme.int4_block,
                "how": "row-wise" if rows else "MatMulNBits",
            },
        )
    gran = ("per-row" if rows else "per-channel") if scheme.per_channel else "per-tensor"
    return Take(Reason.WEIGHT_ONLY, {"weights": scheme.weights, "granularity": gran})


def decide_weight_only(node: ir.Node, scheme: Scheme) -> Skip | Take:
    found = weight_matmul(node)
    return found if isinstance(found, Skip) else weight_only_details(scheme)


def rewrite_dynamic(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    w, transposed, bias = matmul_weight(node)
    axis = (0 if transposed else 1) if scheme.per_channel else None
    qw = quantize_weight(w, axis, "int8", scheme.symmetric_weights, scheme.reduce_range)
    # DynamicQuantizeLinear gives uint8 inputs anywhere in [0, 255], so the u8 x s8 guard applies in full.
    if scheme.avoid_overflow:
        qw = guard(node, w, qw)
        if qw.guarded_channels:
            ctx.plan.overflow_guard[name_of(node)] = qw.guarded_channels
    record(ctx.plan, node, "int8", qw.scale, qw.zero_point, 1 if axis is not None else None)
    q = qw.q.T if transposed else qw.q
    scale, zp = (
        (np.atleast_1d(qw.scale), np.atleast_1d(qw.zero_point))
        if axis is not None
        else (np.asarray(qw.scale), np.asarray(qw.zero_point))
    )
    dynamic_matmul(ctx.model, node, q, scale, zp, bias, ctx.shared)


def rewrite_weight_only(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    if scheme.weights == "int4":
        w, transposed, bias = matmul_weight(node)
        rows = w if transposed else w.T  # (N, K)
        b = quantize_blocks(rows, scheme.int4_block, scheme.symmetric_weights)
        zp = None if scheme.symmetric_weights else pack_nibbles(b.zero_point)
        record(ctx.plan, node, "int4", b.scale, b.zero_point, 0, scheme.int4_block)
        matmul_nbits(
            ctx.model, node, pack_nibbles(b.codes), b.scale, zp, rows.shape[1], rows.shape[0], scheme.int4_block, bias
        )
        return
    found = weight_matmul(node)
    assert not isinstance(found, Skip)
    axis = (0 if found[1] else 1) if scheme.per_channel else None
    weight_behind_dq(ctx, node, axis, scheme)


register("static", ["Gemm"], gemm)
register("static", ["MatMul"], matmul)
register("dynamic", ["Gemm", "MatMul"], decide_dynamic, rewrite_dynamic)
register("weight_only", ["Gemm", "MatMul"], decide_weight_only, rewrite_weight_only)
