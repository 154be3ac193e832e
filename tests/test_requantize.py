"""lowbit.numerics' TFLite fixed-point multiplier and integer requantization against a reference written in plain
Python ints (TFLite's SaturatingRoundingDoublingHighMul and RoundingDivideByPOT)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import LowbitError
from lowbit.numerics import fixed_point_multiplier, requantize

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (rounds toward zero)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def ref_srdhm(a: int, b: int) -> int:
    """gemmlowp SaturatingRoundingDoublingHighMul for int32."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    r = _trunc_div(ab + nudge, 1 << 31)
    assert INT32_MIN <= r <= INT32_MAX
    return r


def ref_rounding_divide_by_pot(x: int, exponent: int) -> int:
    """gemmlowp RoundingDivideByPOT: round to nearest, ties away from zero."""
    assert 0 <= exponent <= 31
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def ref_multiply_by_quantized_multiplier(x: int, m0: int, shift: int) -> int:
    left = shift if shift > 0 else 0
    right = 0 if shift > 0 else -shift
    return ref_rounding_divide_by_pot(ref_srdhm(x * (1 << left), m0), right)


def ref_quantize_multiplier(m: float) -> tuple[int, int]:
    """TFLite QuantizeMultiplier: frexp, then TfLiteRound (= std::round, ties away from zero)."""
    if m == 0:
        return 0, 0
    import math

    q, shift = math.frexp(m)
    q_fixed = math.floor(q * (1 << 31) + 0.5)  # q > 0, and q * 2**31 + 0.5 is exact in a double
    assert q_fixed <= 1 << 31
    if q_fixed == 1 << 31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return q_fixed, shift


@settings(max_examples=300, deadline=None)
@given(m=st.floats(1e-6, 1, exclude_max=True))
def test_fixed_point_multiplier(m):
    m0, shift = fixed_point_multiplier(m)
    assert 2**30 <= m0 < 2**31
    approx = m0 * 2.0 ** (shift - 31)
    assert abs(approx - m) <= 2.0 ** (shift - 32)  # half an ulp of the 31-bit mantissa
    assert (m0, shift) == ref_quantize_multiplier(m)


def test_fixed_point_multiplier_edges():
    assert fixed_point_multiplier(0.5) == (2**30, 0)
    assert fixed_point_multiplier(0.25) == (2**30, -1)
    assert fixed_point_multiplier(1.0) == (2**30, 1)
    assert fixed_point_multiplier(1 - 2**-40) == (2**30, 1)  # mantissa rounds up to 2**31: renormalised
    assert fixed_point_multiplier(0.0) == (0, 0)
    # An exact tie in the 31-bit mantissa rounds away from zero, as TFLite's QuantizeMultiplier does.
    tie = 0.5 + 2.0**-32
    assert fixed_point_multiplier(tie) == ref_quantize_multiplier(tie) == (2**30 + 1, 0)
    # Multipliers too small to matter for any int32 accumulator become 0, as in TFLite.
    assert fixed_point_multiplier(1e-12) == ref_quantize_multiplier(1e-12) == (0, 0)
    for bad in (-0.5, float("nan"), -float("inf")):
        with pytest.raises(LowbitError):
            fixed_point_multiplier(bad)


@settings(max_examples=300, deadline=None)
@given(
    m=st.floats(1e-6, 1, exclude_max=True),
    acc=st.lists(st.integers(INT32_MIN, INT32_MAX), min_size=1, max_size=16),
    zp=st.integers(-128, 255),
)
def test_requantize_matches_tflite_reference(m, acc, zp):
    m0, shift = fixed_point_multiplier(m)
    out = requantize(np.array(acc, np.int32), m0, shift, zp, -(2**31), 2**31 - 1)
    ref = [min(max(ref_multiply_by_quantized_multiplier(a, m0, shift) + zp, INT32_MIN), INT32_MAX) for a in acc]
    assert out.tolist() == ref
    # And it is the real-valued product rounded, to within 1 (the multiplier itself is rounded to 31 bits).
    exact = [min(max(round(a * m) + zp, INT32_MIN), INT32_MAX) for a in acc]
    assert all(abs(o - e) <= 1 for o, e in zip(out.tolist(), exact))
    # Saturation to an 8-bit output range.
    clipped = requantize(np.array(acc, np.int32), m0, shift, zp, 0, 255)
    assert clipped.tolist() == [min(max(r, 0), 255) for r in ref]


def test_requantize_ties_and_signs():
    # m = 0.25 (m0 = 2**30, shift = -1): x * 0.25 ties round away from zero. (+-1 * 0.25 is double-rounded by
    # the two-step reference, to 1 and 0; we only pin those to the reference, not to a hand value.)
    m0, shift = fixed_point_multiplier(0.25)
    acc = np.array([2, 6, -2, -6, 0, 1, -1, INT32_MIN, INT32_MAX])
    out = requantize(acc, m0, shift, 0, INT32_MIN, INT32_MAX)
    assert out.tolist() == [ref_multiply_by_quantized_multiplier(int(a), m0, shift) for a in acc]
    assert out[:5].tolist() == [1, 2, -1, -2, 0]
    assert out[-2:].tolist() == [-(2**29), 2**29]
    assert requantize(np.array([1000]), m0, shift, 10, -128, 127).tolist() == [127]
    assert requantize(np.array([-1000]), m0, shift, 10, -128, 127).tolist() == [-128]
    # A multiplier too small to represent requantizes everything to the zero point instead of crashing.
    m0, shift = fixed_point_multiplier(1e-25)
    assert requantize(np.array([INT32_MIN, INT32_MAX, 7]), m0, shift, 3, -128, 127).tolist() == [3, 3, 3]
