"""The verify stage: the rewritten model as the protobuf that is written, adapted to its target and checked."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from .graph import external
from .plan import Plan
from .targets import adapt


def finish(model: ir.Model, plan: Plan, target: str) -> onnx.ModelProto:
    """The model as a self-contained ModelProto: weights still memory-mapped from the float model's external data
    (those left float) are copied in first, so what is written or run never refers to the float model's files.
    A large model is checked as a temporary copy written with external data (by path): the in-memory checker
    would serialize it (a second copy), which protobuf refuses past 2 GB."""
    external.load_into_memory(model)
    proto = ir.to_proto(model)
    # The shapes lowbit inferred are for planning only. Written out, their consistent symbolic dims let ONNX Runtime
    # fuse residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel ran 4-5x slower than the
    # pair (ORT 1.32, 1 thread, MiniLM shapes): 15-20% of MiniLM's dynamic int8 latency. ORT infers what it needs.
    del proto.graph.value_info[:]
    adapt(proto, plan, target)
    proto.producer_name, proto.producer_version = "lowbit", plan.lowbit_version
    try:
        if proto.ByteSize() < external.FILE_BYTES:
            onnx.checker.check_model(proto)
        else:
            with tempfile.TemporaryDirectory(prefix="lowbit-check-") as folder:
                onnx.checker.check_model(str(external.write_external(proto, Path(folder) / "model.onnx")))
    except onnx.checker.ValidationError as e:  # a bug in lowbit, not a user mistake: keep the detail
        raise RuntimeError(f"lowbit produced an invalid model: {e}") from e
    return proto
