"""Subnormal float weights (0 < |w| < float32's smallest normal, 1.2e-38): arithmetic on them can take a slow
path (a microcode assist) on x86 unless the process flushes them, so a float op reading a tensor full of them can run
many times slower than its twin with zeros there (brainmaze-eeg modelB: ~10x, see REPORT_FRACTION).
Quantized weights round them to zero anyway; weights left float keep them. `find_subnormals` reports them,
`flush_subnormals` sets them to zero (they are below 1.2e-38, so outputs move by far less than float32 resolves).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

# A tensor is reported when at least this share of its nonzero values is subnormal. How much they cost depends on
# the kernel and the CPU: here (AMD EPYC, ONNX Runtime 1.32, one thread) modelB ran 1.97 ms float vs 0.20 ms with its
# subnormals flushed (24% of conv2.weight, 29% of an LSTM weight), while a plain MatMul or LSTM with 20% subnormal
# weights ran no slower. 1% is a share worth a look, and flushing costs nothing measurable in outputs.
REPORT_FRACTION = 0.01


@dataclass(frozen=True)
class Subnormals:
    """One float weight holding subnormal values: its name, how many and what share of its nonzero values."""

    name: str
    count: int
    fraction: float


def _tiny(v: ir.Value) -> float | None:
    """The smallest normal value of a float32/float64 initializer's dtype, or None for other tensors. Float16 is
    left alone: CPUs compute it in float32, where its subnormals are normal numbers."""
    if v.const_value is None or v.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return None
    return float(np.finfo(v.dtype.numpy()).tiny)


def _mask(arr: np.ndarray, tiny: float) -> np.ndarray:
    a = np.abs(arr)
    return (a > 0) & (a < tiny)


def find_subnormals(
    model: ir.Model, among: set[str] | None = None, min_fraction: float = REPORT_FRACTION
) -> list[Subnormals]:
    """Float initializers (of the names in `among`, if given) whose nonzero values are at least `min_fraction`
    subnormal, in name order."""
    found = []
    for name, v in sorted(model.graph.initializers.items()):
        tiny = _tiny(v)
        if tiny is None or (among is not None and name not in among):
            continue
        assert v.const_value is not None
        arr = v.const_value.numpy()
        count = int(_mask(arr, tiny).sum())
        nonzero = int(np.count_nonzero(arr))
        if count and count / nonzero >= min_fraction:
            found.append(Subnormals(name, count, count / nonzero))
    return found


def flush_subnormals(model: ir.Model) -> bool:
    """Set every subnormal value of every float initializer to zero (keeping its sign bit); whether any was."""
    changed = False
    for name, v in model.graph.initializers.items():
        tiny = _tiny(v)
        if tiny is None:
            continue
        assert v.const_value is not None
        arr = v.const_value.numpy()
        mask = _mask(arr, tiny)
        if mask.any():
            flushed = np.where(mask, np.copysign(np.zeros((), arr.dtype), arr), arr).astype(arr.dtype)
            v.const_value = ir.tensor(flushed, name=name)
            changed = True
    return changed


def subnormal_warning(found: list[Subnormals]) -> str | None:
    """The sentence for weights still float that hold subnormals, naming the fix; None when there are none."""
    if not found:
        return None
    shown = ", ".join(f"'{s.name}' ({s.fraction:.1%} of nonzero values)" for s in found[:5])
    more = f" and {len(found) - 5} more" if len(found) > 5 else ""
    return (
        f"{len(found)} weight(s) left float hold subnormal values (below 1.2e-38 in float32): {shown}{more}; "
        "float math on them is many times slower on CPUs (in the float model too): pass --flush-subnormals "
        "(flush_subnormals=True) to set them to zero"
    )
