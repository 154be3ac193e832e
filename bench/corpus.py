"""The real-world corpus: lowbit's default static int8 vs ONNX Runtime's quantize_static on every corpus model.

For each entry of `lowbit_zoo.corpus.registry.ENTRIES`: lowbit's default static int8 (`lowbit.quantize`), and ONNX
Runtime `quantize_static` (QDQ, per-channel, uint8 activations / int8 weights) with MinMax and with Percentile, all
calibrated on the same samples; then on held-out samples: the entry's task metric and the lowest cosine over its
outputs, each against the float model; latency vs float at 1 thread (paired, interleaved runs in one process,
median of per-pair ratios); and for lowbit, ONNX Runtime's integer kernels vs its float simulation of the same QDQ
model (ORT_DISABLE_ALL), lowest cosine over the outputs. Errors are recorded per model, never fatal.

Usage: python bench/corpus.py [--only NAME ...] [--skip NAME ...] [--out bench/RESULTS_CORPUS.md]
       python bench/corpus.py --sweep  (third-party wheels beyond the corpus -> bench/RESULTS_SWEEP.md)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from lowbit_zoo.corpus.metrics import cosine  # noqa: E402
from lowbit_zoo.corpus.registry import ENTRIES, ROOT, Entry  # noqa: E402
from ort_peer import ort_static  # noqa: E402

Feeds = list[dict[str, np.ndarray]]
LATENCY_BUDGET_S = 4.0  # per model and candidate: pairs are run until this much time or 40 pairs


def session(model: str | bytes, simulate: bool = False, threads: int = 1) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL if simulate else ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, feeds: Feeds) -> dict[str, list[np.ndarray]]:
    names = [o.name for o in sess.get_outputs()]
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(None, feed)):
            outs[n].append(v)
    return outs


def one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text if len(text) < 160 else text[:157] + "..."


CALIBRATION: str | None = None  # --calibration
RECIPE: str | None = None  # --recipe: a recipe JSON file or a preset name for lowbit's row
KEEP = "<!-- sections below are kept when bench/corpus.py rewrites this file -->"
LOAD = os.getloadavg()
ORT_TARGET = "lowbit target=onnxruntime"
NO_PEERS = False  # --no-peers: lowbit's default target only (comparing lowbit's own options)
CHECK_SAMPLES = 32  # `lowbit quantize --check`'s default; the corpus's feeds hold one sample each


def lowbit_static(
    model: Path, calib: Feeds, out: Path, target: str | None = None, batch_axes: dict | None = None
) -> Path:
    import lowbit
    from lowbit.recipe import Recipe

    recipe = Recipe() if target is None else Recipe(target=target)  # type: ignore[arg-type]
    if RECIPE:
        from lowbit.recipe import PRESETS

        recipe = PRESETS[RECIPE] if RECIPE in PRESETS else Recipe.from_dict(json.loads(Path(RECIPE).read_text()))
    if CALIBRATION:
        recipe = dataclasses.replace(recipe, default=dataclasses.replace(recipe.default, calibration=CALIBRATION))
    lowbit.quantize(str(model), output=str(out), calib=calib, recipe=recipe, progress=False, batch_axes=batch_axes)
    return out


def float_outputs(model: Path) -> list[str]:
    m = onnx.load(str(model), load_external_data=False)
    return [o.name for o in m.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]


def min_cosine(ref: dict[str, list[np.ndarray]], got: dict[str, list[np.ndarray]], names: list[str]) -> float:
    return min(cosine(ref[n], got[n]) for n in names)


def latency_ratio(float_model: Path, quant_model: Path, feed: dict[str, np.ndarray]) -> float:
    """Median over interleaved (float, int8) pairs of cpu_int8 / cpu_float, 1 thread each. CPU time of the calling
    thread (`time.thread_time`): a 1-thread ORT session runs on it, so the other jobs of a shared machine move it
    far less than wall time (bench/ort_profile.py measures the same way)."""
    f, q = session(str(float_model)), session(str(quant_model))
    for _ in range(3):
        f.run(None, feed), q.run(None, feed)
    ratios: list[float] = []
    start = time.perf_counter()
    while len(ratios) < 60 and (len(ratios) < 10 or time.perf_counter() - start < LATENCY_BUDGET_S):
        t0 = time.thread_time()
        f.run(None, feed)
        t1 = time.thread_time()
        q.run(None, feed)
        t2 = time.thread_time()
        ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    return statistics.median(ratios)


def summary_says(model: Path, out: Path, calib: Feeds, ratio: float, ks: float | None) -> dict:
    """What `lowbit quantize`'s summary prints about this model where the criteria ask it to speak: its speed lines
    (its own paired check, on one calibration sample) when int8 is not clearly faster here, and, when kernels and
    simulation part here (cosine below 0.999), what its check says about where: the check as `quantize` runs it
    (`--check 32`: the first 32 calibration samples, the gap located over all of them when they part)."""
    from lowbit.evaluate.check import runtime_check
    from lowbit.evaluate.kernel_gap import gap_text
    from lowbit.evaluate.lint import lint
    from lowbit.evaluate.speed import speed_check, speed_text
    from lowbit.plan import Plan

    said: dict = {}
    proto = onnx.load(str(out))
    if ratio > 0.95:
        plan = Plan.load(out.with_suffix(".plan.json"))
        said["speed"] = speed_text(speed_check(str(model), proto, calib[0]), lint(proto, plan=plan))
    if ks is not None and ks < 0.999:
        check = runtime_check(str(model), proto, calib[:CHECK_SAMPLES], locate_gap=True)
        if "kernel_gap" in check:
            said["gap"] = gap_text(check["kernel_gap"])
        else:
            low = min(o["kernels_vs_simulation"]["cosine"] for o in check["outputs"])
            said["gap"] = f"(no line: its check's kernels vs simulation cosine is {low:.4f})"
    return said


def measure(entry: Entry, work: Path) -> dict:
    row: dict = {"name": entry.name, "source": entry.source, "metric": entry.outputs[0].metric_name}
    try:
        model = entry.get(ROOT)
        calib, held = entry.calib(model), entry.eval(model)
    except Exception as e:  # a model that cannot be fetched/built is a row, not a crash
        row["error"] = one_line(e)
        return row
    row["samples"] = f"{len(calib)}/{len(held)}"
    names = float_outputs(model)
    ref = run(session(str(model)), held)
    primary = entry.outputs[0]
    candidates = {
        "lowbit": lambda out: lowbit_static(model, calib, out, batch_axes=entry.batch_axes),
        "ORT MinMax": lambda out: ort_static(model, calib, out, "MinMax"),
        "ORT Percentile": lambda out: ort_static(model, calib, out, "Percentile"),
        # Only when the default is not clearly faster than float (> 0.8x): the target the summary's lint points to
        # for ONNX Runtime deployment (integer HardSigmoid/HardSwish gates).
        ORT_TARGET: lambda out: lowbit_static(model, calib, out, target="onnxruntime", batch_axes=entry.batch_axes),
    }
    for tool, quantize in candidates.items():
        # The onnxruntime target: where the default is not clearly faster, and on the MobileNetV3-style models the
        # <= 0.8x criterion is about.
        if tool == ORT_TARGET and row["lowbit"].get("latency", 0.0) <= 0.8 and "mobilenet" not in entry.name:
            continue
        if NO_PEERS and tool != "lowbit":
            continue
        out = work / f"{entry.name}.{tool.replace(' ', '_')}.onnx"
        res: dict = {}
        try:
            t0 = time.perf_counter()
            quantize(out)
            res["seconds"] = time.perf_counter() - t0
            got = run(session(str(out)), held)
            res["task"] = primary.metric(ref[primary.name], got[primary.name])
            res["cosine"] = min_cosine(ref, got, names)
            res["latency"] = latency_ratio(model, out, held[0])
            if tool.startswith("lowbit"):
                sim = run(session(str(out), simulate=True), held)
                worst = min(names, key=lambda n: cosine(sim[n], got[n]))
                res["kern_vs_sim"] = cosine(sim[worst], got[worst])
                res["kern_vs_sim_output"] = worst
                res["summary"] = summary_says(model, out, calib, res["latency"], res["kern_vs_sim"])
        except Exception as e:
            res["error"] = one_line(e)
            if "--trace" in sys.argv:
                traceback.print_exc()
        row[tool] = res
        print(entry.name, tool, {k: v for k, v in res.items()}, flush=True)
    return row


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def fmt(res: dict, key: str, spec: str) -> str:
    if "error" in res:
        return "error"
    return format(res[key], spec) if key in res else "-"


def best_peer(row: dict) -> tuple[str, dict]:
    peers = [(t, row[t]) for t in ("ORT MinMax", "ORT Percentile") if "task" in row.get(t, {})]
    if not peers:
        return "none ran", {}
    return max(peers, key=lambda p: (p[1]["task"], p[1]["cosine"]))


def write(rows: list[dict], path: Path, argv: list[str], seconds: float, note: str = "") -> None:
    import lowbit
    from lowbit.recipe import Recipe
    from lowbit.runtimes.ort import cpu_has_vnni

    lines = [
        "# The real-world corpus: lowbit vs ONNX Runtime quantize_static",
        "",
        f"Command: `PYTHONPATH=src:examples python bench/corpus.py {shlex.join(argv)}`".replace("  ", " "),
        f"CPU: {cpu_name()} (VNNI: {cpu_has_vnni()}), 1 thread for latency; run took {seconds:.0f} s; load average "
        f"(1 min, the machine's other jobs) {LOAD[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        f"Versions: lowbit {getattr(lowbit, '__version__', '?')}, onnxruntime {ort.__version__}, "
        f"onnx {onnx.__version__}, numpy {np.__version__}, Python {platform.python_version()}.",
        *([f"Note: {note}", ""] if note else [""]),
        "Every tool calibrates on the same samples (calib) and is evaluated on the same held-out samples (eval).",
        f"lowbit: static int8, calibration {CALIBRATION or 'default (' + Recipe().default.calibration + ')'}.",
        "Peer: ORT `quantize_static` (QDQ, per_channel=True, QUInt8 activations,",
        "QInt8 weights, no `quant_pre_process`), the better of MinMax and Percentile by task metric. task = the",
        "model's task metric vs float (first output listed in the registry); cos = lowest cosine vs float over float",
        "outputs; lat = int8 / float CPU time of the running thread at 1 thread, median of 10-60 interleaved pairs",
        "(< 1 is faster; thread CPU time, not wall time: the machine is shared); s = lowbit's quantization",
        "wall time (calibration included; the machine's other load included too); k/s = lowbit's integer",
        "kernels vs float simulation of the same QDQ model, lowest cosine over outputs (and which output).",
        "",
        "| model | samples | task metric | lowbit task | lowbit cos | lowbit lat | lowbit s | k/s cos | peer | "
        "peer task | peer cos | peer lat | lowbit error / notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['name']} | - | {row['metric']} | | | | | | | | | | not built: {row['error']} |")
            continue
        lb = row["lowbit"]
        peer_name, peer = best_peer(row)
        ks = "-" if "kern_vs_sim" not in lb else f"{lb['kern_vs_sim']:.4f} ({lb['kern_vs_sim_output']})"
        notes = lb.get("error", "")
        if "lowbit target=onnxruntime" in row:
            rt = row["lowbit target=onnxruntime"]
            notes += (
                f" -- with --target onnxruntime: {rt['error']}"
                if "error" in rt
                else f" -- with --target onnxruntime: task {rt['task']:.3f}, cos {rt['cosine']:.4f}, "
                f"lat {rt['latency']:.2f}, k/s {rt['kern_vs_sim']:.4f} ({rt['kern_vs_sim_output']})"
            )
        peer_errors = [f"{t}: {row[t]['error']}" for t in ("ORT MinMax", "ORT Percentile") if "error" in row.get(t, {})]
        notes = "; ".join([n for n in [notes, *peer_errors] if n]).replace("|", "/")
        lines.append(
            f"| {row['name']} | {row['samples']} | {row['metric']} | {fmt(lb, 'task', '.3f')} | "
            f"{fmt(lb, 'cosine', '.4f')} | {fmt(lb, 'latency', '.2f')} | {fmt(lb, 'seconds', '.0f')} | {ks} | "
            f"{peer_name} | "
            f"{fmt(peer, 'task', '.3f')} | {fmt(peer, 'cosine', '.4f')} | {fmt(peer, 'latency', '.2f')} | {notes} |"
        )
    lines += ["", "## Summary (derived from the table above)", "", *summary(rows)]
    lines += ["", "## Sources", ""] + [f"- {r['name']}: {r['source']}" for r in rows]
    # Dated sections below the marker (other measurements, e.g. a calibration method) survive a regeneration.
    kept = path.read_text().split(KEEP, 1) if path.exists() else []
    tail = [KEEP + kept[1].rstrip("\n")] if len(kept) == 2 else []
    path.write_text("\n".join(lines + ([""] + tail if tail else [])) + "\n")


def _said(res: dict, key: str) -> str:
    """The summary's line(s) on `key`, quoted short; or that it said nothing."""
    text = res.get("summary", {}).get(key)
    if not text:
        return "lowbit's summary says nothing"
    lines = [ln.strip() for ln in text.splitlines()]
    quoted = lines[-1] if key == "speed" and len(lines) > 1 else lines[0]
    # Its own short speed check can disagree with the table's longer one on a shared machine: say so plainly.
    said = "lowbit's summary does not warn" if key == "speed" and len(lines) == 1 else "lowbit's summary"
    return f'{said}: "{quoted[:230]}{"..." if len(quoted) > 230 else ""}"'


def summary(rows: list[dict]) -> list[str]:
    """The issue's done-criteria, each checked against the rows: what fails, named; or that it holds."""
    ran = [r for r in rows if "error" not in r]
    failed = [f"{r['name']} ({r['lowbit']['error']})" for r in ran if "error" in r["lowbit"]]
    ok = [r for r in ran if "task" in r["lowbit"]]
    behind = [
        f"{r['name']} ({r['lowbit']['task']:.3f} < {best_peer(r)[1]['task']:.3f})"
        for r in ok
        if best_peer(r)[1] and r["lowbit"]["task"] < best_peer(r)[1]["task"]
    ]
    slower = []
    for r in ok:
        lb, rt = r["lowbit"], r.get(ORT_TARGET, {})
        if lb["latency"] <= 1.0:
            continue
        alt = f"; --target onnxruntime {rt['latency']:.2f}x" if "latency" in rt else ""
        slower.append(f"{r['name']} ({lb['latency']:.2f}x float{alt}; {_said(lb, 'speed')})")
    mobile = []
    for r in ok:
        if "mobilenet" not in r["name"]:
            continue
        lb, rt = r["lowbit"], r.get(ORT_TARGET, {})
        met = [t for t, x in (("default", lb), ("--target onnxruntime", rt)) if x.get("latency", 9.0) <= 0.8]
        lat = f"{lb['latency']:.2f}x default" + (f", {rt['latency']:.2f}x --target onnxruntime" if rt else "")
        mobile.append(f"{r['name']} {lat}: " + (f"met with {' and '.join(met)}" if met else "NOT met"))
    drift = [
        f"{r['name']} ({r['lowbit']['kern_vs_sim']:.4f} on output {r['lowbit']['kern_vs_sim_output']}; "
        f"{_said(r['lowbit'], 'gap')})"
        for r in ok
        if r["lowbit"]["kern_vs_sim"] < 0.999
    ]
    missing = [f"{r['name']} ({r['error']})" for r in rows if "error" in r]

    def item(label: str, bad: list[str], good: str) -> str:
        return f"- {label}: " + ("; ".join(bad) if bad else good)

    return [
        item("lowbit fails to quantize", failed, f"none of the {len(ran)} models that were built"),
        item("lowbit's task metric below the better peer", behind, "none"),
        item("lowbit int8 (default target) slower than float (1 thread)", slower, "none"),
        item("MobileNetV3-style models <= 0.8x float (1 thread)", mobile, "no such row"),
        item("integer kernels vs simulation cosine < 0.999", drift, "none"),
        item("not built (no row)", missing, "none"),
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[])
    ap.add_argument("--skip", nargs="*", default=[])
    ap.add_argument("--out", help="results file (default bench/RESULTS_CORPUS.md, or RESULTS_SWEEP.md with --sweep)")
    ap.add_argument(
        "--sweep", action="store_true", help="the wider sweep of third-party wheels (lowbit_zoo.corpus.sweep)"
    )
    ap.add_argument("--note", default="", help="a sentence printed under the header (e.g. the branch's state)")
    ap.add_argument("--trace", action="store_true", help="print tracebacks of recorded errors")
    ap.add_argument("--calibration", help="lowbit's range method instead of the recipe default (minmax, percentile...)")
    ap.add_argument(
        "--no-peers", action="store_true", help="measure lowbit alone (no ONNX Runtime quantizer, no target)"
    )
    ap.add_argument("--recipe", help="lowbit's recipe: a preset name or a recipe JSON file (ablations)")
    args = ap.parse_args()
    global CALIBRATION, NO_PEERS, RECIPE
    CALIBRATION, NO_PEERS, RECIPE = args.calibration, args.no_peers, args.recipe
    table = ENTRIES
    if args.sweep:
        from lowbit_zoo.corpus.sweep import SWEEP

        table = SWEEP
    out = args.out or str(Path(__file__).with_name("RESULTS_SWEEP.md" if args.sweep else "RESULTS_CORPUS.md"))
    entries = [e for e in table if (not args.only or e.name in args.only) and e.name not in args.skip]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(e, Path(tmp)) for e in entries]
    write(rows, Path(out), sys.argv[1:], time.perf_counter() - start, args.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
