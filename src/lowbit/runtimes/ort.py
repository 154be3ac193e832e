"""ONNX Runtime sessions in the two ways a QDQ model can run.

"kernels": default graph optimizations fuse Q/DQ around ops into integer kernels (QLinearConv, QGemm, ...),
as deployment does. "simulate": optimizations off, so every op runs in float between Q/DQ pairs, which is
what the quantization math says the model computes.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort

Mode = Literal["kernels", "simulate"]


def session(
    model: str | Path | bytes | onnx.ModelProto, mode: Mode = "kernels", threads: int = 0
) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if mode == "kernels" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    if isinstance(model, onnx.ModelProto):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also outputs the named intermediate tensors (to observe or compare them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return out


def run_all(sess: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]]) -> list[np.ndarray]:
    """Every output, concatenated over batches."""
    names = {i.name for i in sess.get_inputs()}
    outs: list[list[np.ndarray]] = []
    for batch in batches:
        res = sess.run(None, {k: v for k, v in batch.items() if k in names})
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(r)
    return [np.concatenate(o) for o in outs]


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI); None if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags
