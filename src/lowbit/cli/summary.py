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
    lines.append(f"time: {seconds:.1f} s, calibrated on {plan.calibration_samples} samples")
    if check:
        lines.append(
            f"check on {check['samples']} calibration samples: top-1 agreement with float "
            f"{check['kernels']['top1_agreement']:.1%} (integer kernels) / {check['simulate']['top1_agreement']:.1%} "
            f"(float simulation); kernels vs simulation {check['kernels_vs_simulation']['top1_agreement']:.1%}, "
            f"cosine {check['kernels_vs_simulation']['cosine']:.4f}"
        )
        lines.append(f"  {check['cpu_note']}")
        if check.get("kernel_gap"):  # set when kernels vs simulation cosine < 0.999 (quantize_cmd.py)
            from ..evaluate.kernel_gap import gap_text

            lines.append(f"  {gap_text(check['kernel_gap'])}")
    return "\n".join(lines)


def lint_text(findings: list[dict]) -> str:
    """The "performance lint:" section: one line per finding of `lowbit.evaluate.lint.lint`."""
    if not findings:
        return "performance lint: nothing found"
    lines = ["performance lint:"]
    lines += [f"  {f['kind']}: {f['message']}; fix: {f['fix']}" for f in findings]
    return "\n".join(lines)
