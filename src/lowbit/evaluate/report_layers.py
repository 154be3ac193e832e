"""Per-layer measurements for `lowbit report` when no plan lets `diagnose` supply them: each layer's SQNR (the
quantized model simulated in float, earlier layers' errors included) and histograms of the worst layers'
activations beside the ranges the plan chose."""

from __future__ import annotations

import math

import numpy as np
import onnx

HIST_LAYERS = 4  # histograms of this many lowest-SQNR layers
HIST_BINS = 64


def float_tensors(model: onnx.ModelProto) -> list[str]:
    """Float node outputs in graph order (types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    return [o for n in model.graph.node for o in n.output if types.get(o) == onnx.TensorProto.FLOAT]


def layer_pairs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[tuple[str, str, onnx.NodeProto]]:
    """(float tensor, quantized-model tensor that carries it, the quantized node computing it) per layer.

    The quantized value of T is what later layers read: T_dq after a Q/DQ pair; a graph output keeps its
    name on the DQ output while the node writes T_float.
    """
    producer = {o: n for n in quant_model.graph.node for o in n.output}
    out, seen = [], set()
    for t in float_tensors(float_model):
        dq = producer.get(t + "_dq")
        if dq is not None and dq.op_type == "DequantizeLinear":
            q_name, node = t + "_dq", producer.get(t)
        elif t in producer and producer[t].op_type == "DequantizeLinear":
            q_name, node = t, producer.get(t + "_float")
        elif t in producer and producer[t].op_type not in ("QuantizeLinear", "DequantizeLinear"):
            q_name, node = t, producer[t]
        else:
            continue
        if node is None or node.op_type in ("QuantizeLinear", "DequantizeLinear") or id(node) in seen:
            continue
        seen.add(id(node))
        out.append((t, q_name, node))
    return out


def layer_sqnr(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, batches: list[dict]) -> tuple[list, dict]:
    """Per-layer SQNR (quantized model simulated in float, errors of earlier layers included), streamed."""
    from ..runtimes.ort import session, with_outputs

    pairs = layer_pairs(float_model, quant_model)
    if not pairs:
        return [], {}
    fs = session(with_outputs(float_model, [p[0] for p in pairs]), "kernels")
    qs = session(with_outputs(quant_model, [p[1] for p in pairs]), "simulate")
    f_in, q_in = {i.name for i in fs.get_inputs()}, {i.name for i in qs.get_inputs()}
    sums = {t: [0.0, 0.0, math.inf, -math.inf] for t, _, _ in pairs}  # signal, noise, min, max
    for batch in batches:
        fr = dict(
            zip([p[0] for p in pairs], fs.run([p[0] for p in pairs], {k: v for k, v in batch.items() if k in f_in}))
        )
        qr = dict(
            zip([p[0] for p in pairs], qs.run([p[1] for p in pairs], {k: v for k, v in batch.items() if k in q_in}))
        )
        for t, _, _ in pairs:
            a = fr[t].astype(np.float64)
            s = sums[t]
            s[0] += float(np.sum(a * a))
            s[1] += float(np.sum((a - qr[t]) ** 2))
            if a.size:
                s[2], s[3] = min(s[2], float(a.min())), max(s[3], float(a.max()))
    layers = []
    for t, _, node in pairs:
        signal, noise = sums[t][0], sums[t][1]
        sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
        layers.append({"node": node.name or t, "op_type": node.op_type, "sqnr_db": sqnr, "tensor": t})
    return layers, {t: (s[2], s[3]) for t, s in sums.items()}


def worst_histograms(float_model: onnx.ModelProto, batches: list[dict], layers: list[dict], extent: dict, plan) -> dict:
    from ..runtimes.ort import session, with_outputs

    ranked = sorted(
        (layer for layer in layers if not math.isnan(layer["sqnr_db"])), key=lambda layer: layer["sqnr_db"]
    )[:HIST_LAYERS]
    ranges = {}
    for layer in ranked:
        tp = plan.tensors.get(layer["tensor"]) if plan is not None else None
        ranges[layer["tensor"]] = list(tp.range) if tp is not None and tp.range else None
    edges = {}
    for t, r in ranges.items():
        lo, hi = extent[t]
        if r is not None:
            lo, hi = min(lo, r[0]), max(hi, r[1])
        if not (math.isfinite(lo) and math.isfinite(hi)):
            continue
        edges[t] = np.linspace(lo, hi if hi > lo else lo + 1.0, HIST_BINS + 1)
    if not edges:
        return {}
    names = list(edges)
    sess = session(with_outputs(float_model, names), "kernels")
    feed_names = {i.name for i in sess.get_inputs()}
    counts = {t: np.zeros(HIST_BINS, np.int64) for t in names}
    for batch in batches:
        for t, a in zip(names, sess.run(names, {k: v for k, v in batch.items() if k in feed_names})):
            counts[t] += np.histogram(a, bins=edges[t])[0]
    node = {layer["tensor"]: layer["node"] for layer in ranked}
    return {
        t: {"edges": edges[t].tolist(), "counts": counts[t].tolist(), "range": ranges[t], "node": node[t]}
        for t in names
    }
