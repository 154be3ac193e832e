"""float16 mode: the ops converted to fp16 (their float inputs, outputs and constants), for every op.

The fragile ones stay float32: exponentials and reductions overflow fp16's 65504 maximum or lose the small
differences they are about (Softmax/Exp of logits, LayerNormalization's variance, sums of squares, Pow, Sqrt,
Reciprocal, Log...). The casts at the region's edges need the whole region, so the rewrite is deferred until every
node is decided (passes/float16.py).
"""

from __future__ import annotations

import onnx_ir as ir

from ..decision import Reason
from ..passes.float16 import convert_float16
from ..recipe import Scheme
from .base import Skip, Take
from .registry import ANY, RewriteContext, register

FLOAT16_OPS = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "Add",
        "Sub",
        "Mul",
        "Relu",
        "Clip",
        "Sigmoid",
        "Tanh",
        "HardSwish",
        "HardSigmoid",
        "LeakyRelu",
        "Gelu",
        "Erf",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Slice",
        "Gather",
        "Concat",
        "Split",
        "Identity",
        "Pad",
        "DepthToSpace",
        "SpaceToDepth",
        "Where",
        "Neg",
        "Abs",
        "Max",
        "Min",
    }
)
FLOAT16_FRAGILE = frozenset(
    {
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "BatchNormalization",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceLogSumExp",
        "Pow",
        "Sqrt",
        "Exp",
        "Log",
        "Reciprocal",
        "Div",
        "CumSum",
        "Softplus",
    }
)


def decide(node: ir.Node, scheme: Scheme) -> Skip | Take:
    op = node.op_type
    if op in FLOAT16_FRAGILE:
        return Skip(Reason.FP16_FRAGILE, {"op": op})
    if node.domain not in ("", "ai.onnx") or op not in FLOAT16_OPS:
        return Skip(Reason.FP16_NO_FORM, {"op": op})
    if any(
        v is not None and v.dtype not in (None, ir.DataType.FLOAT) and v.dtype.is_floating_point()
        for v in list(node.inputs) + list(node.outputs)
    ):
        return Skip(Reason.FP16_MIXED_TYPES, {"op": op})
    return Take(Reason.FLOAT16)


def _convert(model: ir.Model, names: list[str]) -> None:
    convert_float16(model, set(names))


def rewrite(ctx: RewriteContext, node: ir.Node, scheme: Scheme) -> None:
    ctx.defer(_convert, node)


register("float16", [ANY], decide, rewrite, domain=ANY)
