"""`lowbit bench`: latency (interleaved), peak memory, time per op type and an energy ESTIMATE per model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .common import add_batch_axis_arg, batch_axes


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="latency, memory, time per op type and an energy estimate of one or more models",
        description="Benchmark models side by side: .onnx in ONNX Runtime (integer kernels), .tflite in LiteRT "
        "(XNNPACK). Several models are timed interleaved so their ratios hold on a busy machine; ratios are "
        "against the first model. Time per op type and the energy estimate are for ONNX models only. "
        "Energy is an ESTIMATE from operation counts (Horowitz, ISSCC 2014), not a measurement.",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", help=".onnx or .tflite models to compare; the first is the reference"
    )
    # Strings, validated by lowbit, so a bad value is a one-line error like every other user mistake.
    p.add_argument(
        "--threads",
        nargs="+",
        default=["1"],
        metavar="N",
        help="thread counts (ORT intra-op threads, LiteRT num_threads; default 1)",
    )
    p.add_argument("--runs", default="100", metavar="N", help="timed runs per model and thread count (default 100)")
    p.add_argument("--warmup", default="10", metavar="N", help="untimed runs before timing (default 10)")
    p.add_argument("--batch", default="1", metavar="N", help="batch size for dynamic batch dims (default 1)")
    p.add_argument("--data", metavar="D", help="inputs from a .npy/.npz file or folder, or images (default: random)")
    add_batch_axis_arg(p, "--data")
    p.add_argument("--no-profile", action="store_true", help="skip the time-per-op-type profile")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _int(label: str, text: str) -> int:
    from ..errors import LowbitError

    try:
        return int(text)
    except ValueError:
        raise LowbitError(f"--{label} must be an integer, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..evaluate.bench import benchmark, check_threads
    from ..evaluate.jsonable import dumps

    result = benchmark(
        args.models,
        threads=check_threads(args.threads),
        runs=_int("runs", args.runs),
        warmup=_int("warmup", args.warmup),
        batch=_int("batch", args.batch),
        data=args.data,
        batch_axes=batch_axes(args.batch_axis) or None,
        profile=not args.no_profile,
        progress=not args.quiet,
    )
    print(dumps(result, indent=2) if args.json else text(result))
    return 0


def _size(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def text(result: dict[str, Any]) -> str:
    """Human-readable report: latency tables, top op types, energy estimate."""
    m = result["machine"]
    vnni = {True: "VNNI", False: "no VNNI", None: "VNNI unknown"}[m["vnni"]]
    lines = [f"machine: {m['cpu']} ({vnni}), {m['cores']} cores"]
    models = result["models"]
    # File names are shorter; full paths only where two models share a file name.
    short = [Path(k).name for k in models]
    names = {k: s if short.count(s) == 1 else k for k, s in zip(models, short)}
    width = max(12, *(len(n) for n in names.values()))
    runtimes = {
        k: e.get("runtime", "onnxruntime").replace("onnxruntime", "ORT").replace("litert", "LiteRT")
        for k, e in models.items()
    }
    rw = max(7, *(len(r) for r in runtimes.values()))
    for t, ratios in result["ratios"].items():
        lines.append("")
        lines.append(
            f"latency, {t} thread{'s' if t != '1' else ''} (ms; ratio = median of per-round "
            f"ratios vs {names[next(iter(models))]}):"
        )
        lines.append(
            f"  {'model':<{width}}  {'runtime':<{rw}}  {'size':>9}  {'p50':>8}  {'p90':>8}  {'p99':>8}  {'ratio':>6}"
        )
        for k, e in models.items():
            lat = e["latency_ms"][t]
            lines.append(
                f"  {names[k]:<{width}}  {runtimes[k]:<{rw}}  {_size(e['size_bytes']):>9}  {lat['p50']:8.3f}"
                f"  {lat['p90']:8.3f}  {lat['p99']:8.3f}  {ratios[k]:5.2f}x"
            )
    lines.append("")
    first_t = next(iter(result["ratios"]))
    for k, e in models.items():
        mem = e["peak_memory_mb"]
        mem_text = f"peak memory {mem:.1f} MB" if mem is not None else "peak memory unknown on this OS"
        lines.append(f"{names[k]}: {mem_text} ({first_t} thread{'s' if first_t != '1' else ''})")
        ops = e.get("op_time_ms")
        if "op_time_ms" in e and ops is None:
            lines.append("  time per op type: n/a (ORT's profiler; not available for LiteRT models)")
        if ops:
            total = sum(ops.values()) or 1.0
            for op, ms in list(ops.items())[:5]:
                lines.append(f"  {op:<28} {ms:8.3f} ms/run  {100 * ms / total:5.1f}%")
    lines.append("")
    lines.append("energy ESTIMATE per run (not a measurement; Horowitz ISSCC 2014 45 nm table, see docs/energy.md):")
    lines.append(f"  {'model':<{width}}  {'total uJ':>9}  {'compute':>9}  {'memory':>9}  {'MACs':>12}  precision")
    for k, e in models.items():
        en = e["energy"]
        if en is None:
            lines.append(f"  {names[k]:<{width}}  n/a (estimated from ONNX graphs only)")
            continue
        precs = ", ".join(f"{p} {v['macs']:,}" for p, v in en["by_precision"].items() if v["macs"]) or "-"
        lines.append(
            f"  {names[k]:<{width}}  {en['total_uj']:9.3f}  {en['compute_uj']:9.3f}  {en['memory_uj']:9.3f}"
            f"  {en['macs']:>12,}  {precs}"
        )
    note = next((e["energy"]["note"] for e in models.values() if e["energy"] is not None), None)
    if note:
        lines.append(f"  note: {note}")
    return "\n".join(lines)
