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
