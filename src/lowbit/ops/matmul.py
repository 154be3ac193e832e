"""Gemm and MatMul: constant right-hand sides are weights (per output column); otherwise both are activations."""

from __future__ import annotations

import onnx_ir as ir

from .base import OpSpec, Skip, const, float_input, has_input


def _outputs(node: ir.Node) -> tuple[int, ...]:
    """A model output made by a weighted Gemm/MatMul stays float: ONNX Runtime's QGemm and
    MatMulIntegerToFloat write float directly, so this costs no speed and keeps the logits exact."""
    return () if node.outputs[0].is_graph_output() else (0,)


def gemm(node: ir.Node) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if node.attributes.get_int("transA", 0):
        return Skip("transA=1 is not quantized (fold the transpose into the producer first)")
    b = const(node, 1)
    if b is None:
        return OpSpec(activations=(0, 1))
    if b.ndim != 2:
        return Skip(f"weight has rank {b.ndim}, expected 2")
    axis = 0 if node.attributes.get_int("transB", 0) else 1
    bias = None
    if has_input(node, 2):
        c = const(node, 2)
        unit = node.attributes.get_float("alpha", 1.0) == 1.0 and node.attributes.get_float("beta", 1.0) == 1.0
        if c is None or c.ndim != 1 or not unit:
            return OpSpec(weight=(1, axis), outputs=_outputs(node))  # C stays float: not a plain per-column bias
        bias = 2
    return OpSpec(weight=(1, axis), bias=bias, outputs=_outputs(node))


def matmul(node: ir.Node) -> OpSpec | Skip:
    if (bad := float_input(node)) is not None:
        return bad
    if const(node, 0) is not None:
        return Skip("constant left-hand side is not quantized")
    b = const(node, 1)
    if b is None:
        return OpSpec(activations=(0, 1))
    if b.ndim != 2:
        return OpSpec(activations=(0,), weight=(1, None))
    return OpSpec(weight=(1, 1), outputs=_outputs(node))


HANDLERS = {"Gemm": gemm, "MatMul": matmul}


def weight_matmul(node: ir.Node) -> tuple[int, bool] | Skip:
    """For dynamic and weight-only modes: (weight input, whether stored (N, K)) of a MatMul/Gemm whose right-hand
    side is a constant matrix, or why not."""
    if (bad := float_input(node)) is not None:
        return bad
    if node.op_type == "Gemm":
        if node.attributes.get_int("transA", 0):
            return Skip("transA=1 is not quantized (fold the transpose into the producer first)")
        if has_input(node, 2) and const(node, 2) is None and node.attributes.get_float("beta", 1.0) != 1.0:
            return Skip("Gemm with a computed C and beta != 1 is not quantized")
    elif const(node, 0) is not None:
        return Skip("constant left-hand side is not quantized")
    b = const(node, 1)
    if b is None:
        return Skip("right-hand side is computed at run time (no constant weight)")
    if b.ndim != 2:
        return Skip(f"weight has rank {b.ndim}, expected 2")
    return 1, node.op_type == "Gemm" and bool(node.attributes.get_int("transB", 0))


def embedding_table(node: ir.Node) -> int | Skip:
    """For weight-only mode: a Gather along axis 0 of a constant 2-D float table (an embedding); returns 0."""
    data = const(node, 0)
    if data is None:
        return Skip("Gather data is computed at run time (not an embedding table)")
    if data.dtype.kind != "f" or data.ndim != 2:
        return Skip(f"Gather table is {data.dtype} of rank {data.ndim}, not a float matrix")
    if node.attributes.get_int("axis", 0) != 0:
        return Skip("Gather along axis != 0 is not a row lookup")
    return 0
