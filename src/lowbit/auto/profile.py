"""Each layer's latency in each precision, measured on this machine with ONNX Runtime's per-node profiler.

ONNX Runtime renames the nodes it fuses: a QDQ Conv becomes `<name>_token_<k>` (QLinearConv), a float Conv with
its Clip in the NCHWc layout becomes `<output tensor>_nchwc`. Both are mapped back to the node of the model we
built, and that node to its layer (a folded Clip belongs to its Conv). What maps to no layer (the input's
QuantizeLinear, layout reorders) is the model's `other` time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .assign import Layer

_TOKEN = re.compile(r"_token_\d+$")
_BOUNDARY = "\0boundary:"  # per-run keys of Q/DQ time, by tensor (no node or layer name starts with NUL)


def owner_map(model: onnx.ModelProto, layers: list[Layer]) -> tuple[dict[str, str], dict[str, str]]:
    """(node name -> layer, tensor name -> layer) for the model ONNX Runtime was given."""
    member = {n: x.node for x in layers for n in (x.node, *x.folded)}
    by_node: dict[str, str] = {}
    by_tensor: dict[str, str] = {}
    for n in model.graph.node:
        if n.name in member:
            by_node[n.name] = member[n.name]
            for o in n.output:
                by_tensor[o] = member[n.name]
    return by_node, by_tensor


def layer_of(name: str, by_node: dict[str, str], by_tensor: dict[str, str]) -> str | None:
    if name in by_node:
        return by_node[name]
    stem = _TOKEN.sub("", name)
    if stem in by_node:
        return by_node[stem]
    if name.endswith("_nchwc") and name[: -len("_nchwc")] in by_tensor:
        return by_tensor[name[: -len("_nchwc")]]
    if name.endswith(("_Q", "_DQ")):  # a boundary between precisions: the model's, not one layer's
        return None
    # lowbit's rewrites name their nodes `<node>_<what>` (fc_MatMulNBits): the longest such prefix
    cut = len(stem)
    while (cut := stem.rfind("_", 0, cut)) > 0:
        if stem[:cut] in by_node:
            return by_node[stem[:cut]]
    return None


def boundary_of(name: str) -> str | None:
    """The tensor a lowbit QuantizeLinear/DequantizeLinear node (`<tensor>_Q`, `<tensor>_DQ`) converts."""
    for suffix in ("_Q", "_DQ"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def profile(
    model: onnx.ModelProto, layers: list[Layer], feeds: dict[str, np.ndarray], runs: int = 20, warmup: int = 3
) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds per run at 1 thread, with ONNX Runtime's optimizations: of each layer (and "other":
    what maps to no layer), and of each tensor's QuantizeLinear + DequantizeLinear (where they run unfused)."""
    by_node, by_tensor = owner_map(model, layers)
    with tempfile.TemporaryDirectory(prefix="lowbit-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup):  # warm-up runs outside the profile: first runs allocate
            sess.run(None, feeds)
        del sess
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # A run's node events come before its `model_run` event; the warm-up runs are dropped.
    per_run = _runs(events, by_node, by_tensor)[warmup:]
    keys = [x.node for x in layers] + ["other"]
    tensors = sorted({k for r in per_run for k in r if k.startswith(_BOUNDARY)})
    med = _median(per_run, keys + tensors)
    return {k: med[k] for k in keys}, {t[len(_BOUNDARY) :]: med[t] for t in tensors}


def _runs(events: list[dict], by_node: dict[str, str], by_tensor: dict[str, str]) -> list[dict[str, float]]:
    """Node times grouped per run: a run is the node events between two `model_run` session events."""
    runs: list[dict[str, float]] = []
    current: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            tensor = boundary_of(_TOKEN.sub("", name))
            owner = _BOUNDARY + tensor if tensor is not None else layer_of(name, by_node, by_tensor) or "other"
            current[owner] += e["dur"] / 1e3
        elif e.get("cat") == "Session" and e.get("name") == "model_run":
            runs.append(current)
            current = defaultdict(float)
    return runs


def _median(runs: list[dict[str, float]], keys: list[str]) -> dict[str, float]:
    return {k: float(np.median([r.get(k, 0.0) for r in runs])) if runs else 0.0 for k in keys}
