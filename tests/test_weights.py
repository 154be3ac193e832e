"""The overflow guard: after it, an AVX2 (no VNNI) u8 x s8 kernel computes exactly the int32 result."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lowbit.runtimes.avx2 import im2col_nhwc, u8s8_matmul_avx2, u8s8_matmul_exact
from lowbit.weights import (
    conv_rows,
    conv_unrows,
    guard_overflow,
    matmul_rows,
    overflowing_rows,
    quantize_weight,
)


def test_emulator_saturates_like_vpmaddubsw() -> None:
    a = np.array([[255, 255, 1, 1]], np.uint8)
    w = np.array([[127, 127, 5, -5]], np.int8)
    assert u8s8_matmul_avx2(a, w)[0, 0] == 32767 + 0
    assert u8s8_matmul_exact(a, w)[0, 0] == 255 * 254


def test_guard_makes_gemm_exact_on_avx2() -> None:
    rng = np.random.default_rng(0)
    k, m = 64, 32
    w = rng.normal(0, 1, (k, m)).astype(np.float32)  # (K, N) MatMul weight
    qw = quantize_weight(w, 1, "int8", True)
    rows, feats = matmul_rows(w, 1)
    q_rows = matmul_rows(qw.q, 1)[0]
    bound = np.full(rows.shape, 255)
    assert len(overflowing_rows(q_rows, bound)) > 0  # the case exists without the guard
    a = rng.integers(0, 256, (200, k)).astype(np.uint8)
    a[:, :] = np.where(rng.random((200, k)) < 0.5, 255, a)
    assert not np.array_equal(u8s8_matmul_avx2(a, q_rows), u8s8_matmul_exact(a, q_rows))
    new_rows, scales, changed = guard_overflow(rows, replace(qw, q=q_rows), bound, True)
    assert changed == len(overflowing_rows(q_rows, bound))
    np.testing.assert_array_equal(u8s8_matmul_avx2(a, new_rows), u8s8_matmul_exact(a, new_rows))
    # Only the rows that could overflow change, and they stay close to the weights.
    untouched = np.setdiff1d(np.arange(m), np.flatnonzero((new_rows != q_rows).any(axis=1)))
    assert len(untouched) >= m - changed
    err_new = np.abs(new_rows * scales[:, None] - rows).max()
    assert err_new < 0.1 * np.abs(rows).max()


def test_guard_respects_activation_bounds() -> None:
    """Channels whose activations stay small need no change."""
    rng = np.random.default_rng(1)
    w = rng.normal(0, 1, (16, 8, 3, 3)).astype(np.float32)
    qw = quantize_weight(w, 0, "int8", True)
    rows, chans = conv_rows(w, 1)
    q_rows = conv_rows(qw.q, 1)[0]
    small = np.full(8, 60)[chans]  # 60 * 127 * 2 < 32767
    assert len(overflowing_rows(q_rows, small)) == 0
    big = np.full(8, 255)[chans]
    assert len(overflowing_rows(q_rows, big)) > 0


def test_guard_on_conv_in_kernel_order() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (12, 6, 3, 3)).astype(np.float32)
    qw = quantize_weight(w, 0, "int8", True)
    rows, chans = conv_rows(w, 1)
    q_rows = conv_rows(qw.q, 1)[0]
    np.testing.assert_array_equal(conv_unrows(q_rows, w.shape), qw.q)
    x = rng.integers(200, 256, (2, 6, 5, 5)).astype(np.uint8)
    cols = im2col_nhwc(x, 3, 3)
    assert not np.array_equal(u8s8_matmul_avx2(cols, q_rows), u8s8_matmul_exact(cols, q_rows))
    bound = np.full(6, 255)[chans]
    new_rows, _, changed = guard_overflow(rows, replace(qw, q=q_rows), bound, True)
    assert changed > 0
    np.testing.assert_array_equal(u8s8_matmul_avx2(cols, new_rows), u8s8_matmul_exact(cols, new_rows))


def test_depthwise_conv_is_not_guarded() -> None:
    w = np.ones((8, 1, 3, 3), np.float32)
    assert conv_rows(w, 8) is None
