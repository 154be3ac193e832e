"""Streaming observers whose memory does not grow with the data: a mergeable histogram and per-channel min/max.

The histogram's bins have width 2**e and are aligned to multiples of that width, so coarsening
(adding adjacent pairs) is exact. Its exponent always ends up as the smallest one at which all data
seen so far fits in max_bins bins, whatever the batching or merge order, so results are identical
however calibration work is split across batches or workers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lowbit.errors import LowbitError

# 2**-1074 is the smallest positive double: finer bins could not separate any two values.
MIN_EXPONENT = -1074
# Bin indices stay below 2**52 in magnitude, so they are exact as float64 and as int64.
INDEX_BITS = 52


def bin_indices(x: np.ndarray, e: int) -> np.ndarray:
    """floor(x / 2**e) for every value, as int64, computed exactly."""
    x = np.asarray(x, dtype=np.float64)
    idx: np.ndarray = np.floor(np.ldexp(x, -e)).astype(np.int64)
    # A tiny negative value can underflow to -0.0 and would land in bin 0; it belongs in bin -1.
    idx[(idx == 0) & (x < 0)] = -1
    return idx


CHUNK = 1 << 18
# The float32 path's slices: its two buffers (float32 and int32) stay in a core's L2 cache.
CHUNK32 = 1 << 15
# Integers up to 2**24 in magnitude are exact in float32.
F32_EXACT = 1 << 24


def add_bin_counts(counts: np.ndarray, flat: np.ndarray, e: int, first: int) -> None:
    """counts[i] += how many values of flat (1-D) have bin_indices(v, e) == first + i.

    Every value must fall in bins first .. first + len(counts) - 1.
    """
    n = len(counts)
    if n == 1:
        counts[0] += flat.size  # every value is in the one bin (see above)
        return
    edge = _exact_edge(first + 1, e, flat.dtype) if n == 2 else None
    if edge is not None:
        # Two bins (the extremes-only histograms of calibrate.py): one comparison per value gives the same counts
        # as binning. The edge between them is exact in the data's own dtype, and x < (first + 1) * 2**e exactly
        # when floor(x / 2**e) <= first; a tiny negative value is below an edge of 0, as bin_indices puts it in -1.
        # In slices through one small reused buffer: a whole tensor's comparison would be a fresh mmap'd block
        # (page-faulted, and adding to peak memory while the batch's activations are alive).
        buf = np.empty(min(flat.size, CHUNK32), dtype=bool)
        below = 0
        for start in range(0, flat.size, CHUNK32):
            chunk = flat[start : start + CHUNK32]
            below += int(np.count_nonzero(np.less(chunk, edge, out=buf[: len(chunk)])))
        counts[0] += below
        counts[1] += flat.size - below
        return
    if flat.dtype == np.float32 and -126 <= e <= 0 and max(abs(first), abs(first + n)) < F32_EXACT:
        # Same counts as the float64 path, in float32 (a quarter of its memory traffic): with 2**-e >= 1 a
        # normal power of two, v * 2**-e is exact (no rounding, no underflow, and no overflow since
        # |v| * 2**-e <= 2**INDEX_BITS), so is its floor, and floor - first is an integer below 2**24 in
        # magnitude, hence exact too. A negative value never lands in bin 0 here, so no -0.0 fix-up.
        # The indices are cast to int32, not intp: float32 -> int64 is numpy's slow cast (0.55 ns a value against
        # 0.10 here), more than bincount's own widening of them costs back.
        scale, offset = np.float32(math.ldexp(1.0, -e)), np.float32(first)
        size = min(flat.size, CHUNK32)
        buf = np.empty(size, dtype=np.float32)
        idx = np.empty(size, dtype=np.int32)
        for start in range(0, flat.size, CHUNK32):
            chunk = flat[start : start + CHUNK32]
            b, i = buf[: len(chunk)], idx[: len(chunk)]
            np.multiply(chunk, scale, out=b)
            np.floor(b, out=b)
            if first:  # a tensor whose lowest bin is 0 (after a Relu) needs no shift
                np.subtract(b, offset, out=b)
            np.copyto(i, b, casting="unsafe")
            counts += np.bincount(i, minlength=n)
        return
    # In slices: float64 indices of a whole activation tensor would cost 8x its size in temporaries.
    for start in range(0, flat.size, CHUNK):
        counts += np.bincount(bin_indices(flat[start : start + CHUNK], e) - first, minlength=n)


def _exact_edge(k: int, e: int, dtype: np.dtype) -> np.floating | None:
    """k * 2**e as a scalar of the float `dtype` when it is exactly that value there, else None."""
    if dtype.kind != "f":
        return None
    try:
        value = math.ldexp(k, e)
    except OverflowError:
        return None
    with np.errstate(over="ignore", under="ignore"):
        edge = dtype.type(value)
    return edge if np.isfinite(edge) and float(edge) == value else None


def _numeric(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise LowbitError(f"{what} input must be numeric: {err}") from None
    return arr


def _finite_extremes(lo: Any, hi: Any, what: str) -> tuple[float, float]:
    lo, hi = float(lo), float(hi)  # min/max propagate NaN, and +-Inf show up as extremes
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise LowbitError(f"{what} input contains NaN or Inf; fix the model or data before calibrating")
    return lo, hi


class Histogram:
    """Counts of float values in power-of-two-wide bins; at most max_bins bins however much data is seen."""

    def __init__(self, max_bins: int = 2048) -> None:
        if isinstance(max_bins, bool) or not isinstance(max_bins, (int, np.integer)) or max_bins < 2:
            # One bin can never hold values on both sides of 0 (bins -1 and 0 never merge).
            raise LowbitError(f"Histogram max_bins must be an integer >= 2, got {max_bins!r}")
        self.max_bins = int(max_bins)
        self.e: int | None = None  # bin width is 2**e; None while empty
        self.i0 = 0  # index of the first bin: it covers [i0 * 2**e, (i0 + 1) * 2**e)
        self.counts = np.zeros(0, dtype=np.int64)
        self._min = math.inf
        self._max = -math.inf
        self.saw_empty = False

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    @property
    def min(self) -> float:
        self._require_data()
        return self._min

    @property
    def max(self) -> float:
        self._require_data()
        return self._max

    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, self._exponent())

    def edges(self) -> np.ndarray:
        """Bin edges, length len(counts) + 1."""
        e = self._exponent()
        return np.ldexp(self.i0 + np.arange(len(self.counts) + 1, dtype=np.float64), e)

    def centers(self) -> np.ndarray:
        e = self._exponent()
        return np.ldexp(self.i0 + np.arange(len(self.counts), dtype=np.float64) + 0.5, e)

    def update(self, x: np.ndarray) -> None:
        """Add every value of x (any shape)."""
        flat = _numeric(x, "histogram").reshape(-1)
        if flat.size == 0:
            self.saw_empty = True  # a zero-size tensor: observed, but with no values (ranges give [0, 0])
            return
        lo, hi = _finite_extremes(flat.min(), flat.max(), "histogram")
        lo, hi = min(self._min, lo), max(self._max, hi)
        e = self._fitting_exponent(lo, hi, self.e)
        first, last = (int(i) for i in bin_indices(np.array([lo, hi]), e))
        counts = self._counts_at(e, first, last - first + 1)
        add_bin_counts(counts, flat, e, first)
        self.e, self.i0, self.counts, self._min, self._max = e, first, counts, lo, hi

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding the data of both; neither input changes."""
        if not isinstance(other, Histogram):
            raise LowbitError(f"can only merge a Histogram with a Histogram, got {type(other).__name__}")
        if other.max_bins != self.max_bins:
            raise LowbitError(f"cannot merge histograms with max_bins {self.max_bins} and {other.max_bins}")
        if other.e is None:
            return self.copy()
        if self.e is None:
            return other.copy()
        lo, hi = min(self._min, other._min), max(self._max, other._max)
        e = self._fitting_exponent(lo, hi, max(self.e, other.e))
        first, last = (int(i) for i in bin_indices(np.array([lo, hi]), e))
        n = last - first + 1
        out = Histogram(self.max_bins)
        out.e, out.i0, out._min, out._max = e, first, lo, hi
        out.counts = self._counts_at(e, first, n) + other._counts_at(e, first, n)
        return out

    def copy(self) -> Histogram:
        out = Histogram(self.max_bins)
        out.e, out.i0, out.counts, out._min, out._max = self.e, self.i0, self.counts.copy(), self._min, self._max
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain ints, floats and lists, for JSON."""
        empty = self.e is None
        return {
            "max_bins": self.max_bins,
            "e": self.e,
            "i0": int(self.i0),
            "counts": [int(c) for c in self.counts],
            "min": None if empty else float(self._min),
            "max": None if empty else float(self._max),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        try:
            out = cls(d["max_bins"])
            counts = np.asarray(d["counts"], dtype=np.int64)
            if d["e"] is None:
                if counts.size:
                    raise ValueError("counts given without an exponent")
                return out
            out.e, out.i0 = int(d["e"]), int(d["i0"])
            out._min, out._max = float(d["min"]), float(d["max"])
        except (KeyError, TypeError, ValueError, OverflowError) as err:
            raise LowbitError(f"not a valid histogram dict: {err!r}") from None
        if counts.ndim != 1 or not 1 <= counts.size <= out.max_bins or (counts < 0).any():
            raise LowbitError(f"not a valid histogram dict: bad counts (length {counts.size})")
        if not out._min <= out._max or counts[0] == 0 or counts[-1] == 0:
            raise LowbitError("not a valid histogram dict: min/max do not match counts")
        out.counts = counts
        return out

    def __repr__(self) -> str:
        if self.e is None:
            return f"Histogram(max_bins={self.max_bins}, empty)"
        return (
            f"Histogram(max_bins={self.max_bins}, count={self.count}, min={self._min}, max={self._max}, "
            f"bins={len(self.counts)}, width=2**{self.e})"
        )

    def _require_data(self) -> None:
        if self.e is None:
            raise LowbitError("histogram is empty: call update() with calibration data first")

    def _exponent(self) -> int:
        """The bin exponent e; raises like _require_data while empty."""
        self._require_data()
        assert self.e is not None
        return self.e

    def _fitting_exponent(self, lo: float, hi: float, start: int | None) -> int:
        # Valid exponents form an upward-closed set, and start never exceeds the smallest valid one for
        # the combined data, so walking up from start finds that smallest one: the result depends only
        # on the data, not on batching or merge order.
        biggest = max(abs(lo), abs(hi))
        e = MIN_EXPONENT if biggest == 0 else max(MIN_EXPONENT, math.frexp(biggest)[1] - INDEX_BITS)
        if start is not None:
            e = max(e, start)
        ends = np.array([lo, hi])
        while True:
            first, last = bin_indices(ends, e)
            if last - first + 1 <= self.max_bins:
                return e
            e += 1

    def _counts_at(self, e: int, first: int, n: int) -> np.ndarray:
        """This histogram's counts coarsened to exponent e, laid out over bins first .. first + n - 1."""
        out = np.zeros(n, dtype=np.int64)
        if self.e is None:
            return out
        # Indices are below 2**53, so any shift past 62 gives the same 0 / -1 and avoids int64 UB.
        shift = min(e - self.e, 62)
        idx = (np.arange(len(self.counts), dtype=np.int64) + self.i0) >> shift
        np.add.at(out, idx - first, self.counts)
        return out


class ChannelMinMax:
    """Exact running min, max and mean of each channel along one axis."""

    def __init__(self, axis: int = 1) -> None:
        self.axis = int(axis)
        self.min: np.ndarray | None = None  # shape (C,) once data has been seen
        self.max: np.ndarray | None = None
        self.sum: np.ndarray | None = None  # float64 sums and the count per channel give the mean
        self.count = 0

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.sum is None else self.sum / max(self.count, 1)

    def update(self, x: np.ndarray) -> None:
        arr = _numeric(x, "channel min/max")
        if not -arr.ndim <= self.axis < arr.ndim:
            raise LowbitError(f"channel axis {self.axis} is out of range for input of shape {arr.shape}")
        axis = self.axis % arr.ndim
        channels = arr.shape[axis]
        if self.min is not None and channels != len(self.min):
            raise LowbitError(f"input has {channels} channels on axis {self.axis}, earlier inputs had {len(self.min)}")
        if arr.size == 0:
            return
        # Reductions over the other axes, without moving the channel axis first: no copy of the tensor.
        others = tuple(i for i in range(arr.ndim) if i != axis)
        lo, hi = arr.min(axis=others).astype(np.float64), arr.max(axis=others).astype(np.float64)
        _finite_extremes(lo.min(), hi.max(), "channel min/max")
        total = arr.sum(axis=others, dtype=np.float64)
        if self.min is None:
            self.min, self.max, self.sum = lo, hi, total
        else:
            assert self.max is not None and self.sum is not None  # min, max and sum are set together
            self.min, self.max = np.minimum(self.min, lo), np.maximum(self.max, hi)
            self.sum = self.sum + total
        self.count += arr.size // channels

    def merge(self, other: ChannelMinMax) -> ChannelMinMax:
        """A new observer covering the data of both; neither input changes."""
        if not isinstance(other, ChannelMinMax):
            raise LowbitError(f"can only merge a ChannelMinMax with a ChannelMinMax, got {type(other).__name__}")
        if other.axis != self.axis:
            raise LowbitError(f"cannot merge channel min/max over axes {self.axis} and {other.axis}")
        out = ChannelMinMax(self.axis)
        if self.min is None or other.min is None:
            src = other if self.min is None else self
            if src.min is not None:
                assert src.max is not None and src.sum is not None  # min, max and sum are set together
                out.min, out.max, out.sum, out.count = src.min.copy(), src.max.copy(), src.sum.copy(), src.count
            return out
        if len(self.min) != len(other.min):
            raise LowbitError(f"cannot merge channel min/max with {len(self.min)} and {len(other.min)} channels")
        assert self.max is not None and self.sum is not None and other.max is not None and other.sum is not None
        out.min, out.max = np.minimum(self.min, other.min), np.maximum(self.max, other.max)
        out.sum, out.count = self.sum + other.sum, self.count + other.count
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "axis": self.axis,
            "min": None if self.min is None else [float(v) for v in self.min],
            "max": None if self.max is None else [float(v) for v in self.max],
            "sum": None if self.sum is None else [float(v) for v in self.sum],
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChannelMinMax:
        try:
            out = cls(d["axis"])
            if d["min"] is not None:
                out.min = np.asarray(d["min"], dtype=np.float64)
                out.max = np.asarray(d["max"], dtype=np.float64)
                out.sum = np.asarray(d.get("sum", np.zeros_like(out.min)), dtype=np.float64)
                out.count = int(d.get("count", 0))
        except (KeyError, TypeError, ValueError) as err:
            raise LowbitError(f"not a valid channel min/max dict: {err!r}") from None
        if out.min is not None:
            assert out.max is not None  # set together with min above
            if out.min.shape != out.max.shape or out.min.ndim != 1:
                raise LowbitError("not a valid channel min/max dict: min and max must be equal-length lists")
        return out
