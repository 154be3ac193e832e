"""Embedding tables: a Gather along axis 0 of a constant float matrix. A table is a weight, so dynamic and
weight-only modes store it int8 per table or per row, or int4 in blocks; the lookup has no activation to quantize.
In static mode Gather is data movement (ops/shape.py).

int8 with `per_channel` (the default) is one scale per table unless a scale per row is measurably more accurate
(`granularity.py`): per-row scales cost a second Gather per id, which ONNX Runtime runs at 1.2-1.3x float's time
on the DLRM example where one scale per table runs at float's or less."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ..decision import Reason
from ..recipe import Scheme
from ..rewrite import gather_block_quantized, gather_int4_nibbles, gather_rows_int8
from ..weights import quantize_blocks, quantize_weight
from .base import Refuse, Skip, Take, const, unquantizable, weight_of
from .granularity import ENOUGH_DB, GAIN_DB, dequantized, one_scale_is_enough, shown, sqnr_db
from .matmul import weight_only_details
from .registry import RewriteContext, register
from .weighted import record


def embedding_table(node: ir.Node) -> Skip | None:
    """None for a Gather along axis 0 of a constant 2-D float table, else why it is not one."""
    data = const(node, 0)
    if data is None:
        return Skip(Reason.GATHER_COMPUTED)
    if data.dtype.kind != "f" or data.ndim != 2:
        return Skip(Reason.GATHER_NOT_MATRIX, {"dtype": str(data.dtype), "rank": data.ndim})
    if (bad := unquantizable(data)) is not None:
        return bad
    if node.attributes.get_int("axis", 0) != 0:
        return Skip(Reason.GATHER_AXIS)
    return None


def decide(node: ir.Node, scheme: Scheme) -> Skip | Take:
    if (why := embedding_table(node)) is not None:
        return why
    if scheme.weights == "uint8":
        raise Refuse(
            f"uint8 weights cannot be used on Gather node '{node.name}'",
            "embedding tables are int8 (symmetric) or int4; add a rule giving Gather weights=int8",
        )
    # The lookup has no activation to quantize, so in dynamic mode too the table is stored weight-only.
    found = weight_only_details(scheme, rows=True)
    if scheme.weights == "int8" and scheme.per_channel:
        per_table, per_row = _sqnr(weight_of(node, 0))
        found.details.update(
            granularity="per-tensor" if one_scale_is_enough(per_table, per_row) else "per-row",
            sqnr_db={"per-table": shown(per_table), "per-row": shown(per_row)},
            rule=f"one scale per table unless below {ENOUGH_DB:g} dB and per-row gains >= {GAIN_DB:g} dB",
        )
    return Take(found.code, found.details, mode="weight_only")


def _sqnr(table: np.ndarray) -> tuple[float, float]:
    """SQNR of the int8 table with one scale, and with a scale per row."""
    one, rows = (sqnr_db(table, dequantized(quantize_weight(table, axis, "int8", True))) for axis in (None, 0))
    return one, rows


def table_axis(table: np.ndarray, scheme: Scheme) -> int | None:
    """0 for a scale per row, None for one scale per table (see the module's docstring)."""
    return 0 if scheme.per_channel and not one_scale_is_enough(*_sqnr(table)) else None


def rewrite(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    table = weight_of(node, 0)
    if scheme.weights != "int4":
        axis = table_axis(table, scheme)
        qw = quantize_weight(table, axis, scheme.weights, True)
        record(ctx.plan, node, scheme.weights, qw.scale, qw.zero_point, axis)
        gather_rows_int8(ctx.model, node, qw.q, qw.scale)
        return
    # A block longer than the row is one scale per row: GatherBlockQuantized takes any power of two >= 16.
    block = scheme.int4_block
    b = quantize_blocks(table, block, scheme.symmetric_weights)
    nb = b.scale.shape[1]
    codes = b.codes.reshape(table.shape[0], -1)[:, : table.shape[1]]
    zp = None if scheme.symmetric_weights else b.zero_point
    q = codes.astype(np.int16) - 8 if zp is None else codes
    record(ctx.plan, node, "int4", b.scale, b.zero_point if zp is not None else np.zeros(b.scale.shape), 1, block)
    if zp is None and table.shape[1] % 2 == 0:
        gather_int4_nibbles(ctx.model, node, codes, b.scale.reshape(-1, nb), block)
    else:  # affine blocks or odd rows: ONNX Runtime's (slower) contrib kernel
        gather_block_quantized(ctx.model, node, q, b.scale.reshape(-1, nb), zp, block)


register(["dynamic", "weight_only"], ["Gather"], decide, rewrite)
