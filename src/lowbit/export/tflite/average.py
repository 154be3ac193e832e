"""The weights of the FULLY_CONNECTED that sums an int8 GlobalAveragePool (`layers._global_average_as_sum`): chosen so
that XNNPACK's float32 requantization gives ONNX Runtime's QLinearGlobalAveragePool integers."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def _sum_weight_scale(si: np.float32, so: np.float32, n: int) -> np.float32 | None:
    """A float32 weight scale sw near 1/n with which XNNPACK's requantization scale, (si * sw) / so in float32,
    equals ONNX Runtime's QLinearGlobalAveragePool scale, si / so / n in float32; None if none is within 64 ulps."""
    f32 = np.float32
    target = f32(f32(si / so) / f32(n))
    for sw in _near(f32(1.0 / n), 64):
        if f32(f32(si * sw) / so) == target:
            return sw
    return None


def _near(start: np.float32, ulps: int) -> Iterator[np.float32]:
    """float32 values nearest `start`, one ulp further each time, alternating up and down."""
    bits = int(np.array(start, np.float32).view(np.int32))
    for step in range(ulps):
        for b in (bits + step, bits - step) if step else (bits,):
            yield np.float32(np.array(b, np.int32).view(np.float32)[()])


def _sum_weights(si: np.float32, so: np.float32, n: int, zi: int, zo: int) -> tuple[int, np.float32] | None:
    """All-k weights and their scale sw for the summing FULLY_CONNECTED: XNNPACK computes rne(float(k * acc) *
    float32(si * sw / so)) + zo, ONNX Runtime rne(float(acc) * float32(si / so / n)) + zo. k = 1 with the same
    scale where one exists; else the first k <= 127 and sw whose integers equal ONNX Runtime's for every sum n
    int8 values can make (5 of MobileNetV3-Large's 8 averages have no k = 1 scale: they exported as MEAN, which
    rounds twice, and 6 of 30,720 squeeze-excite averages on 256 crops came out a step apart). None if none does."""
    f32 = np.float32
    sw = _sum_weight_scale(si, so, n)
    if sw is not None:
        return 1, sw
    target = f32(f32(si / so) / f32(n))
    acc = np.arange(n * (-128 - zi), n * (127 - zi) + 1, dtype=np.int64)
    want = np.clip(np.rint(acc.astype(f32) * target) + zo, -128, 127)
    checked = 0
    for k in range(2, 128):
        wide = (acc * k).astype(f32)
        for sw in _near(f32(1.0 / (n * k)), 16):
            scale = f32(f32(si * sw) / so)
            if abs(float(scale) * k / float(target) - 1) > 2.0**-22:
                continue
            checked += 1
            if np.array_equal(np.clip(np.rint(wide * scale) + zo, -128, 127), want):
                return k, sw
            if checked >= 400:  # a few seconds at most
                return None
    return None
