"""Choose a quantization range (a, b) from a Histogram.

Every method returns floats with a <= b. The range need not contain 0: the caller widens it.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import numpy as np

from lowbit.errors import LowbitError
from lowbit.observe.histogram import Histogram

# Probability given to a bin the quantized distribution leaves empty, so KL stays finite (as MXNet does).
KL_EPSILON = 1e-4
# Thresholds evaluated at once in entropy(); bounds the size of the temporary matrices.
KL_CHUNK = 512


def _require(h: Histogram) -> None:
    if not isinstance(h, Histogram):
        raise LowbitError(f"expected a Histogram, got {type(h).__name__}")
    if h.count == 0:
        raise LowbitError("histogram is empty: call update() with calibration data first")


def _check_levels(num_levels: int) -> None:
    if isinstance(num_levels, bool) or not isinstance(num_levels, (int, np.integer)) or num_levels < 2:
        raise LowbitError(f"num_levels must be an integer >= 2, got {num_levels!r}")


def minmax(h: Histogram) -> tuple[float, float]:
    """The exact smallest and largest value seen."""
    _require(h)
    return float(h.min), float(h.max)


def percentile(h: Histogram, p: float = 99.99) -> tuple[float, float]:
    """Cut (100 - p)% of the values off each tail, interpolating linearly inside a bin."""
    _require(h)
    if not 50.0 <= p <= 100.0:
        raise LowbitError(f"percentile p must be in [50, 100], got {p!r}")
    edges = h.edges()
    # No value lies outside [min, max], so interpolating towards the true extremes is more accurate.
    edges[0], edges[-1] = h.min, h.max
    cum = np.cumsum(h.counts)
    total = cum[-1]

    def value_at(q: float) -> float:
        target = q * total
        k = min(int(np.searchsorted(cum, target, side="left")), len(cum) - 1)
        before = cum[k - 1] if k > 0 else 0
        inside = (target - before) / h.counts[k] if h.counts[k] else 0.0
        return float(edges[k] + min(max(inside, 0.0), 1.0) * (edges[k + 1] - edges[k]))

    a = min(max(value_at(1.0 - p / 100.0), h.min), h.max)
    b = min(max(value_at(p / 100.0), a), h.max)
    return a, b


def _folded(h: Histogram) -> tuple[np.ndarray, float]:
    """Counts of |x| in bins [j*w, (j+1)*w) starting at 0, at most max_bins of them, and w."""
    idx = h.i0 + np.arange(len(h.counts), dtype=np.int64)
    # Negative bin i covers (|i|-1)*w .. |i|*w in magnitude, so it folds exactly onto bin |i|-1.
    folded = np.where(idx >= 0, idx, -idx - 1)
    # Data far from 0 gives a long, mostly empty folded histogram; pair-adding keeps it bounded.
    shift = 0
    while (int(folded.max()) >> shift) + 1 > h.max_bins:
        shift += 1
    counts = np.bincount(folded >> shift, weights=h.counts.astype(np.float64))
    assert h.e is not None  # the caller checked that h has data
    return counts, math.ldexp(1.0, h.e + shift)


def _kl_per_threshold(c: np.ndarray, levels: int) -> np.ndarray:
    """KL(P || Q) for every threshold of levels .. len(c) bins, TensorRT style.

    P: bins below the threshold with all mass above it added to the last bin.
    Q: the bins below the threshold (without that mass) merged into `levels` groups, each group's
    mass spread evenly over its non-empty bins. Both normalized. Uses cumulative sums so each
    threshold costs O(levels), not O(bins).
    """
    total = c.sum()
    cum = np.concatenate([[0.0], np.cumsum(c)])
    clogc = np.concatenate([[0.0], np.cumsum(c * np.log(np.where(c > 0, c, 1.0)))])
    nonzero = np.concatenate([[0], np.cumsum(c > 0)])
    group = np.arange(levels + 1, dtype=np.int64)
    result = []
    for start in range(levels, len(c) + 1, KL_CHUNK):
        n = np.arange(start, min(start + KL_CHUNK, len(c) + 1), dtype=np.int64)
        bounds = n[:, None] * group[None, :] // levels
        mass = cum[bounds[:, 1:]] - cum[bounds[:, :-1]]
        filled = nonzero[bounds[:, 1:]] - nonzero[bounds[:, :-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            per_group = np.where(mass > 0, mass * np.log(mass / np.maximum(filled, 1)), 0.0).sum(axis=1)
            inside = cum[n]
            # Sum over bins below the threshold of p*log(p/q), written with group sums (see docstring).
            kl = (clogc[n] - per_group + inside * np.log(inside) - inside * math.log(total)) / total
            # The last bin of P also holds everything above the threshold.
            last = c[n - 1]
            outside = total - inside
            q_last = np.where(last > 0, mass[:, -1] / np.maximum(filled[:, -1], 1) / inside, KL_EPSILON)
            p_old, p_new = last / total, (last + outside) / total
            kl += p_new * np.log(p_new / q_last) - np.where(last > 0, p_old * np.log(p_old / q_last), 0.0)
            kl = np.where(inside > 0, kl, np.inf)
        result.append(kl)
    return np.concatenate(result)


def entropy(h: Histogram, num_levels: int = 256) -> tuple[float, float]:
    """Clipping threshold minimizing KL divergence between clipped and quantized data (TensorRT style).

    Signed data gets |x| <= T (trimmed to [min, max]) with num_levels // 2 levels per side; data that is all
    >= 0 (or all <= 0) gets (0, T) (or (-T, 0)) with num_levels levels. Thresholds are bin edges from
    `levels` bins upward, so T cannot be finer than the histogram: with outliers far away, the bins are
    wide and T is at least levels * bin_width.
    """
    _require(h)
    _check_levels(num_levels)
    one_sided = h.min >= 0 or h.max <= 0
    levels = num_levels if one_sided else num_levels // 2
    top = max(abs(h.min), abs(h.max))
    counts, width = _folded(h)
    if one_sided:
        # After ReLU/Clip most values can be exactly 0 (EfficientNet-Lite0: 34-78% per ReLU6 output). A range that
        # includes 0 represents them exactly whatever the threshold, yet their spike in the first bin dominated
        # the KL of every wide threshold (Q spreads it over its group), which picked T ~ 1.8 for ReLU6 outputs
        # whose values reach 6: 0% top-1 agreement end to end. So the bin holding 0 is left out of the comparison.
        counts = counts.copy()
        counts[0] = 0.0
    if len(counts) <= levels or not counts.any():
        # Every bin gets its own level, or nothing lies outside the bin holding 0: quantization loses nothing the
        # histogram can show.
        threshold = top
    else:
        best = int(np.argmin(_kl_per_threshold(counts, levels)))
        threshold = min((levels + best) * width, top)
    if h.min >= 0:
        return 0.0, float(threshold)
    if h.max <= 0:
        return -float(threshold), 0.0
    # No data lies outside [min, max], so trimming the symmetric range to it loses nothing.
    return max(-float(threshold), h.min), min(float(threshold), h.max)


def _squared_errors(
    centers: np.ndarray, counts: np.ndarray, lows: np.ndarray, highs: np.ndarray, num_levels: int
) -> np.ndarray:
    """Expected total squared error for every (lows[k], highs[l]) pair, as a matrix [k, l]."""
    clip_low = (np.maximum(lows[:, None] - centers, 0.0) ** 2) @ counts
    clip_high = (np.maximum(centers - highs[:, None], 0.0) ** 2) @ counts
    # How many values lie below each low and above each high: sums of whole counts, exact in float64 in any order
    # (below 2**53), so running sums over the sorted centers give what `(centers < lows[:, None]) @ counts` gives,
    # without its two (candidates x bins) matrices.
    running = np.concatenate(([0.0], np.cumsum(counts)))
    below = running[np.searchsorted(centers, lows, side="left")]
    above = running[-1] - running[np.searchsorted(centers, highs, side="right")]
    # The caller widens the range to include 0, so the step is taken over the widened range.
    step = (np.maximum(highs, 0.0)[None, :] - np.minimum(lows, 0.0)[:, None]) / (num_levels - 1)
    inside = counts.sum() - below[:, None] - above[None, :]
    errors: np.ndarray = clip_low[:, None] + clip_high[None, :] + inside * step**2 / 12.0
    return errors


def mse(h: Histogram, num_levels: int = 256, symmetric: bool = False) -> tuple[float, float]:
    """Range minimizing expected squared error: rounding (step**2 / 12 per value) plus clipping.

    Candidates shrink min and max towards 0 by fractions of the full range. The two ends shrink
    independently (unless symmetric), so an outlier on one side does not drag the other end in.
    A coarse grid of 100 fractions is refined around its best point.
    """
    _require(h)
    _check_levels(num_levels)
    if h.min == h.max:
        return float(h.min), float(h.max)
    centers = np.clip(h.centers(), h.min, h.max)
    counts = h.counts.astype(np.float64)
    if symmetric:
        top = max(abs(h.min), abs(h.max))
        low_end, high_end = -top, top
    else:
        low_end, high_end = h.min, h.max

    def best(fractions: np.ndarray) -> tuple[float, float]:
        cost = _squared_errors(centers, counts, low_end * fractions, high_end * fractions, num_levels)
        if symmetric:
            k = j = int(np.argmin(np.diag(cost)))
        else:
            k, j = (int(i) for i in np.unravel_index(int(np.argmin(cost)), cost.shape))
        return float(fractions[k]), float(fractions[j])

    coarse = np.linspace(0.01, 1.0, 100)
    fa, fb = best(coarse)
    if symmetric:
        fa = fb = best(np.clip(np.linspace(fb - 0.01, fb + 0.01, 41), 0.0, 1.0))[1]
    else:
        # Refine both ends together on finer grids around the coarse optimum.
        fine_a = np.clip(np.linspace(fa - 0.01, fa + 0.01, 41), 0.0, 1.0)
        fine_b = np.clip(np.linspace(fb - 0.01, fb + 0.01, 41), 0.0, 1.0)
        cost = _squared_errors(centers, counts, low_end * fine_a, high_end * fine_b, num_levels)
        k, j = np.unravel_index(int(np.argmin(cost)), cost.shape)
        fa, fb = float(fine_a[k]), float(fine_b[j])
    return float(low_end * fa), float(high_end * fb)


METHODS = {"minmax": minmax, "percentile": percentile, "entropy": entropy, "mse": mse}


def select_range(h: Histogram, method: str, **kw: Any) -> tuple[float, float]:
    """Dispatch to one of METHODS by name, passing keyword options through."""
    if method not in METHODS:
        raise LowbitError(f"unknown range method {method!r}; choose one of: {', '.join(METHODS)}")
    func = METHODS[method]
    if isinstance(h, Histogram) and h.count == 0 and h.saw_empty:
        # The tensor exists but is always empty (e.g. a zero-length slice): any scale represents it exactly.
        return 0.0, 0.0
    try:
        inspect.signature(func).bind(h, **kw)
    except TypeError as err:
        raise LowbitError(f"bad options for range method {method!r}: {err}") from None
    return func(h, **kw)
