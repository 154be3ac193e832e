"""The MSE range search counts the values outside each candidate range with running sums: the same numbers as
the matrix definition it replaced, bit for bit (they are sums of whole counts), so the same ranges."""

from __future__ import annotations

import numpy as np
import pytest

from lowbit.observe import Histogram, mse
from lowbit.observe.ranges import _squared_errors


def _by_matrix(centers, counts, lows, highs, num_levels):  # the definition before running sums
    clip_low = (np.maximum(lows[:, None] - centers, 0.0) ** 2) @ counts
    clip_high = (np.maximum(centers - highs[:, None], 0.0) ** 2) @ counts
    below = (centers < lows[:, None]) @ counts
    above = (centers > highs[:, None]) @ counts
    step = (np.maximum(highs, 0.0)[None, :] - np.minimum(lows, 0.0)[:, None]) / (num_levels - 1)
    inside = counts.sum() - below[:, None] - above[None, :]
    return clip_low[:, None] + clip_high[None, :] + inside * step**2 / 12.0


@pytest.mark.parametrize("seed", range(6))
def test_running_sums_count_what_the_matrices_counted(seed: int) -> None:
    rng = np.random.default_rng(seed)
    data = [rng.standard_normal(5000), rng.exponential(1.0, 5000), -rng.exponential(2.0, 300)][seed % 3]
    data = data.astype(np.float32) * 10.0 ** rng.integers(-3, 3)
    h = Histogram()
    h.update(data)
    centers = np.clip(h.centers(), h.min, h.max)  # as mse() passes them: clipped ends repeat
    counts = h.counts.astype(np.float64)
    fractions = np.linspace(0.01, 1.0, 100)
    # Candidate ends on and between centers, past both extremes, and at 0.
    lows = np.concatenate([h.min * fractions, centers[:7], [0.0, h.min, h.min - 1.0]])
    highs = np.concatenate([h.max * fractions, centers[-7:], [0.0, h.max, h.max + 1.0]])
    got = _squared_errors(centers, counts, lows, highs, 256)
    assert np.array_equal(got, _by_matrix(centers, counts, lows, highs, 256))


def test_mse_ranges_are_unchanged_on_a_skewed_tensor() -> None:
    rng = np.random.default_rng(7)
    h = Histogram()
    h.update(np.concatenate([rng.standard_normal(20000), [40.0, -3.0]]).astype(np.float32))
    lo, hi = mse(h)
    assert h.min <= lo < 0.0 < hi < h.max  # the lone outlier at 40 is clipped, the bulk is kept
