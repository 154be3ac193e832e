"""What an AVX2 CPU without VNNI computes for a u8 x s8 matrix product (vpmaddubsw + vpmaddwd).

`vpmaddubsw` adds each neighbouring pair of u8 x s8 products along the reduction axis into an int16 with
saturation; `vpmaddwd` then widens to int32 exactly. Used to check the overflow guard on any machine, since
this one may well have VNNI, whose `vpdpbusd` accumulates in int32 and never saturates.
"""

from __future__ import annotations

import numpy as np


def u8s8_matmul_avx2(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    """a: (N, K) uint8, w: (M, K) int8 in kernel order -> (N, M) int32 as the AVX2 kernel accumulates it."""
    a = a.astype(np.int32)
    w = w.astype(np.int32)
    if a.shape[1] % 2:
        a = np.pad(a, ((0, 0), (0, 1)))
        w = np.pad(w, ((0, 0), (0, 1)))
    pairs = a[:, None, 0::2] * w[None, :, 0::2] + a[:, None, 1::2] * w[None, :, 1::2]
    return np.clip(pairs, -32768, 32767).sum(axis=2).astype(np.int32)


def u8s8_matmul_exact(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return (a.astype(np.int64) @ w.astype(np.int64).T).astype(np.int32)


def im2col_nhwc(
    x: np.ndarray, kh: int, kw: int, pads: tuple[int, int, int, int] = (0, 0, 0, 0), pad_value: int = 0
) -> np.ndarray:
    """(N, C, H, W) -> rows of (kh, kw, C) patches, the reduction order of the NHWC integer convolution
    (stride 1, no dilation, one group)."""
    n, c, h, w = x.shape
    t, left, b, r = pads
    xp = np.pad(x, ((0, 0), (0, 0), (t, b), (left, r)), constant_values=pad_value)
    oh, ow = h + t + b - kh + 1, w + left + r - kw + 1
    cols = np.empty((n, oh, ow, kh, kw, c), x.dtype)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, :, i, j, :] = xp[:, :, i : i + oh, j : j + ow].transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, kh * kw * c)
