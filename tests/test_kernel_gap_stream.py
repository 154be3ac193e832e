"""The kernel-gap pass compares batch by batch (exact integer sums) and the check reuses its runs: the same report,
bit for bit, as comparing the whole concatenation, and the same check as running the simulation on its own."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import lowbit.evaluate.check as check_mod
from lowbit.evaluate.check import runtime_check
from lowbit.evaluate.jsonable import jsonable
from lowbit.evaluate.kernel_gap import _Agreement, _cosine, locate
from test_kernel_gap import _requantized

_TYPES = {"uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767)}


def _whole(ks: list[np.ndarray], ss: list[np.ndarray], zp: np.ndarray | None) -> tuple[float, int]:
    """The definition: cosine (and max steps apart) of the whole concatenation in float64, as locate had it."""
    k = np.concatenate([x.ravel() for x in ks]).astype(np.float64)
    s = np.concatenate([x.ravel() for x in ss]).astype(np.float64)
    if zp is not None and zp.size == 1:
        k, s = k - float(zp), s - float(zp)
    return _cosine(k, s), int(np.max(np.abs(k - s))) if zp is not None and k.size else -1


@st.composite
def _pairs(draw):
    dtype = draw(st.sampled_from(sorted(_TYPES)))
    lo, hi = _TYPES[dtype]
    zp_kind = draw(st.sampled_from(["scalar", "per-channel", "none"]))
    zp = {
        "scalar": np.array(draw(st.integers(lo, hi)), dtype),
        "per-channel": np.array([draw(st.integers(lo, hi)) for _ in range(3)], dtype),
        "none": None,
    }[zp_kind]
    ks, ss = [], []
    for _ in range(draw(st.integers(1, 3))):
        n = draw(st.integers(0, 600))  # across the float32 rows of 256 and their tail
        seed = draw(st.integers(0, 2**16))
        r = np.random.default_rng(seed)
        k = r.integers(lo, hi, n, endpoint=True).astype(dtype)
        how = draw(st.sampled_from(["same", "near", "random", "zero point"]))
        if how == "same":
            s = k.copy()
        elif how == "near":
            s = np.clip(k.astype(np.int64) + r.integers(-2, 3, n), lo, hi).astype(dtype)
        elif how == "random":
            s = r.integers(lo, hi, n, endpoint=True).astype(dtype)
        else:  # every value at the zero point: a zero vector once centered
            z = zp.item() if zp is not None and zp.size == 1 else 0
            k, s = np.full(n, z, dtype), np.full(n, z, dtype)
        ks.append(k.reshape(1, -1))
        ss.append(s.reshape(1, -1))
    return ks, ss, zp


@settings(max_examples=300, deadline=None)
@given(_pairs())
def test_batch_by_batch_equals_the_whole_concatenation_bit_for_bit(case) -> None:
    ks, ss, zp = case
    a = _Agreement(zp)
    for k, s in zip(ks, ss):
        a.add(k, s)
    cos, diff = _whole(ks, ss, zp)
    assert a.cosine() == cos  # exact: the sums are integers below 2**53
    assert a.diff == diff


def test_float_tensors_are_compared_whole() -> None:
    r = np.random.default_rng(0)
    ks = [r.standard_normal((2, 5)).astype(np.float32) for _ in range(3)]
    ss = [k + np.float32(0.01) * r.standard_normal(k.shape).astype(np.float32) for k in ks]
    a = _Agreement(None)
    for k, s in zip(ks, ss):
        a.add(k, s)
    assert a.cosine() == _whole(ks, ss, None)[0]


def _relu() -> object:
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (4, 64))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (4, 64))],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _data(n: int) -> list[dict[str, np.ndarray]]:
    return [{"x": np.random.default_rng(i).normal(0, 1, (4, 64)).astype(np.float32)} for i in range(n)]


@pytest.mark.parametrize("batches", [2, 5])
def test_the_check_names_the_gap_as_locate_does(monkeypatch, batches: int) -> None:
    """5 batches of 4: the first 8 samples part, so the gap pass simulates the rest; 2 batches: those 8 are all
    there is, so the pass runs after the check. Either way the check itself is what it is without the pass."""
    q, data = _requantized(), _data(batches)
    passes: list[int] = []
    real = check_mod.compare
    monkeypatch.setattr(check_mod, "compare", lambda *a, **k: passes.append(1) or real(*a, **k))
    with_gap = runtime_check(_relu(), q, data, locate_gap=True)
    assert passes == ([1] if batches == 5 else [])  # which way was really taken
    plain = runtime_check(_relu(), q, data)
    assert with_gap["kernels_vs_simulation"]["cosine"] < 0.999 and with_gap["simulate_samples"] == 4 * batches
    gap = with_gap.pop("kernel_gap")
    assert with_gap == plain
    assert gap == jsonable(locate(q, data))
    assert gap["first"]["node"] == "relu"


def test_a_check_whose_kernels_agree_names_no_gap() -> None:
    import lowbit
    from test_kernel_gap import _batches, _conv_net

    m = _conv_net()
    q = lowbit.quantize(m, calib=_batches(), progress=False).model
    result = runtime_check(m, q, _batches(4, seed=5), locate_gap=True)
    assert result["kernels_vs_simulation"]["cosine"] >= 0.999
    assert "kernel_gap" not in result


def test_locate_given_the_kernels_output_says_the_same() -> None:
    from lowbit.runtimes.ort import run_all, session

    q, data = _requantized(), _data(3)
    kernels = run_all(session(q, "kernels"), data)[0]
    assert locate(q, data, kernels=kernels) == locate(q, data)
