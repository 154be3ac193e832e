"""The verify stage: the rewritten model as the protobuf that is written, adapted to its target and checked."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .plan import Plan
from .targets import adapt


def finish(model: ir.Model, plan: Plan, target: str) -> onnx.ModelProto:
    proto = ir.to_proto(model)
    # The shapes lowbit inferred are for planning only. Written out, their consistent symbolic dims let ONNX Runtime
    # fuse residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel ran 4-5x slower than the
    # pair (ORT 1.32, 1 thread, MiniLM shapes): 15-20% of MiniLM's dynamic int8 latency. ORT infers what it needs.
    del proto.graph.value_info[:]
    adapt(proto, plan, target)
    proto.producer_name, proto.producer_version = "lowbit", plan.lowbit_version
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as e:  # a bug in lowbit, not a user mistake: keep the detail
        raise RuntimeError(f"lowbit produced an invalid model: {e}") from e
    return proto
