"""Quantization arithmetic, matching ONNX QuantizeLinear/DequantizeLinear and the TFLite quantization spec.

q = clamp(round_half_to_even(x / s) + z, qmin, qmax)        x' = (q - z) * s
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from .errors import LowbitError


@dataclass(frozen=True)
class QType:
    name: str
    qmin: int
    qmax: int
    np_dtype: type
    onnx_dtype: int

    @property
    def signed(self) -> bool:
        return self.qmin < 0


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType("int8", -128, 127, np.int8, onnx.TensorProto.INT8),
        QType("uint8", 0, 255, np.uint8, onnx.TensorProto.UINT8),
        QType("int16", -32768, 32767, np.int16, onnx.TensorProto.INT16),
        QType("uint16", 0, 65535, np.uint16, onnx.TensorProto.UINT16),
        # int4 values live in int8 arrays until packed; ONNX stores them two per byte.
        QType("int4", -8, 7, np.int8, onnx.TensorProto.INT4),
        QType("uint4", 0, 15, np.uint8, onnx.TensorProto.UINT4),
        QType("int32", -(2**31), 2**31 - 1, np.int32, onnx.TensorProto.INT32),
    )
}


def qtype(name: str) -> QType:
    try:
        return QTYPES[name]
    except KeyError:
        raise LowbitError(f"unknown quantized type '{name}' (valid: {', '.join(QTYPES)})") from None


def qrange(dtype: str, narrow: bool = False, reduce_range: bool = False) -> tuple[int, int]:
    """Integer range of `dtype`. narrow drops the most negative value of signed types (symmetric range,
    as TFLite int8 weights use); reduce_range keeps one bit fewer (7-bit weights for CPUs without VNNI)."""
    t = qtype(dtype)
    qmin, qmax = t.qmin, t.qmax
    if reduce_range:
        bits = int(np.log2(qmax - qmin + 1)) - 1
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if t.signed else (0, 2**bits - 1)
    if narrow:
        if not t.signed:
            raise LowbitError(f"narrow range applies to signed types only, not '{dtype}'")
        qmin += 1
    return qmin, qmax


def scale_zero_point(
    a: np.ndarray | float,
    b: np.ndarray | float,
    dtype: str,
    symmetric: bool,
    narrow: bool = False,
    reduce_range: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (of `dtype`) for observed ranges [a, b], elementwise (per channel if arrays)."""
    qmin, qmax = qrange(dtype, narrow, reduce_range)
    a = np.minimum(np.asarray(a, np.float64), 0.0)
    b = np.maximum(np.asarray(b, np.float64), 0.0)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        raise LowbitError("cannot quantize a range that is NaN or infinite; check the calibration data")
    if symmetric:
        scale = np.maximum(np.abs(a), np.abs(b)) / ((qmax - qmin) / 2.0)
    else:
        scale = (b - a) / (qmax - qmin)
    # An all-zero tensor has no range; any positive scale represents it exactly.
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    scale = np.maximum(scale, np.float32(np.finfo(np.float32).tiny))
    if symmetric:
        zp = np.full(scale.shape, 0 if qtype(dtype).signed else (qmin + qmax + 1) // 2, np.int64)
    else:
        zp = np.clip(qmin - np.rint(a / scale.astype(np.float64)), qmin, qmax).astype(np.int64)
    return scale, zp.astype(qtype(dtype).np_dtype)


def _broadcast(p: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    p = np.asarray(p)
    if axis is None or p.ndim == 0:
        return p
    shape = [1] * ndim
    shape[axis] = p.size
    return p.reshape(shape)


def quantize(
    x: np.ndarray,
    scale: np.ndarray | float | np.floating[Any],
    zero_point: np.ndarray | int,
    dtype: str,
    axis: int | None = None,
    narrow: bool = False,
) -> np.ndarray:
    """ONNX QuantizeLinear: float32 division, round half to even, saturate."""
    qmin, qmax = qrange(dtype, narrow)
    x = np.asarray(x, np.float32)
    s = _broadcast(np.asarray(scale, np.float32), x.ndim, axis)
    z = _broadcast(np.asarray(zero_point).astype(np.int64), x.ndim, axis)
    q = np.rint(x / s).astype(np.float64) + z
    out: np.ndarray = np.clip(q, qmin, qmax).astype(qtype(dtype).np_dtype)
    return out


def dequantize(
    q: np.ndarray, scale: np.ndarray | float, zero_point: np.ndarray | int, axis: int | None = None
) -> np.ndarray:
    """ONNX DequantizeLinear: (q - z) * s in float32."""
    q = np.asarray(q)
    s = _broadcast(np.asarray(scale, np.float32), q.ndim, axis)
    z = _broadcast(np.asarray(zero_point).astype(np.int32), q.ndim, axis)
    out: np.ndarray = ((q.astype(np.int32) - z).astype(np.float32) * s).astype(np.float32)
    return out


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Two 4-bit values per byte, first element in the low nibble (ONNX INT4/UINT4 layout)."""
    flat = np.asarray(q).astype(np.int64).ravel() & 0xF
    if flat.size % 2:
        flat = np.append(flat, 0)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray, count: int, signed: bool = True) -> np.ndarray:
    p = np.asarray(packed, np.uint8).astype(np.int64)
    flat = np.stack([p & 0xF, p >> 4], axis=1).ravel()[:count]
    if signed:
        flat = np.where(flat > 7, flat - 16, flat)
    return flat.astype(np.int8 if signed else np.uint8)


def fixed_point_multiplier(m: float) -> tuple[int, int]:
    """Represent a positive real multiplier as int32 `m0` and `shift` with m ~= m0 * 2**(shift - 31),
    m0 in [2**30, 2**31), as integer-only kernels (TFLite, gemmlowp) store requantization scales."""
    if not m > 0:
        if m == 0:
            return 0, 0
        raise LowbitError(f"requantization multiplier must be positive, got {m}")
    frac, shift = np.frexp(np.float64(m))
    m0 = int(np.floor(frac * 2**31 + 0.5))  # TFLite rounds ties away from zero (std::round); exact in float64
    if m0 == 2**31:
        m0 //= 2
        shift += 1
    if shift < -31:  # below 2**-32 no int32 accumulator rounds to nonzero; TFLite stores 0 (and shifts stay < 64)
        return 0, 0
    return m0, int(shift)


def requantize(acc: np.ndarray, m0: int, shift: int, zero_point: int, qmin: int, qmax: int) -> np.ndarray:
    """Integer-only requantization of int32 accumulators, as TFLite's MultiplyByQuantizedMultiplier:
    saturating rounding doubling high multiply, then rounding right shift (ties away from zero)."""
    acc = np.asarray(acc, np.int64)
    left = max(shift, 0)
    right = max(-shift, 0)
    x = acc * (1 << left)
    # SaturatingRoundingDoublingHighMul: (x * m0 + nudge) / 2**31 rounded toward zero, nudge by sign.
    prod = x * np.int64(m0)
    nudge = np.where(prod >= 0, 1 << 30, 1 - (1 << 30))
    high = prod + nudge
    high = np.where(high >= 0, high >> 31, -((-high) >> 31))
    if right:
        mask = (1 << right) - 1
        remainder = high & mask
        threshold = (mask >> 1) + (high < 0)
        high = (high >> right) + (remainder > threshold)
    return np.clip(high + zero_point, qmin, qmax)
