import json
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.observe import METHODS, ChannelMinMax, Histogram, entropy, minmax, mse, percentile, select_range


def state(h: Histogram) -> tuple:
    return (h.e, h.i0, h.counts.tolist(), h.count, h.min, h.max)


def one_shot(values: np.ndarray, max_bins: int) -> Histogram:
    h = Histogram(max_bins)
    h.update(values)
    return h


values_strategy = st.lists(
    st.one_of(
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(min_value=-10.0, max_value=10.0),
        st.sampled_from([0.0, -0.0, 5e-324, -5e-324, 1.0, -1.0]),
    ),
    min_size=1,
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    values=values_strategy,
    max_bins=st.sampled_from([2, 3, 8, 64, 2048]),
    data=st.data(),
)
def test_batching_and_merge_order_do_not_change_the_histogram(values, max_bins, data):
    arr = np.array(values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(arr)), max_size=5)))
    chunks = np.split(arr, cuts)
    expected = state(one_shot(arr, max_bins))

    streamed = Histogram(max_bins)
    for chunk in chunks:
        streamed.update(chunk)
    assert state(streamed) == expected

    parts = [one_shot(c, max_bins) for c in chunks]
    order = data.draw(st.permutations(range(len(parts))))
    merged = Histogram(max_bins)
    for i in order:
        merged = merged.merge(parts[i])
    assert state(merged) == expected
    assert merged.count == len(arr)
    assert len(merged.counts) <= max_bins


def test_merge_does_not_mutate_inputs():
    a, b = one_shot(np.array([0.0, 1.0]), 8), one_shot(np.array([100.0, -3.0]), 8)
    before = (state(a), state(b))
    m = a.merge(b)
    assert (state(a), state(b)) == before
    assert m.count == 4 and m.min == -3.0 and m.max == 100.0


def test_bins_stay_bounded_on_a_million_wide_range_values():
    rng = np.random.default_rng(1)
    h = Histogram(256)
    for _ in range(10):
        batch = rng.standard_normal(100_000) * np.exp(rng.uniform(-20, 20, 100_000))
        h.update(batch.astype(np.float32))
        assert len(h.counts) <= 256
    assert h.count == 1_000_000
    assert h.counts.sum() == 1_000_000


def test_constant_data_is_one_bin_holding_everything():
    for value in (0.0, 3.7, -1e30):
        h = one_shot(np.full((4, 5), value), 2048)
        assert len(h.counts) == 1 and h.count == 20 and h.min == h.max == value
        for method in METHODS:
            a, b = select_range(h, method)
            assert a <= b and a <= max(value, 0.0) and b >= min(value, 0.0)
            assert not (math.isnan(a) or math.isnan(b))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_raises(bad):
    h = Histogram()
    with pytest.raises(LowbitError, match="NaN or Inf"):
        h.update(np.array([1.0, bad]))
    with pytest.raises(LowbitError, match="NaN or Inf"):
        ChannelMinMax().update(np.array([[1.0, bad]]))


def test_bad_arguments_raise():
    with pytest.raises(LowbitError):
        Histogram(1)
    with pytest.raises(LowbitError):
        Histogram(8).merge(Histogram(16))
    with pytest.raises(LowbitError, match="empty"):
        minmax(Histogram())
    h = one_shot(np.arange(10.0), 64)
    with pytest.raises(LowbitError, match="minmax.*percentile.*entropy.*mse"):
        select_range(h, "kl")
    with pytest.raises(LowbitError):
        select_range(h, "percentile", q=3)
    with pytest.raises(LowbitError):
        percentile(h, 10.0)


def test_dict_round_trip_through_json():
    rng = np.random.default_rng(2)
    h = one_shot(rng.standard_normal(10_000) * 3 + 1, 128)
    back = Histogram.from_dict(json.loads(json.dumps(h.to_dict())))
    assert state(back) == state(h)
    empty = Histogram.from_dict(json.loads(json.dumps(Histogram(32).to_dict())))
    assert empty.count == 0 and empty.max_bins == 32
    with pytest.raises(LowbitError):
        Histogram.from_dict({"max_bins": 8})


def test_percentile_is_within_one_bin_of_numpy():
    rng = np.random.default_rng(3)
    x = rng.gamma(2.0, 1.5, 500_000) - 2.0
    h = one_shot(x, 2048)
    for p in (99.0, 99.9, 99.99, 100.0):
        a, b = percentile(h, p)
        assert abs(a - np.percentile(x, 100 - p)) <= h.bin_width
        assert abs(b - np.percentile(x, p)) <= h.bin_width
        assert x.min() <= a <= b <= x.max()


def normal_with_outliers() -> np.ndarray:
    rng = np.random.default_rng(4)
    return np.concatenate([rng.standard_normal(4_000_000), [1000.0] * 3])


def test_entropy_and_mse_ignore_rare_outliers_that_minmax_keeps():
    x = normal_with_outliers()
    h = one_shot(x, 2048)
    assert minmax(h)[1] == 1000.0
    # The outliers make 2048 bins half a unit wide; TensorRT-style KL starts at 128 bins, so 64.
    assert entropy(h)[1] == 64.0
    # With bins fine enough to resolve the Gaussian, entropy clips right next to it.
    fine = one_shot(x, 16384)
    assert 4.0 < entropy(fine)[1] < 10.0
    # MSE weighs rounding (N * step^2 / 12) against clipping (3 * (1000 - b)^2); its optimum is
    # b = 1000 * f / (f + 1 / (12 * 255^2)) with f the outlier fraction: far inside 1000, not near 5.
    f = 3 / len(x)
    expected_b = 1000 * f / (f + 1 / (12 * 255**2))
    a, b = mse(h)
    assert abs(b - expected_b) < 0.05 * expected_b
    assert -6.0 < a < 0.0


def test_methods_agree_with_the_true_range_on_uniform_data():
    rng = np.random.default_rng(5)
    for low, high in ((-1.0, 1.0), (0.0, 5.0), (-2.0, 6.0)):
        h = one_shot(rng.uniform(low, high, 200_000), 2048)
        for method in METHODS:
            a, b = select_range(h, method)
            width = high - low
            assert abs(a - low) < 0.1 * width and abs(b - high) < 0.1 * width, (method, a, b)
        assert mse(h, symmetric=True)[1] >= 0.9 * max(abs(low), high)


def test_entropy_one_sided_and_speed():
    rng = np.random.default_rng(6)
    h = one_shot(np.maximum(rng.standard_normal(100_000), 0.0), 2048)
    a, b = entropy(h)
    assert a == 0.0 and 1.5 < b <= h.max
    h = one_shot(-np.abs(rng.standard_normal(100_000)), 2048)
    a, b = entropy(h)
    assert b == 0.0 and -h.min > -a > 1.5
    h = one_shot(rng.standard_normal(100_000) * 10, 4096)
    a, b = entropy(h)
    assert h.min <= a < -20.0 and 20.0 < b <= h.max

    h = one_shot(rng.uniform(0.0, 1.0, 100_000) ** 3, 2048)
    assert len(h.counts) > 1500
    start = time.perf_counter()
    entropy(h)
    assert time.perf_counter() - start < 0.5


def brute_force_kl(c: np.ndarray, levels: int) -> np.ndarray:
    """TensorRT's loop written out directly, one threshold at a time."""
    out = []
    for i in range(levels, len(c) + 1):
        p = c[:i].copy()
        p[-1] += c[i:].sum()
        q = np.zeros(i)
        bounds = np.arange(levels + 1) * i // levels
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            filled = c[lo:hi] > 0
            if filled.any():
                q[lo:hi][filled] = c[lo:hi].sum() / filled.sum()
        p, q = p / p.sum(), q / q.sum()
        q = np.where((q == 0) & (p > 0), 1e-4, q)
        mask = p > 0
        out.append(np.sum(p[mask] * np.log(p[mask] / q[mask])))
    return np.array(out)


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=5, max_size=40).filter(lambda c: c[0] > 0 and c[-1] > 0),
    levels=st.integers(1, 5),
)
def test_vectorized_kl_matches_the_plain_loop(counts, levels):
    from lowbit.observe.ranges import _kl_per_threshold

    c = np.array(counts, dtype=np.float64)
    np.testing.assert_allclose(_kl_per_threshold(c, levels), brute_force_kl(c, levels), atol=1e-9)


def test_channel_minmax_matches_numpy_and_merges():
    rng = np.random.default_rng(7)
    batches = [rng.standard_normal((4, 3, 5, 5)) * np.arange(1, 4)[None, :, None, None] for _ in range(3)]
    obs = ChannelMinMax(axis=1)
    for b in batches:
        obs.update(b)
    allx = np.concatenate(batches)
    np.testing.assert_array_equal(obs.min, allx.min(axis=(0, 2, 3)))
    np.testing.assert_array_equal(obs.max, allx.max(axis=(0, 2, 3)))

    left, right = ChannelMinMax(1), ChannelMinMax(1)
    left.update(batches[0])
    right.update(batches[1])
    right.update(batches[2])
    merged = right.merge(left).merge(ChannelMinMax(1))
    np.testing.assert_array_equal(merged.min, obs.min)
    np.testing.assert_array_equal(merged.max, obs.max)
    back = ChannelMinMax.from_dict(json.loads(json.dumps(merged.to_dict())))
    np.testing.assert_array_equal(back.max, obs.max)

    last_axis = ChannelMinMax(axis=-1)
    last_axis.update(allx)
    np.testing.assert_array_equal(last_axis.max, allx.max(axis=(0, 1, 2)))
    with pytest.raises(LowbitError, match="channels"):
        obs.update(rng.standard_normal((2, 4, 5, 5)))
    with pytest.raises(LowbitError, match="axis"):
        ChannelMinMax(axis=3).update(np.zeros((2, 2)))


def test_entropy_keeps_the_range_of_relu6_outputs_despite_their_zeros() -> None:
    """Most values after ReLU6 are exactly 0; that spike used to decide the KL threshold and cut [0, 6] to ~[0, 1.8]
    (0% top-1 agreement on EfficientNet-Lite0). Zeros are exact for any range holding 0, so they must not."""
    rng = np.random.default_rng(0)
    body = np.clip(rng.exponential(0.8, 30_000), 0.0, 6.0)
    x = np.concatenate([np.zeros(70_000), body]).astype(np.float32)
    h = Histogram()
    h.update(x)
    lo, hi = entropy(h)
    assert lo == 0.0 and hi >= 4.0


def _reference_counts(values: np.ndarray, e: int, first: int, n: int) -> np.ndarray:
    """The float64 definition the float32 path must match: floor(v / 2**e) per value, counted from bin `first`."""
    from lowbit.observe.histogram import bin_indices

    return np.bincount(bin_indices(values.astype(np.float64), e) - first, minlength=n)


def _float32_cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    f32 = np.finfo(np.float32)
    tiny = float(f32.smallest_subnormal)
    cases = [
        rng.standard_normal(100_000).astype(np.float32) * 3 + 1,  # mixed signs, more than one slice
        np.abs(rng.standard_normal(5000)).astype(np.float32),  # non-negative only
        -np.abs(rng.standard_normal(5000)).astype(np.float32) - 0.5,  # negative only
        np.zeros(1000, np.float32),
        np.array([-0.0, 0.0, -0.0], np.float32),
        np.clip(rng.standard_normal(5000).astype(np.float32), 0, 6),  # ReLU6-like: most mass on 0 and 6
        (rng.standard_normal(5000) * 1e6).astype(np.float32),  # wide range: bins wider than 1 (slow path)
        np.array([-f32.max, f32.max, 0.0, -1.0, 1.0], np.float32),  # largest range float32 can hold
        np.array([tiny, -tiny, 0.0, 2 * tiny], np.float32),  # subnormals only: e below -126 (slow path)
        np.array([tiny, -tiny, 1.0, -1e-30], np.float32),  # subnormals next to normal values
        np.array([1e-30, -1e-30, 1e-38, -3e-39], np.float32),
        np.array([-1e30, 1e-40, -1e-40, 3.0], np.float32),  # tiny negatives in a huge range (underflow to -0.0)
        (rng.integers(-2048, 2048, 5000) / 64).astype(np.float32),  # exactly on bin edges
        np.nextafter((rng.integers(-2048, 2048, 5000) / 64).astype(np.float32), np.float32(-np.inf)),  # just below
        (rng.standard_normal(5000) * 2.0**-100).astype(np.float32),
        (rng.standard_normal(5000) * 2.0**20).astype(np.float32) + np.float32(2.0**23),  # far from 0, near 2**24
        np.full(10, 16_777_215.0, np.float32),
        np.array([16_777_200.0, 16_777_214.0, 16_777_213.0], np.float32),  # bin indices just below 2**24 at e=0
        np.array([-8_388_608.5, 8_388_607.0, 123.25], np.float32),
    ]
    return cases


@pytest.mark.parametrize("case", range(len(_float32_cases())))
@pytest.mark.parametrize("max_bins", [2, 3, 256, 2048])
def test_float32_update_counts_like_the_float64_definition(case, max_bins):
    from lowbit.observe.histogram import add_bin_counts, bin_indices

    values = _float32_cases()[case]
    h32, h64 = one_shot(values, max_bins), one_shot(values.astype(np.float64), max_bins)
    assert state(h32) == state(h64)  # float64 input always takes the float64 path
    assert h32.count == values.size
    # And against floor(v / 2**e) directly, at the histogram's exponent and at finer/coarser ones that still fit.
    assert h32.e is not None
    for e in (h32.e, h32.e + 1, h32.e + 7, h32.e + 40):
        first, last = (int(i) for i in bin_indices(np.array([values.min(), values.max()], np.float64), e))
        n = last - first + 1
        if n > 1 << 20:
            continue
        counts = np.zeros(n, np.int64)
        add_bin_counts(counts, values, e, first)
        np.testing.assert_array_equal(counts, _reference_counts(values, e, first, n))


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=80),
    max_bins=st.sampled_from([2, 5, 64, 2048]),
    cut=st.integers(0, 80),
)
def test_float32_and_float64_inputs_give_the_same_histogram(values, max_bins, cut):
    arr = np.array(values, dtype=np.float32)
    streamed32, streamed64 = Histogram(max_bins), Histogram(max_bins)
    for part in (arr[:cut], arr[cut:]):
        streamed32.update(part)
        streamed64.update(part.astype(np.float64))
    assert state(streamed32) == state(streamed64) == state(one_shot(arr.astype(np.float64), max_bins))


@settings(max_examples=300, deadline=None)
@given(
    values=st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=60),
    wide=st.booleans(),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_two_bin_counts_are_one_comparison_with_the_same_result(values, wide, dtype):
    """calibrate.py's extremes-only histograms (2 bins) count by comparing with the edge between the bins."""
    from lowbit.observe.histogram import add_bin_counts, bin_indices

    arr = np.array(values, dtype=dtype)
    ends = np.array([arr.min(), arr.max()], np.float64)
    e = Histogram(2)._fitting_exponent(float(ends[0]), float(ends[1]), None) + (3 if wide else 0)
    first, last = (int(i) for i in bin_indices(ends, e))
    n = last - first + 1
    assert n <= 2
    counts = np.zeros(n, np.int64)
    add_bin_counts(counts, arr, e, first)
    np.testing.assert_array_equal(counts, _reference_counts(arr, e, first, n))
