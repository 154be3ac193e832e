"""How LiteRT (XNNPACK) and ONNX Runtime requantize an int8/uint8 ADD: the two integer rules, emulated exactly.

The exported .tflite and lowbit's QDQ model compute the same ADD, y = zc + (sa (a - za) + sb (b - zb)) / sc, but
round it differently (measured on EfficientNet-Lite0, docs/tflite.md): ONNX Runtime's QLinearAdd (MLAS) scales in
float32 and rounds half to even; XNNPACK's quantized add turns the two scale ratios into integers with 21
significant bits and shifts right with rounding half up. The results differ by one step where the exact value
sits within about 1e-4 of a half step. Conv, depthwise conv and fully-connected in XNNPACK scale the int32
accumulator in float32 and round half to even, as ONNX Runtime does, so they agree exactly.
"""

from __future__ import annotations

import numpy as np

Params = tuple[float, int]  # (scale, zero point) of one tensor


def ort_add(a: np.ndarray, b: np.ndarray, pa: Params, pb: Params, pc: Params, lo: int, hi: int) -> np.ndarray:
    """ONNX Runtime's QLinearAdd (MLAS): float32 ratios, y = ra*a + (rb*b + k), rounded half to even, clamped.
    ORT's vector kernels order the float operations differently, so a few values within ~1e-5 of a half step
    come out one step apart from this emulation."""
    (sa, za), (sb, zb), (sc, zc) = pa, pb, pc
    ra, rb = np.float32(np.float32(sa) / np.float32(sc)), np.float32(np.float32(sb) / np.float32(sc))
    k = np.float32(np.float32(zc) - ra * np.float32(za) - rb * np.float32(zb))
    y = np.rint(ra * a.astype(np.float32) + (rb * b.astype(np.float32) + k))
    return np.clip(y, lo, hi).astype(np.int64)


def xnnpack_add(a: np.ndarray, b: np.ndarray, pa: Params, pb: Params, pc: Params, lo: int, hi: int) -> np.ndarray:
    """XNNPACK's quantized add: the larger ratio scaled into [2**20, 2**21) sets the shift, both ratios rounded to
    integers at that shift, then (acc + 2**(shift-1)) >> shift (an arithmetic shift: ties round up)."""
    (sa, za), (sb, zb), (sc, zc) = pa, pb, pc
    ra, rb = np.float32(np.float32(sa) / np.float32(sc)), np.float32(np.float32(sb) / np.float32(sc))
    shift = 21 - int(np.frexp(max(ra, rb))[1])  # 20 minus the larger ratio's binary exponent
    am, bm = int(np.rint(np.ldexp(ra, shift))), int(np.rint(np.ldexp(rb, shift)))
    acc = (1 << (shift - 1)) - am * za - bm * zb + a.astype(np.int64) * am + b.astype(np.int64) * bm
    return np.clip((acc >> shift) + zc, lo, hi).astype(np.int64)


def exact_add(a: np.ndarray, b: np.ndarray, pa: Params, pb: Params, pc: Params) -> np.ndarray:
    """The real-valued result before rounding (float64), to see how close to a half step a disagreement is."""
    (sa, za), (sb, zb), (sc, zc) = pa, pb, pc
    return (float(sa) * (a - za) + float(sb) * (b - zb)) / float(sc) + zc
