"""Weight quantization, and the int16 overflow guard for u8 x s8 kernels on CPUs without dot-product instructions.

x86 CPUs with AVX2 but without VNNI multiply uint8 activations by int8 weights with `vpmaddubsw`, which adds
each pair of neighbouring products along the reduction axis into an int16 with saturation. When
a[2j] * w[2j] + a[2j+1] * w[2j+1] leaves [-32768, 32767] the kernel silently clips it and the integer model
stops matching its float simulation. CPUs with VNNI (and phones with dot-product instructions) accumulate in
int32 and never clip. The guard finds the output channels where a pair could clip for some uint8 input, and
fixes only those channels, choosing per channel the cheaper (in squared weight error) of:
  * rescale: a larger weight scale for that channel (fewer effective bits for it alone), or
  * trim: lower the magnitude of the offending pairs' weights by the few steps needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import numpy as np

from .numerics import qrange, quantize, scale_zero_point

INT16_MAX = 32767
INT16_MIN = -32768


@dataclass(frozen=True)
class QuantizedWeight:
    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    guarded_channels: int = 0  # channels the overflow guard changed


def quantize_weight(
    w: np.ndarray, axis: int | None, dtype: str, symmetric: bool, reduce_range: bool = False
) -> QuantizedWeight:
    """Per-channel (axis) or per-tensor weight quantization; symmetric signed weights use the narrow range
    [-127, 127], as the TFLite spec requires, so that zero point 0 and scale max|w|/127 represent +-max exactly."""
    narrow = symmetric and dtype.startswith("int")
    if axis is None:
        a, b = np.float64(w.min()), np.float64(w.max())
    else:
        axis = axis % w.ndim
        others = tuple(i for i in range(w.ndim) if i != axis)
        a, b = w.min(axis=others).astype(np.float64), w.max(axis=others).astype(np.float64)
    scale, zp = scale_zero_point(a, b, dtype, symmetric, narrow=narrow, reduce_range=reduce_range)
    q = quantize(w, scale, zp, dtype, axis=axis, narrow=narrow)
    return QuantizedWeight(q, scale, zp, axis)


def pair_extremes(q: np.ndarray, bound: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows of a (M, K) int matrix in kernel order and per-position activation bounds (M, K) in [0, 255]:
    the largest positive and most negative pair sum each pair can reach, shape (M, ceil(K/2))."""
    # int32 holds every product (|q| <= 128, bound <= 255) and pair sum exactly, at half int64's memory traffic.
    q = q.astype(np.int32)
    bound = bound.astype(np.int32)
    if q.shape[1] % 2:
        q = np.pad(q, ((0, 0), (0, 1)))
        bound = np.pad(bound, ((0, 0), (0, 1)))
    pos = np.maximum(q, 0)
    neg = q - pos
    pos *= bound
    neg *= bound
    return pos[:, 0::2] + pos[:, 1::2], neg[:, 0::2] + neg[:, 1::2]


def overflowing_rows(q: np.ndarray, bound: np.ndarray) -> np.ndarray:
    hi, lo = pair_extremes(q, bound)
    return np.flatnonzero((hi.max(axis=1) > INT16_MAX) | (lo.min(axis=1) < INT16_MIN))


def _rescale(
    w: np.ndarray, bound: np.ndarray, scale: np.ndarray, qmin: int, qmax: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the smallest larger scale (in steps of 1/512) at which no pair overflows."""
    q = np.clip(quantize(w, scale, 0, "int8", axis=0), qmin, qmax)
    hi, lo = pair_extremes(q, bound)
    factor = np.maximum(np.maximum(hi.max(axis=1) / INT16_MAX, lo.min(axis=1) / INT16_MIN), 1.0)
    s = (scale * factor).astype(np.float32)
    while True:
        q = np.clip(quantize(w, s, 0, "int8", axis=0), qmin, qmax)
        bad = overflowing_rows(q, bound)
        if not len(bad):
            return q, s
        s[bad] = (s[bad] * (1 + 1 / 512)).astype(np.float32)


def _trim(q: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """Lower |q| in every overflowing pair just enough, splitting the cut between the two weights in
    proportion to their activation bounds (which minimises the squared change)."""
    # int32 is exact here too: products of a bound (<= 255) with a weight or an excess (<= 2 * 255 * 128) fit.
    q = q.astype(np.int32)
    odd = q.shape[1] % 2
    if odd:
        q = np.pad(q, ((0, 0), (0, 1)))
        bound = np.pad(bound, ((0, 0), (0, 1)))
    q = q.copy()
    b0, b1 = bound[:, 0::2].astype(np.int32), bound[:, 1::2].astype(np.int32)
    for sign, limit in ((1, INT16_MAX), (-1, -INT16_MIN)):
        m0, m1 = np.maximum(sign * q[:, 0::2], 0), np.maximum(sign * q[:, 1::2], 0)
        excess = np.maximum(b0 * m0 + b1 * m1 - limit, 0)
        denom = np.maximum(b0 * b0 + b1 * b1, 1)
        d0 = np.minimum(m0, -(-excess * b0 // denom))
        left = np.maximum(b0 * (m0 - d0) + b1 * m1 - limit, 0)
        d1 = np.minimum(m1, -(-left // np.maximum(b1, 1)))
        left = np.maximum(b0 * (m0 - d0) + b1 * (m1 - d1) - limit, 0)
        d0 = np.minimum(m0, d0 + -(-left // np.maximum(b0, 1)))
        q[:, 0::2] -= sign * d0
        q[:, 1::2] -= sign * d1
    q = q.astype(np.int64)
    return q[:, :-1] if odd else q


def guard_overflow(
    w_rows: np.ndarray, qw: QuantizedWeight, bound_rows: np.ndarray, rows_are_channels: bool
) -> tuple[np.ndarray, np.ndarray, int]:
    """Fix overflowing rows of the (M, K) weight matrix in kernel order. Returns new int rows, new per-row
    scales (only meaningful when rows are channels) and how many rows changed."""
    q_rows = _rows(qw.q, w_rows.shape)
    scales = np.broadcast_to(np.asarray(qw.scale, np.float32), (w_rows.shape[0],)).copy() if rows_are_channels else None
    bad = overflowing_rows(q_rows, bound_rows)
    # scales is None unless rows are channels, and callers read it only then: the casts keep their types simple.
    if not len(bad):
        return q_rows, cast(np.ndarray, scales), 0
    q_rows = q_rows.copy()
    s = scales[bad] if scales is not None else np.full(len(bad), np.asarray(qw.scale).reshape(-1)[0], np.float32)
    trimmed = _trim(q_rows[bad], bound_rows[bad])
    err_trim = np.sum((trimmed * s[:, None].astype(np.float64) - w_rows[bad]) ** 2, axis=1)
    chosen = trimmed
    if rows_are_channels:
        qmin, qmax = qrange("int8", narrow=True)
        rescaled, s2 = _rescale(w_rows[bad], bound_rows[bad], s, qmin, qmax)
        err_rescale = np.sum((rescaled * s2[:, None].astype(np.float64) - w_rows[bad]) ** 2, axis=1)
        better = err_rescale < err_trim
        chosen = np.where(better[:, None], rescaled, trimmed)
        assert scales is not None
        scales[bad] = np.where(better, s2, s)
    q_rows[bad] = chosen
    return q_rows, cast(np.ndarray, scales), len(bad)


def cheaper_of(
    w: np.ndarray, trimmed: np.ndarray, scale: np.float32, bound: np.ndarray
) -> tuple[np.ndarray, np.float32]:
    """With one scale per direction the guard can only trim the overflowing pairs, which cuts the largest
    weights of a gate row (on the keyword-spotting example's LSTM: logits 10% off float, 3% with this).
    Raising that one scale until no pair overflows (about 7-bit weights) can cost less; keep whichever is
    closer to w."""
    s = np.float32(scale)
    hi, lo = pair_extremes(quantize(w, s, 0, "int8", narrow=True), bound)
    s = np.float32(s * max(hi.max() / INT16_MAX, lo.min() / INT16_MIN, 1.0))
    while True:
        q = quantize(w, s, 0, "int8", narrow=True)
        if not len(overflowing_rows(q, bound)):
            break
        s = np.float32(s * (1 + 1 / 512))
    err = lambda q_, s_: float(np.sum((q_.astype(np.float64) * s_ - w) ** 2))  # noqa: E731
    return (q, s) if err(q, s) < err(trimmed, scale) else (trimmed, np.float32(scale))


def _rows(q: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    return q.reshape(shape) if q.shape == shape else q


# --- kernel order: how each op's weight is laid out along the reduction axis inside ONNX Runtime ---


def conv_rows(w: np.ndarray, group: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(M, K) rows of a Conv weight (M, C/g, k...) in (k..., c) order as the NHWC integer conv reduces over it,
    with each position's input channel. None for depthwise convs, which accumulate in int32 directly."""
    m, cg = w.shape[0], w.shape[1]
    if cg == 1 and group > 1:
        return None
    rows = np.moveaxis(w, 1, -1).reshape(m, -1)
    per_group = m // group
    base = (np.arange(m) // per_group) * cg
    channels = base[:, None] + np.tile(np.arange(cg), rows.shape[1] // cg)[None, :]
    return rows, channels


def conv_unrows(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    m, cg = shape[0], shape[1]
    return np.moveaxis(rows.reshape(m, *shape[2:], cg), -1, 1)


def matmul_rows(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(N, K) rows of a (K, N) weight (axis 1) or (N, K) weight (axis 0), with each position's input feature."""
    rows = w.T if axis in (None, 1) else w
    return rows, np.broadcast_to(np.arange(rows.shape[1]), rows.shape)


@dataclass(frozen=True)
class BlockQuantizedRows:
    """int4 rows (N, K) quantized in blocks along K: codes (N, n_blocks, block) in [0, 15] (symmetric: q + 8),
    scales (N, n_blocks), zero points (N, n_blocks) (8 for symmetric)."""

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    k: int

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, as ONNX Runtime's MatMulNBits computes (code - zero point) * scale."""
        x = (self.codes.astype(np.float32) - self.zero_point[..., None].astype(np.float32)) * self.scale[..., None]
        return x.reshape(x.shape[0], -1)[:, : self.k]


def quantize_blocks(rows: np.ndarray, block: int, symmetric: bool) -> BlockQuantizedRows:
    """Round-to-nearest int4 blocks of `block` values along each row's last axis (zero-padded to a whole block).
    Symmetric uses [-7, 7] around zero point 8 so +-max is exact; affine uses [0, 15] with a per-block zero point."""
    n, k = rows.shape
    nb = -(-k // block)
    x = np.zeros((n, nb * block), np.float32)
    x[:, :k] = rows
    x = x.reshape(n, nb, block).astype(np.float64)
    if symmetric:
        scale = np.abs(x).max(axis=2) / 7.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        q = np.clip(np.rint(x / scale[..., None].astype(np.float64)), -7, 7) + 8
        zp = np.full(scale.shape, 8, np.uint8)
    else:
        lo, hi = np.minimum(x.min(axis=2), 0.0), np.maximum(x.max(axis=2), 0.0)
        scale = (hi - lo) / 15.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale.astype(np.float64)), 0, 15).astype(np.uint8)
        q = np.clip(np.rint(x / scale[..., None].astype(np.float64)) + zp[..., None], 0, 15)
    return BlockQuantizedRows(q.astype(np.uint8), scale, zp, k)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """Pairs along the last axis into one byte, first value in the low nibble (padding the axis to even)."""
    c = codes.astype(np.uint8)
    if c.shape[-1] % 2:
        c = np.concatenate([c, np.zeros(c.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)
