"""The data `lowbit report` shows, measured: a float model against one or more quantized versions.

`report()` gathers the dict that `lowbit.evaluate.report.render` draws (schema in that module's docstring) and
writes the HTML: fidelity and size of every model, latency measured interleaved, per-layer SQNR of the first
quantized model, histograms of its worst layers' activations with the ranges the plan chose, findings and the
recipe. With a plan, `diagnose` supplies the layers, histograms and recipe; without one (or with
diagnose=False) the per-layer SQNR is measured here in one streamed pass.
"""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from ..errors import LowbitError
from ..graph.io import load_proto
from ..graph.write import same_file
from .jsonable import JsonResult
from .report_layers import HIST_LAYERS, layer_sqnr, worst_histograms

LOW_SQNR_DB = 15.0
DIAGNOSE_SAMPLES = 64  # below this a layer is reported as a finding (about 2.5 effective bits)

PathLike = str | os.PathLike


@dataclass
class ReportResult(JsonResult):
    """The report's data (the schema `render` draws; SQNRs are floats, +inf exact) and where the HTML went."""

    title: str
    generated: str
    lowbit_version: str
    summary: dict[str, Any]
    variants: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    histograms: dict[str, dict[str, Any]]
    lint: list[dict[str, Any]]
    recipe: dict[str, Any] | None
    recipe_note: str
    auto: dict[str, Any] | None = None  # `lowbit auto`'s OUT.auto.json, when it is beside the first model
    output: Path | None = None

    _skip = ("output",)  # the JSON form is the report data, as `lowbit report --json` prints it


def report(
    float_model: PathLike,
    quant_models: Sequence[PathLike],
    data: Any,
    output: PathLike | None = None,
    *,
    plan: PathLike | None = None,
    bench: bool = True,
    diagnose: bool = True,
    limit: int = 256,
    batch_size: int = 8,
    progress: bool = True,
    kinds: dict[str, str] | None = None,
) -> ReportResult:
    """Measure `quant_models` (files; the first is diagnosed) against `float_model` on `data` and, with
    `output` (.html), write the self-contained HTML report there. `plan` defaults to the one beside the first
    quantized model; `bench=False` skips latency, `diagnose=False` the layer-alone trials and fixes. `kinds`
    overrides the guessed kind of outputs by name (outputs.py)."""
    from .report import write_report

    float_path, quant_paths = str(float_model), [str(q) for q in quant_models]
    if not quant_paths:
        raise LowbitError("no quantized model to report on; pass one or more")
    out = None
    if output is not None:
        inputs = [
            float_path,
            *quant_paths,
            *([data] if isinstance(data, (str, os.PathLike)) else []),
            *([plan] if plan else []),
        ]
        out = check_report_output(output, inputs)
    result = _gather(float_path, quant_paths, data, plan, bench, diagnose, limit, batch_size, progress, kinds)
    if out is not None:
        write_report(result, out)
    return ReportResult(**result, output=out)


def check_report_output(output: PathLike, inputs: list[Any]) -> Path:
    out = Path(output)
    for src in inputs:
        if same_file(out, src):
            raise LowbitError(f"output {out} is one of the inputs; choose another path with -o")
    if out.suffix.lower() not in (".html", ".htm"):
        raise LowbitError(f"output {out} must end in .html")
    if not out.parent.exists():
        raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    return out


def _gather(
    float_path: str,
    quant_paths: list[str],
    data: Any,
    plan_arg: PathLike | None,
    bench: bool,
    diagnose: bool,
    limit: int,
    batch_size: int,
    progress: bool,
    kinds: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Measure everything the report shows; raises LowbitError for user mistakes before any output exists."""
    from .._version import __version__
    from ..data import input_specs, open_data
    from ..plan import Plan, plan_path

    float_model = load_proto(float_path)
    quant_model = load_proto(quant_paths[0])
    for q in quant_paths[1:]:
        load_proto(q)
    if limit is not None and limit < 1:
        raise LowbitError(f"--limit must be at least 1, got {limit}")
    plan_file = Path(plan_arg) if plan_arg else plan_path(quant_paths[0])
    plan = Plan.load(plan_file) if plan_arg or plan_file.exists() else None
    if plan is not None:
        plan.check_model_file(quant_paths[0])
    batches = list(open_data(data, input_specs(float_model), batch_size=batch_size, limit=limit))
    samples = sum(len(next(iter(b.values()))) for b in batches)
    if samples == 0:
        raise LowbitError(f"no samples in {data}; check the data (or --limit)")

    labels = [Path(q).name for q in quant_paths]
    if len(set(labels)) < len(labels) or "float" in labels:
        labels = list(quant_paths)
    paths = {"float": float_path, **dict(zip(labels, quant_paths))}
    sizes = {p: Path(p).stat().st_size for p in [float_path, *quant_paths]}
    latency = _latency(paths, data, progress) if bench else {}
    measured = [
        {
            "name": name,
            "size_bytes": sizes[q],
            **_fidelity(float_path, q, data, batch_size, limit, progress, kinds),
            "latency_ms": latency.get(name),
        }
        for name, q in list(paths.items())[1:]
    ]
    variants = [
        {"name": "float", "size_bytes": sizes[float_path], **_perfect(measured[0]), "latency_ms": latency.get("float")}
    ]
    variants += measured

    diag = None
    if plan is not None and diagnose:
        # layer-alone trials re-run the model per layer: a smaller sample keeps big models quick
        from .diagnose import diagnose as run_diagnose

        diag = run_diagnose(
            float_path,
            quant_paths[0],
            data,
            plan=plan,
            top=HIST_LAYERS,
            limit=min(limit or DIAGNOSE_SAMPLES, DIAGNOSE_SAMPLES),
            progress=progress,
            kinds=kinds,
        ).to_dict()
    if diag is not None:
        layers, histograms = _from_diagnose(diag, quant_model)
        recipe = diag["recipe"]
    else:
        layers, extent = layer_sqnr(float_model, quant_model, batches)
        histograms = worst_histograms(float_model, batches, layers, extent, plan)
        recipe = plan.recipe if plan is not None else None
    rows = _summary(float_path, quant_paths, data, plan, plan_file if plan is not None else None, samples, sizes)
    if diag is not None:
        rows += _diagnose_rows(diag)
    auto_file = Path(quant_paths[0]).with_suffix(".auto.json")  # `lowbit auto -o OUT.onnx` writes it beside OUT
    return {
        "auto": json.loads(auto_file.read_text()) if auto_file.is_file() else None,
        "title": f"lowbit report: {Path(float_path).name} vs {', '.join(Path(q).name for q in quant_paths)}",
        "generated": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "lowbit_version": __version__,
        "summary": {"rows": rows},
        "variants": variants,
        "layers": [{k: v for k, v in layer.items() if k != "tensor"} for layer in layers],
        "histograms": histograms,
        "lint": diag["lint"] if diag is not None else _lint(quant_paths[0], plan, layers),
        "recipe": recipe,
        "recipe_note": (
            "the recipe diagnose suggests: the plan's recipe with rules for the worst layers prepended"
            if diag is not None
            else "the recipe recorded in the plan"
            if recipe is not None
            else ""
        ),
    }


def _fidelity(
    float_path: str, quant_path: str, data: Any, batch_size: int, limit: int, progress: bool, kinds: Any
) -> dict:
    from .evaluate import evaluate

    res = evaluate(
        quant_path, data, reference=float_path, batch_size=batch_size, limit=limit, progress=progress, kinds=kinds
    )
    assert res.outputs is not None  # evaluate measures outputs whenever it has a reference
    first = next(iter(res.outputs.values()))
    t = first["task"]
    return {
        "top1_agreement": first["top1_agreement"],  # None unless the first output is class scores
        "cosine": float(first["cosine"]),
        "kind": first["kind"],
        "task": {"metric": t["metric"], "label": t["label"], "value": t["value"]},
    }


def _perfect(measured: dict) -> dict:
    """The float model against itself, in the measured variants' terms: every agreement 1, SQNR infinite."""
    t = measured["task"]
    value = math.inf if t["metric"] == "sqnr_db" else 1.0
    return {
        "top1_agreement": 1.0 if measured["top1_agreement"] is not None else None,
        "cosine": 1.0,
        "kind": measured["kind"],
        "task": {**t, "value": value},
    }


def _latency(paths: dict[str, str], data: Any, progress: bool) -> dict[str, float]:
    """Median single-sample latency in ms per variant, 1 thread, timed interleaved."""
    from .bench import benchmark

    res = benchmark(
        list(paths.values()), threads=(1,), runs=30, warmup=3, batch=1, data=data, profile=False, progress=progress
    )
    # entries come back in the order the models were given
    return {name: float(entry["latency_ms"]["1"]["p50"]) for name, entry in zip(paths, res["models"].values())}


def size_text(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def _summary(
    float_path: str, quant_paths: list[str], data: Any, plan, plan_file: Path | None, samples: int, sizes: dict
) -> list[list[str]]:
    from ..runtimes.ort import cpu_has_vnni

    rows = [
        ["float model", float_path],
        ["quantized model(s)", ", ".join(quant_paths)],
        ["data", f"{data} ({samples} samples)"],
    ]
    float_size = sizes[float_path]
    for q in quant_paths:
        rows.append(
            [f"size of {q}", f"{size_text(sizes[q])} ({sizes[q] / float_size:.0%} of {size_text(float_size)} float)"]
        )
    if plan is None:
        rows.append(["plan", f"none found beside {quant_paths[0]}; node decisions and ranges not shown"])
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
            rows.append(
                [
                    "overflow guard",
                    f"{sum(plan.overflow_guard.values())} weight channels in "
                    f"{len(plan.overflow_guard)} layers adjusted (AVX2 without VNNI)",
                ]
            )
        rows.append(["calibration samples", str(plan.calibration_samples)])
    vnni = cpu_has_vnni()
    rows.append(["this CPU", "VNNI (int32 accumulation)" if vnni else "no VNNI" if vnni is False else "unknown"])
    return rows


def _lint(quant_path: str, plan, layers: list[dict]) -> list[dict]:
    from .lint import lint

    found = list(lint(quant_path, plan=plan))
    low = [layer["node"] for layer in layers if layer["sqnr_db"] is not None and layer["sqnr_db"] < LOW_SQNR_DB]
    if not low:
        return found
    return found + [
        {
            "kind": "low-sqnr",
            "nodes": low,
            "message": f"{len(low)} layer(s) below {LOW_SQNR_DB:.0f} dB SQNR (under ~2.5 effective bits)",
            "fix": 'keep them float with a recipe rule {"names": [...], "scheme": null}, or try '
            "--calibration percentile / 16-bit activations for them",
        }
    ]


def _from_diagnose(diag: dict, quant_model: onnx.ModelProto) -> tuple[list[dict], dict]:
    """diagnose ranks layers worst first; the chart shows them in graph order. None (not finite) is exact."""
    order = {n.name: i for i, n in enumerate(quant_model.graph.node)}

    def num(v: Any) -> float | None:
        return math.inf if v is None else float(v)

    layers = []
    for layer in sorted(diag["layers"], key=lambda layer: order.get(layer["node"], len(order))):
        row = {
            "node": layer["node"],
            "op_type": layer["op_type"],
            "sqnr_db": num(layer["sqnr_db"]),
            "tensor": layer.get("tensor"),
        }
        if "alone_sqnr_db" in layer:
            row["alone_sqnr_db"] = num(layer["alone_sqnr_db"])
        s = layer.get("suggestion") or {}
        if s.get("kind") not in (None, "none"):
            row["suggestion"] = f"{s['kind']}: {s.get('why', '')}"
        layers.append(row)
    node_of = {layer.get("tensor"): layer["node"] for layer in diag["layers"]}
    histograms = {t: {**h, "node": node_of.get(t)} for t, h in diag["histograms"].items()}
    return layers, histograms


def _diagnose_rows(diag: dict) -> list[list[str]]:
    from .outputs import format_value

    def headline_label(f: dict) -> str:
        return str(f["task"]["label"]) if f.get("task") else "top-1 agreement"

    def headline_value(f: dict) -> str:
        t = f.get("task")
        return "?" if not t else format_value(t["metric"], t["value"])

    def db(v: Any) -> str:
        return "exact" if v is None else f"{v:.1f} dB"

    before, after = diag.get("before", {}), diag.get("after", {})
    fixes = [layer for layer in diag["layers"] if (layer.get("suggestion") or {}).get("kind") not in (None, "none")]
    return [
        ["diagnosed on", f"{diag.get('samples')} samples (float simulation of the quantized model)"],
        [
            "suggested fixes",
            f"{len(fixes)} layer(s): " + ", ".join(layer["node"] for layer in fixes) if fixes else "none",
        ],
        [
            f"{headline_label(before)}: now -> with the suggested recipe",
            f"{headline_value(before)} -> {headline_value(after)}",
        ],
        ["output SQNR: now -> with the suggested recipe", f"{db(before.get('sqnr_db'))} -> {db(after.get('sqnr_db'))}"],
    ]
