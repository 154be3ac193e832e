"""`lowbit report`: one self-contained HTML file comparing a float model with its quantized versions.

Gathers the data dict that `lowbit.evaluate.report.render` draws (schema in that module's docstring):
fidelity and size of every model, latency measured interleaved, per-layer SQNR of the first quantized
model, histograms of its worst layers' activations with the ranges the plan chose, findings and the recipe.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import LowbitError

HIST_LAYERS = 4  # histograms of this many lowest-SQNR layers
HIST_BINS = 64
LOW_SQNR_DB = 15.0
DIAGNOSE_SAMPLES = 64  # below this a layer is reported as a finding (about 2.5 effective bits)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report: float vs quantized models",
                       description="Compare a float model with one or more quantized versions on DATA and write one "
                       "HTML file (no network needed to open it): summary, accuracy vs size vs latency, per-layer "
                       "SQNR, activation histograms of the worst layers with the chosen ranges, findings, recipe.")
    p.add_argument("float_model", metavar="FLOAT.onnx", help="the float model")
    p.add_argument("quant_models", metavar="QUANT.onnx", nargs="+", help="quantized model(s); the first is diagnosed")
    p.add_argument("--data", required=True, help="evaluation data: .npy/.npz file or folder")
    p.add_argument("--plan", metavar="PLAN.json", help="plan of the first quantized model (default: beside it)")
    p.add_argument("-o", "--output", required=True, help="where to write the report (.html)")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    p.add_argument("--no-diagnose", action="store_true",
                   help="per-layer SQNR only: no layer-alone trials, suggested fixes or re-quantization")
    p.add_argument("--limit", type=int, default=256, metavar="N", help="samples of DATA to use (default 256)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="also print the report data as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _check_output(output: str, inputs: list[str]) -> Path:
    from ..graph.io import same_file

    out = Path(output)
    for src in inputs:
        if same_file(out, src):
            raise LowbitError(f"output {out} is one of the inputs; choose another path with -o")
    if out.suffix.lower() not in (".html", ".htm"):
        raise LowbitError(f"output {out} must end in .html")
    if not out.parent.exists():
        raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    return out


def _load(path: str) -> onnx.ModelProto:
    if not Path(path).is_file():
        raise LowbitError(f"model not found: {path}")
    try:
        return onnx.load(path)
    except Exception as e:  # onnx raises assorted decode errors for files that are not models
        raise LowbitError(f"{path} is not an ONNX model ({type(e).__name__})") from None



def _float_tensors(model: onnx.ModelProto) -> list[str]:
    """Float node outputs in graph order (types from shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return [o for n in model.graph.node for o in n.output if types.get(o) == onnx.TensorProto.FLOAT]


def _pairs(float_model: onnx.ModelProto, quant_model: onnx.ModelProto) -> list[tuple[str, str, onnx.NodeProto]]:
    """(float tensor, quantized-model tensor that carries it, the quantized node computing it) per layer.

    The quantized value of T is what later layers read: T_dq after a Q/DQ pair; a graph output keeps its
    name on the DQ output while the node writes T_float.
    """
    producer = {o: n for n in quant_model.graph.node for o in n.output}
    out, seen = [], set()
    for t in _float_tensors(float_model):
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


def _layer_sqnr(float_model: onnx.ModelProto, quant_model: onnx.ModelProto, batches: list[dict]) -> tuple[list, dict]:
    """Per-layer SQNR (quantized model simulated in float, errors of earlier layers included), streamed."""
    from ..runtimes.ort import session, with_outputs

    pairs = _pairs(float_model, quant_model)
    if not pairs:
        return [], {}
    fs = session(with_outputs(float_model, [p[0] for p in pairs]), "kernels")
    qs = session(with_outputs(quant_model, [p[1] for p in pairs]), "simulate")
    f_in, q_in = {i.name for i in fs.get_inputs()}, {i.name for i in qs.get_inputs()}
    sums = {t: [0.0, 0.0, math.inf, -math.inf] for t, _, _ in pairs}  # signal, noise, min, max
    for batch in batches:
        fr = dict(zip([p[0] for p in pairs], fs.run([p[0] for p in pairs], {k: v for k, v in batch.items() if k in f_in})))
        qr = dict(zip([p[0] for p in pairs], qs.run([p[1] for p in pairs], {k: v for k, v in batch.items() if k in q_in})))
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


def _histograms(float_model: onnx.ModelProto, batches: list[dict], layers: list[dict], extent: dict, plan) -> dict:
    from ..runtimes.ort import session, with_outputs

    ranked = sorted((l for l in layers if not math.isnan(l["sqnr_db"])), key=lambda l: l["sqnr_db"])[:HIST_LAYERS]
    ranges = {}
    for l in ranked:
        tp = plan.tensors.get(l["tensor"]) if plan is not None else None
        ranges[l["tensor"]] = list(tp.range) if tp is not None and tp.range else None
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
    node = {l["tensor"]: l["node"] for l in ranked}
    return {t: {"edges": edges[t].tolist(), "counts": counts[t].tolist(), "range": ranges[t], "node": node[t]}
            for t in names}


def _fidelity(float_path: str, quant_path: str, batches: list[dict], args: argparse.Namespace) -> dict:
    try:
        from ..evaluate.evaluate import evaluate
    except ImportError:
        evaluate = None
    if evaluate is not None:
        res = evaluate(quant_path, args.data, reference=float_path, batch_size=args.batch_size, limit=args.limit,
                       progress=not args.quiet)
        first = next(iter(res["outputs"].values()))
        return {"top1_agreement": float(first["top1_agreement"]), "cosine": float(first["cosine"])}
    from ..evaluate.metrics import fidelity
    from ..runtimes.ort import run_all, session

    ref = run_all(session(float_path), batches)[0]
    out = run_all(session(quant_path), batches)[0]
    f = fidelity(ref, out)
    return {"top1_agreement": f["top1_agreement"], "cosine": f["cosine"]}


def _latency(paths: dict[str, str], batches: list[dict], args: argparse.Namespace) -> dict[str, float]:
    """Median single-sample latency in ms per variant, 1 thread, timed interleaved."""
    try:
        from ..evaluate.bench import benchmark
    except ImportError:
        benchmark = None
    if benchmark is not None:
        res = benchmark(list(paths.values()), threads=(1,), runs=30, warmup=3, batch=1, data=args.data,
                        profile=False, progress=not args.quiet)
        # entries come back in the order the models were given
        return {name: float(entry["latency_ms"]["1"]["p50"]) for name, entry in zip(paths, res["models"].values())}
    from ..evaluate.latency import interleaved_latency
    from ..runtimes.ort import session

    feeds = {k: v[:1] for k, v in batches[0].items()}  # batch 1, as on a phone
    sessions = {}
    for name, path in paths.items():
        s = session(path, "kernels", threads=1)
        sessions[name] = s
    names = {i.name for s in sessions.values() for i in s.get_inputs()}
    times = interleaved_latency(sessions, {k: v for k, v in feeds.items() if k in names}, runs=30, warmup=3)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _summary(args: argparse.Namespace, plan, plan_file: Path | None, samples: int, sizes: dict) -> list[list[str]]:
    from ..runtimes.ort import cpu_has_vnni

    rows = [["float model", args.float_model], ["quantized model(s)", ", ".join(args.quant_models)],
            ["data", f"{args.data} ({samples} samples)"]]
    float_size = sizes[args.float_model]
    for q in args.quant_models:
        rows.append([f"size of {q}", f"{_size(sizes[q])} ({sizes[q] / float_size:.0%} of {_size(float_size)} float)"])
    if plan is None:
        rows.append(["plan", f"none found beside {args.quant_models[0]}; node decisions and ranges not shown"])
    else:
        quantized = sum(e.quantized for e in plan.nodes.values())
        rows.append(["plan", str(plan_file)])
        rows.append(["nodes quantized", f"{quantized} of {len(plan.nodes)}"])
        skipped: dict[str, list[str]] = defaultdict(list)
        for name, e in plan.nodes.items():
            if not e.quantized:
                skipped[e.reason].append(name)
        for reason, names in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
            rows.append([f"left float: {reason}", shown])
        if plan.overflow_guard:
            rows.append(["overflow guard", f"{sum(plan.overflow_guard.values())} weight channels in "
                                           f"{len(plan.overflow_guard)} layers adjusted (AVX2 without VNNI)"])
        rows.append(["calibration samples", str(plan.calibration_samples)])
    vnni = cpu_has_vnni()
    rows.append(["this CPU", "VNNI (int32 accumulation)" if vnni else "no VNNI" if vnni is False else "unknown"])
    return rows


def _lint(quant_path: str, plan, layers: list[dict]) -> list[dict]:
    try:
        from ..evaluate.lint import lint
    except ImportError:
        found = []
    else:
        found = list(lint(quant_path, plan=plan))
    low = [l["node"] for l in layers if l["sqnr_db"] is not None and l["sqnr_db"] < LOW_SQNR_DB]
    if not low:
        return found
    return found + [{"kind": "low-sqnr", "nodes": low,
             "message": f"{len(low)} layer(s) below {LOW_SQNR_DB:.0f} dB SQNR (under ~2.5 effective bits)",
             "fix": 'keep them float with a recipe rule {"names": [...], "scheme": null}, or try '
                    "--calibration percentile / 16-bit activations for them"}]


def gather(args: argparse.Namespace) -> dict:
    """Measure everything the report shows; raises LowbitError for user mistakes before any output exists."""
    from .._version import __version__
    from ..data import input_specs, open_data
    from ..plan import Plan, plan_path

    float_model = _load(args.float_model)
    quant_model = _load(args.quant_models[0])
    for q in args.quant_models[1:]:
        _load(q)
    if args.limit is not None and args.limit < 1:
        raise LowbitError(f"--limit must be at least 1, got {args.limit}")
    plan_file = Path(args.plan) if args.plan else plan_path(args.quant_models[0])
    plan = Plan.load(plan_file) if args.plan or plan_file.exists() else None
    batches = list(open_data(args.data, input_specs(float_model), batch_size=args.batch_size, limit=args.limit))
    samples = sum(len(next(iter(b.values()))) for b in batches)
    if samples == 0:
        raise LowbitError(f"no samples in {args.data}; check the data (or --limit)")

    labels = [Path(q).name for q in args.quant_models]
    if len(set(labels)) < len(labels) or "float" in labels:
        labels = list(args.quant_models)
    paths = {"float": args.float_model, **dict(zip(labels, args.quant_models))}
    sizes = {p: Path(p).stat().st_size for p in [args.float_model, *args.quant_models]}
    latency = {} if args.no_bench else _latency(paths, batches, args)
    variants = [{"name": "float", "size_bytes": sizes[args.float_model], "top1_agreement": 1.0, "cosine": 1.0,
                 "latency_ms": latency.get("float")}]
    for name, q in list(paths.items())[1:]:
        variants.append({"name": name, "size_bytes": sizes[q], **_fidelity(args.float_model, q, batches, args),
                         "latency_ms": latency.get(name)})

    diag = None if plan is None or args.no_diagnose else _diagnose(args, plan)
    if diag is not None:
        layers, histograms = _from_diagnose(diag, quant_model)
        recipe = diag["recipe"]
    else:
        layers, extent = _layer_sqnr(float_model, quant_model, batches)
        histograms = _histograms(float_model, batches, layers, extent, plan)
        recipe = plan.recipe if plan is not None else None
    rows = _summary(args, plan, plan_file if plan is not None else None, samples, sizes)
    if diag is not None:
        rows += _diagnose_rows(diag)
    return {
        "title": f"lowbit report: {Path(args.float_model).name} vs {', '.join(Path(q).name for q in args.quant_models)}",
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "lowbit_version": __version__,
        "summary": {"rows": rows},
        "variants": variants,
        "layers": [{k: v for k, v in l.items() if k != "tensor"} for l in layers],
        "histograms": histograms,
        "lint": diag["lint"] if diag is not None else _lint(args.quant_models[0], plan, layers),
        "recipe": recipe,
        "recipe_note": ("the recipe diagnose suggests: the plan's recipe with rules for the worst layers prepended"
                        if diag is not None else "the recipe recorded in the plan" if recipe is not None else ""),
    }


def _diagnose(args: argparse.Namespace, plan) -> dict | None:
    try:
        from ..evaluate.diagnose import diagnose
    except ImportError:
        return None
    # layer-alone trials re-run the model per layer: a smaller sample keeps big models quick
    return diagnose(args.float_model, args.quant_models[0], args.data, plan=plan, top=HIST_LAYERS,
                    limit=min(args.limit, DIAGNOSE_SAMPLES), progress=not args.quiet)


def _from_diagnose(diag: dict, quant_model: onnx.ModelProto) -> tuple[list[dict], dict]:
    """diagnose ranks layers worst first; the chart shows them in graph order. None (not finite) is exact."""
    order = {n.name: i for i, n in enumerate(quant_model.graph.node)}

    def num(v: Any) -> float | None:
        return math.inf if v is None else float(v)

    layers = []
    for l in sorted(diag["layers"], key=lambda l: order.get(l["node"], len(order))):
        row = {"node": l["node"], "op_type": l["op_type"], "sqnr_db": num(l["sqnr_db"]), "tensor": l.get("tensor")}
        if "alone_sqnr_db" in l:
            row["alone_sqnr_db"] = num(l["alone_sqnr_db"])
        s = l.get("suggestion") or {}
        if s.get("kind") not in (None, "none"):
            row["suggestion"] = f"{s['kind']}: {s.get('why', '')}"
        layers.append(row)
    node_of = {l.get("tensor"): l["node"] for l in diag["layers"]}
    histograms = {t: {**h, "node": node_of.get(t)} for t, h in diag["histograms"].items()}
    return layers, histograms


def _diagnose_rows(diag: dict) -> list[list[str]]:
    def pct(v: Any) -> str:
        return "?" if v is None else f"{100 * v:.1f}%"

    def db(v: Any) -> str:
        return "exact" if v is None else f"{v:.1f} dB"

    before, after = diag.get("before", {}), diag.get("after", {})
    fixes = [l for l in diag["layers"] if (l.get("suggestion") or {}).get("kind") not in (None, "none")]
    return [["diagnosed on", f"{diag.get('samples')} samples (float simulation of the quantized model)"],
            ["suggested fixes", f"{len(fixes)} layer(s): " + ", ".join(l["node"] for l in fixes) if fixes else "none"],
            ["top-1 agreement: now -> with the suggested recipe",
             f"{pct(before.get('top1_agreement'))} -> {pct(after.get('top1_agreement'))}"],
            ["output SQNR: now -> with the suggested recipe",
             f"{db(before.get('sqnr_db'))} -> {db(after.get('sqnr_db'))}"]]


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def run(args: argparse.Namespace) -> int:
    from ..evaluate.report import write_report

    plan_inputs = [args.plan] if args.plan else []
    out = _check_output(args.output, [args.float_model, *args.quant_models, args.data, *plan_inputs])
    data = gather(args)
    write_report(data, out)
    if args.json:
        print(json.dumps(_jsonable(data), indent=1))
    else:
        worst = sorted((l for l in data["layers"] if not math.isnan(l["sqnr_db"])), key=lambda l: l["sqnr_db"])[:3]
        for v in data["variants"][1:]:
            print(f"{v['name']}: top-1 agreement {v['top1_agreement']:.1%}, cosine {v['cosine']:.4f}, "
                  f"{_size(v['size_bytes'])}")
        if worst:
            print("lowest SQNR: " + ", ".join(f"{l['node']} {l['sqnr_db']:.1f} dB" for l in worst))
        print(f"wrote {out}")
    return 0
