"""Op handlers: for one node, which inputs and outputs are quantized and which share a scale.

A handler looks at a node and returns an OpSpec or a Skip with the reason; it never edits the graph.
"""

from __future__ import annotations

from typing import Callable

import onnx_ir as ir

from .activation import HANDLERS as _ACTIVATION
from .base import OpSpec, Skip
from .conv import HANDLERS as _CONV
from .elementwise import HANDLERS as _ELEMENTWISE
from .matmul import HANDLERS as _MATMUL
from .pooling import HANDLERS as _POOLING
from .shape import HANDLERS as _SHAPE

Handler = Callable[[ir.Node], "OpSpec | Skip"]

HANDLERS: dict[str, Handler] = {**_CONV, **_MATMUL, **_ELEMENTWISE, **_POOLING, **_ACTIVATION, **_SHAPE}

# float16 mode: ops converted to fp16 (their float inputs, outputs and constants). The fragile ones stay float32:
# exponentials and reductions overflow fp16's 65504 maximum or lose the small differences they are about
# (Softmax/Exp of logits, LayerNormalization's variance, sums of squares, Pow, Sqrt, Reciprocal, Log...).
FLOAT16_OPS = frozenset({
    "Conv", "ConvTranspose", "MatMul", "Gemm", "Add", "Sub", "Mul", "Relu", "Clip", "Sigmoid", "Tanh", "HardSwish",
    "HardSigmoid", "LeakyRelu", "Gelu", "Erf", "MaxPool", "AveragePool", "GlobalAveragePool", "Reshape",
    "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "Concat", "Split", "Identity", "Pad",
    "DepthToSpace", "SpaceToDepth", "Where", "Neg", "Abs", "Max", "Min",
})
FLOAT16_FRAGILE = frozenset({
    "Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
    "BatchNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp", "Pow",
    "Sqrt", "Exp", "Log", "Reciprocal", "Div", "CumSum", "Softplus",
})


def spec_for(node: ir.Node) -> OpSpec | Skip:
    if node.domain == "com.microsoft" and node.op_type == "Attention":
        return Skip("static com.microsoft::Attention: ONNX Runtime's integer attention (QAttention) is dynamic; "
                    "use mode dynamic for it")
    if node.domain not in ("", "ai.onnx"):
        return Skip(f"custom-domain op {node.domain}::{node.op_type} has no quantized form")
    if node.outputs and all(o.dtype is not None and o.dtype != ir.DataType.FLOAT for o in node.outputs):
        return Skip(f"integer {node.op_type} (shape arithmetic): nothing to quantize")
    handler = HANDLERS.get(node.op_type)
    if handler is None:
        return Skip(f"no quantized form for {node.op_type} in lowbit")
    return handler(node)


__all__ = ["OpSpec", "Skip", "HANDLERS", "spec_for", "FLOAT16_OPS", "FLOAT16_FRAGILE"]
