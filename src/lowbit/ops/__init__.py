"""Op families: for each mode, how a node is decided and rewritten. One module per family registers itself in
`registry` on import; importing this package registers them all.

Static handlers return an OpSpec (which inputs and outputs are quantized and which share a scale) or a Skip with
the reason; they never edit the graph. Other modes return Take (rewritten by the family's rewrite function), Skip,
or AsStatic (quantize statically instead).
"""

from __future__ import annotations

import onnx_ir as ir

from ..decision import Reason
from ..recipe import Scheme
from . import activation, attention, conv, elementwise, embedding, float16, matmul, pooling, recurrent, shape
from .base import AsStatic, Decided, OpSpec, Refuse, Skip, Take
from .registry import ANY, RewriteContext, decide, entry_for, register, registered


def _dynamic_other(node: ir.Node, scheme: Scheme) -> Skip:
    return Skip(Reason.DYNAMIC_OTHER, {"op": node.op_type})


def _no_weights(node: ir.Node, scheme: Scheme) -> Skip:
    return Skip(Reason.NO_WEIGHTS, {"op": node.op_type})


register("dynamic", [ANY], _dynamic_other, domain=ANY)
register("weight_only", [ANY], _no_weights, domain=ANY)

FAMILIES = (activation, attention, conv, elementwise, embedding, float16, matmul, pooling, recurrent, shape)

__all__ = [
    "OpSpec",
    "Skip",
    "Take",
    "AsStatic",
    "Decided",
    "Refuse",
    "RewriteContext",
    "decide",
    "entry_for",
    "register",
    "registered",
    "FAMILIES",
]
