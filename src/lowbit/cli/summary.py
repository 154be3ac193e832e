"""The table `lowbit quantize` prints at the end."""

from __future__ import annotations

from collections import Counter, defaultdict

from ..plan import Plan


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def summary_text(plan: Plan, float_bytes: int, quant_bytes: int, seconds: float, check: dict | None) -> str:
    quantized = Counter(e.op_type for e in plan.nodes.values() if e.quantized)
    skipped: dict[str, list[str]] = defaultdict(list)
    for name, e in plan.nodes.items():
        if not e.quantized:
            skipped[e.reason].append(name)
    lines = [f"quantized {sum(quantized.values())} of {len(plan.nodes)} nodes:"]
    lines += [f"  {op:<20} {n:>4}" for op, n in sorted(quantized.items(), key=lambda kv: (-kv[1], kv[0]))]
    if skipped:
        lines.append(f"left in float: {sum(len(v) for v in skipped.values())} nodes")
        for reason, names in sorted(skipped.items(), key=lambda kv: -len(kv[1])):
            shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
            lines.append(f"  {reason}: {shown}")
    guard = sum(plan.overflow_guard.values())
    if guard:
        lines.append(
            f"overflow guard: {guard} weight channels in {len(plan.overflow_guard)} layers adjusted so u8 x s8 "
            "pair sums fit int16 (AVX2 without VNNI)"
        )
    ratio = quant_bytes / float_bytes if float_bytes else 0.0
    lines.append(f"size: {_mb(float_bytes)} -> {_mb(quant_bytes)} ({ratio:.0%} of float)")
    lstms = [name for name, e in plan.nodes.items() if e.op_type == "LSTM" and not e.quantized]
    if lstms and (plan.recipe.get("default") or {}).get("mode") == "static":
        # Static int8 has no LSTM form: a recurrent model stays near its float size (madmom's BLSTM: 102%), where
        # dynamic mode's DynamicQuantizeLSTM stores the gates' weights int8 (30%, 0.87x float latency).
        lines.append(
            f"  {len(lstms)} LSTM node{'s' if len(lstms) > 1 else ''} kept {'their' if len(lstms) > 1 else 'its'} "
            "float weights (static int8 has no LSTM form): --mode dynamic stores them int8 (DynamicQuantizeLSTM)"
        )
    lines.append(f"time: {seconds:.1f} s, calibrated on {plan.calibration_samples} samples")
    if check:
        lines += check_lines(check)
        if check.get("kernel_gap"):  # set when kernels vs simulation cosine < 0.999 (quantize_cmd.py)
            from ..evaluate.kernel_gap import gap_text

            lines.append(f"  {gap_text(check['kernel_gap'])}")
    return "\n".join(lines)


def check_lines(check: dict) -> list[str]:
    """The quantize check, one line per output with the metric that fits it (outputs.py), then a warning per
    output whose integer-kernel fidelity is poor."""
    from ..evaluate.outputs import format_value, poor_text

    outs = check["outputs"]
    n, sim = check["samples"], check.get("simulate_samples", check["samples"])
    # The simulation stops early once its first samples settle that the kernels match it (evaluate/check.py).
    how = f"float simulation on the first {sim}, enough to show the kernels match it" if sim < n else "float simulation"
    lines = [f"check on {n} calibration samples, against float (integer kernels / {how}):"]
    for o in outs:
        k, s, kvs = o["kernels"], o["simulate"], o["kernels_vs_simulation"]
        metric, label = k["task"]["metric"], k["task"]["label"]
        lines.append(
            f"  {o['name']} ({o['kind']}): {label} {format_value(metric, k['task']['value'])} / "
            f"{format_value(metric, s['task']['value'])}; kernels vs simulation "
            f"{format_value(metric, kvs['task']['value'])}, cosine {kvs['cosine']:.4f}"
        )
    lines.append(f"  {check['cpu_note']}")
    lines += [w for o in outs if (w := poor_text(o["name"], o["kernels"], " with integer kernels")) is not None]
    return lines


def lint_text(findings: list[dict]) -> str:
    """The "performance lint:" section: one line per finding of `lowbit.evaluate.lint.lint`."""
    if not findings:
        return "performance lint: nothing found"
    lines = ["performance lint:"]
    lines += [f"  {f['kind']}: {f['message']}; fix: {f['fix']}" for f in findings]
    return "\n".join(lines)
