"""lowbit.numerics against ONNX Runtime, the official ONNX node tests and onnx's int4 packing (the TFLite integer
requantization reference is in tests/test_requantize.py).

Notes on exactness (checked with onnxruntime 1.32 on CPU):

* QuantizeLinear: ORT divides x by the float32 scale (MLAS `MlasDivideFloat32x4`, or `x / scale` in the
  per-axis / 16-bit / 4-bit paths), clamps to [qmin - zp, qmax - zp] and converts with round-half-to-even.
  That is exactly lowbit's `rint(float32(x / s)) + z` then clip, so outputs must be bit-identical.
* DequantizeLinear: ORT computes `float(int32(q) - zp) * scale`: one float32 multiply of an exactly
  representable integer (|q - zp| < 2**17), with no add after it, so there is nothing an FMA could fuse and
  the result is correctly rounded in both implementations. We therefore assert bitwise equality, not 1 ulp.
* int4/uint4: this ORT implements QuantizeLinear-21 / DequantizeLinear-21 for INT4/UINT4, but its Python
  binding cannot hand INT4 tensors to or from numpy ("No corresponding Numpy type for Tensor Type. Int4x2"),
  so the test graphs wrap the 4-bit tensors in Cast nodes (int8/uint8 <-> int4/uint4, exact for in-range
  values). The comparison is still against ORT's own 4-bit kernels, not the reference evaluator.
* NaN inputs are not compared: ORT's MLAS clamps NaN to qmin while the ONNX spec leaves it undefined for
  integer outputs; lowbit does not promise a value for NaN either.
"""

from __future__ import annotations

import functools
import warnings

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from lowbit.errors import LowbitError
from lowbit.numerics import (
    QTYPES,
    dequantize,
    pack_int4,
    qrange,
    quantize,
    scale_zero_point,
    unpack_int4,
)

DTYPES = ["uint8", "int8", "uint16", "int16", "uint4", "int4"]
FOUR_BIT = {"int4": (TensorProto.INT8, np.int8), "uint4": (TensorProto.UINT8, np.uint8)}
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------------------------
# ONNX Runtime single-node models
# --------------------------------------------------------------------------------------------------------


def _dims(rank: int) -> list[str]:
    return [f"d{i}" for i in range(rank)]


@functools.cache
def _ort_session(op: str, dtype: str, rank: int, axis: int | None, opset: int) -> ort.InferenceSession:
    """One QuantizeLinear or DequantizeLinear node with dynamic shapes; scale and zero point are graph inputs
    (scalars per tensor, 1-D per axis). 4-bit tensors go through Cast nodes, see the module docstring."""
    qt = QTYPES[dtype]
    io_type, _ = FOUR_BIT.get(dtype, (qt.onnx_dtype, qt.np_dtype))
    pshape = [] if axis is None else ["c"]
    attrs = {} if axis is None else {"axis": axis}
    nodes = []
    zp_in = "z"
    if dtype in FOUR_BIT:
        nodes.append(helper.make_node("Cast", ["z_io"], ["z"], to=qt.onnx_dtype))
        zp_in = "z_io"
    inputs = [
        helper.make_tensor_value_info("s", TensorProto.FLOAT, pshape),
        helper.make_tensor_value_info(zp_in, io_type, pshape),
    ]
    if op == "QuantizeLinear":
        inputs.insert(0, helper.make_tensor_value_info("x", TensorProto.FLOAT, _dims(rank)))
        if dtype in FOUR_BIT:
            nodes.append(helper.make_node(op, ["x", "s", "z"], ["y4"], **attrs))
            nodes.append(helper.make_node("Cast", ["y4"], ["y"], to=io_type))
        else:
            nodes.append(helper.make_node(op, ["x", "s", "z"], ["y"], **attrs))
        outputs = [helper.make_tensor_value_info("y", io_type, _dims(rank))]
    else:
        inputs.insert(0, helper.make_tensor_value_info("x" if dtype not in FOUR_BIT else "x_io", io_type, _dims(rank)))
        if dtype in FOUR_BIT:
            nodes.append(helper.make_node("Cast", ["x_io"], ["x"], to=qt.onnx_dtype))
        nodes.append(helper.make_node(op, ["x", "s", "z"], ["y"], **attrs))
        outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, _dims(rank))]
    graph = helper.make_graph(nodes, op, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _io(a: np.ndarray, dtype: str) -> np.ndarray:
    """How a quantized array is fed to / read from the test graph."""
    return np.asarray(a).astype(FOUR_BIT[dtype][1] if dtype in FOUR_BIT else QTYPES[dtype].np_dtype)


def ort_quantize(x, s, z, dtype, axis, opset):
    sess = _ort_session("QuantizeLinear", dtype, x.ndim, axis, opset)
    zp_name = "z_io" if dtype in FOUR_BIT else "z"
    return sess.run(None, {"x": x, "s": np.asarray(s, np.float32), zp_name: _io(z, dtype)})[0]


def ort_dequantize(q, s, z, dtype, axis, opset):
    sess = _ort_session("DequantizeLinear", dtype, q.ndim, axis, opset)
    zp_name, x_name = ("z_io", "x_io") if dtype in FOUR_BIT else ("z", "x")
    return sess.run(None, {x_name: _io(q, dtype), "s": np.asarray(s, np.float32), zp_name: _io(z, dtype)})[0]


# --------------------------------------------------------------------------------------------------------
# Hypothesis strategies
# --------------------------------------------------------------------------------------------------------


@st.composite
def layouts(draw):
    """(dtype, opset, shape, axis) with axis None (per tensor), 0 or 1, on a 2-D or 4-D tensor."""
    dtype = draw(st.sampled_from(DTYPES))
    opset = draw(st.sampled_from([13, 21])) if dtype in ("uint8", "int8") else 21
    rank = draw(st.sampled_from([2, 4]))
    hi = 6 if rank == 2 else 3
    shape = tuple(draw(st.lists(st.integers(1, hi), min_size=rank, max_size=rank)))
    axis = draw(st.sampled_from([None, 0, 1]))
    return dtype, opset, shape, axis


@st.composite
def quant_params(draw, dtype: str, channels: int | None):
    """Scale and zero point from lowbit.scale_zero_point on a random range (per channel if `channels`)."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = 1 if channels is None else channels
    log_mag = draw(st.floats(-6, 6))
    mag = 10.0 ** (log_mag + rng.uniform(-1, 1, n))
    neg_frac = draw(st.sampled_from([0.0, 1.0, None]))
    frac = rng.uniform(0, 1, n) if neg_frac is None else np.full(n, neg_frac)
    a = (-mag * frac).astype(np.float32)
    b = (mag * (1 - frac)).astype(np.float32)
    signed = QTYPES[dtype].signed
    symmetric = draw(st.booleans())
    narrow = signed and draw(st.booleans())
    reduce_range = draw(st.booleans())
    if channels is None:
        a, b = a[0], b[0]
    s, z = scale_zero_point(a, b, dtype, symmetric=symmetric, narrow=narrow, reduce_range=reduce_range)
    return np.asarray(s, np.float32), np.asarray(z)


def _full(p: np.ndarray, shape: tuple[int, ...], axis: int | None) -> np.ndarray:
    if axis is None:
        return np.broadcast_to(p, shape)
    bshape = [1] * len(shape)
    bshape[axis] = p.size
    return np.broadcast_to(p.reshape(bshape), shape)


def _make_x(rng: np.random.Generator, shape, s_full, z_full, dtype) -> np.ndarray:
    """Float inputs: in-range uniform, exact ties (k + 0.5) * s, exact multiples k * s, out of range, specials."""
    qmin, qmax = qrange(dtype)
    k = rng.integers(qmin - 3, qmax + 4, size=shape).astype(np.float64) - z_full
    lo = (qmin - z_full) * s_full.astype(np.float64)
    hi = (qmax - z_full) * s_full.astype(np.float64)
    span = hi - lo
    uniform = rng.uniform(lo - span, hi + span)
    ties = (k + 0.5) * s_full.astype(np.float64)
    multiples = k * s_full.astype(np.float64)
    specials = rng.choice(
        np.array([0.0, -0.0, 1e30, -1e30, 3.4e38, -3.4e38, np.inf, -np.inf, 1e-45, -1e-45, 1.0, -1.0, 0.5, -0.5]),
        size=shape,
    )
    which = rng.integers(0, 10, size=shape)
    with np.errstate(over="ignore"):
        x = np.select([which < 3, which < 7, which < 9], [uniform, ties, multiples], specials)
        return x.astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# 1. Property tests against ONNX Runtime
# --------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@SETTINGS
@given(data=st.data(), layout=layouts(), extra=st.floats(width=32, allow_nan=False))
def test_quantize_matches_onnxruntime(data, layout, extra):
    dtype, opset, shape, axis = layout
    s, z = data.draw(quant_params(dtype, None if axis is None else shape[axis]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    s_full = _full(s, shape, axis)
    z_full = _full(z.astype(np.int64), shape, axis)
    x = _make_x(rng, shape, s_full, z_full, dtype)
    x.flat[0] = extra  # hypothesis' own float32 edge cases (subnormals, huge values, +-0, inf)

    ours = quantize(x, s, z, dtype, axis=axis)
    theirs = ort_quantize(x, s, z, dtype, axis, opset)
    assert ours.dtype == QTYPES[dtype].np_dtype
    np.testing.assert_array_equal(ours.astype(np.int64), theirs.astype(np.int64))

    # Elementwise formula from the spec, in float64 after the float32 division (independent of lowbit).
    qmin, qmax = qrange(dtype)
    with np.errstate(over="ignore"):
        expect = np.clip(np.rint(x / s_full).astype(np.float64) + z_full, qmin, qmax)
    np.testing.assert_array_equal(ours.astype(np.float64), expect)


@SETTINGS
@given(data=st.data(), layout=layouts())
def test_dequantize_matches_onnxruntime_bitwise(data, layout):
    dtype, opset, shape, axis = layout
    s, z = data.draw(quant_params(dtype, None if axis is None else shape[axis]))
    qmin, qmax = qrange(dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    q = rng.integers(qmin, qmax + 1, size=shape).astype(QTYPES[dtype].np_dtype)
    q.flat[0] = qmin
    q.flat[-1] = qmax

    ours = dequantize(q, s, z, axis=axis)
    theirs = ort_dequantize(q, s, z, dtype, axis, opset)
    assert ours.dtype == np.float32 and theirs.dtype == np.float32
    np.testing.assert_array_equal(ours.view(np.int32), theirs.view(np.int32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_half_way_cases_round_to_even_like_onnxruntime(dtype):
    """Ties with a power-of-two scale are exact in float32, so these inputs really sit on .5 boundaries."""
    qmin, qmax = qrange(dtype)
    z = np.asarray(0 if QTYPES[dtype].signed else qmin + 3, QTYPES[dtype].np_dtype)
    s = np.float32(0.25)
    k = np.arange(qmin - 4, qmax + 4, max(1, (qmax - qmin) // 200), dtype=np.float64) - int(z)
    x = ((k + 0.5) * 0.25).astype(np.float32).reshape(1, -1)
    assert np.all((x / s) % 1 == 0.5)
    ours = quantize(x, s, z, dtype)
    np.testing.assert_array_equal(ours, ort_quantize(x, s, z, dtype, None, 21).astype(ours.dtype))
    inside = (k + int(z) >= qmin) & (k + 1 + int(z) <= qmax)
    even = np.where(k % 2 == 0, k, k + 1) + int(z)
    np.testing.assert_array_equal(ours.ravel()[inside], even[inside])
    small = quantize(np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], np.float32), 1.0, z, dtype).astype(np.int64)
    expect = np.clip(np.array([0, 2, 2, 0, -2, -2]) + int(z), qmin, qmax)
    np.testing.assert_array_equal(small, expect)


def test_per_axis_default_is_not_last_axis():
    """Per-channel parameters follow the requested axis, not numpy's trailing-axis broadcast."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = np.array([1.0, 2.0, 4.0], np.float32)
    z = np.array([0, 10, 20], np.uint8)
    q = quantize(x, s, z, "uint8", axis=0)
    np.testing.assert_array_equal(q, ort_quantize(x, s, z, "uint8", 0, 13))
    np.testing.assert_array_equal(q[2], np.rint(x[2] / 4) + 20)
    x4 = np.broadcast_to(s.reshape(1, 3, 1, 1) * np.arange(0, 4, dtype=np.float32).reshape(1, 1, 2, 2), (2, 3, 2, 2))
    np.testing.assert_array_equal(dequantize(quantize(x4, s, z, "uint8", axis=1), s, z, axis=1), x4)


# --------------------------------------------------------------------------------------------------------
# 2. Official ONNX node tests
# --------------------------------------------------------------------------------------------------------

# The wheel does not ship backend/test/data/node (no test_data_set_*/*.pb on disk), but
# load_model_tests(kind="node") regenerates every node case in memory: the same ModelProto and the same
# input/output arrays (TensorProto for sub-byte types) the .pb files hold. If the files exist, use them.
LOWBIT_ONNX_TYPES = {q.onnx_dtype: name for name, q in QTYPES.items() if name != "int32"}
NODE_SKIPS: dict[str, str] = {}


def _to_numpy(v):
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    return np.asarray(v)


def _case_data(case):
    import glob
    import os

    if case.model_dir and os.path.isdir(case.model_dir):
        model = onnx.load(os.path.join(case.model_dir, "model.onnx"))
        sets = []
        for d in sorted(glob.glob(os.path.join(case.model_dir, "test_data_set_*"))):
            load = lambda p: onnx.load_tensor(p)  # noqa: E731
            ins = [load(p) for p in sorted(glob.glob(os.path.join(d, "input_*.pb")))]
            outs = [load(p) for p in sorted(glob.glob(os.path.join(d, "output_*.pb")))]
            sets.append((ins, outs))
        return model, sets
    return case.model, case.data_sets


@functools.lru_cache(maxsize=1)
def _node_cases():
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generators trip numpy overflow warnings in unrelated ops
        cases = load_model_tests(kind="node")
    return [c for c in cases if c.name.startswith(("test_quantizelinear", "test_dequantizelinear"))]


def _run_node_case(case) -> str:
    """'ran', or why the case is out of lowbit's scope."""
    model, data_sets = _case_data(case)
    (node,) = model.graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.output)}
    qname = node.input[0] if node.op_type == "DequantizeLinear" else node.output[0]
    qtype_id = types[qname]
    # float8 / float4 / int2 / uint2 quantized types (and QuantizeLinear's `saturate`, which only applies to
    # float8) are outside lowbit's integer scope: filter them by the quantized tensor's dtype.
    if qtype_id not in LOWBIT_ONNX_TYPES:
        return f"quantized type {TensorProto.DataType.Name(qtype_id)} is not an integer type lowbit supports"
    if attrs.get("block_size", 0) > 0:
        return f"blocked quantization (block_size={attrs['block_size']}) is not implemented in lowbit"
    dtype = LOWBIT_ONNX_TYPES[qtype_id]
    assert data_sets, case.name
    for inputs, outputs in data_sets:
        ins = [_to_numpy(v) for v in inputs]
        (expected,) = [_to_numpy(v) for v in outputs]
        x, scale = ins[0], np.asarray(ins[1], np.float32)
        zp = ins[2].astype(np.int64) if len(ins) > 2 else np.zeros(scale.shape, np.int64)
        axis = attrs.get("axis", 1) if scale.ndim == 1 else None  # ONNX: 1-D scale = per axis, default axis 1
        if node.op_type == "QuantizeLinear":
            got = quantize(x.astype(np.float32), scale, zp, dtype, axis=axis)
            np.testing.assert_array_equal(got.astype(np.int64), expected.astype(np.int64), err_msg=case.name)
        else:
            got = dequantize(x.astype(np.int64).astype(QTYPES[dtype].np_dtype), scale, zp, axis=axis)
            assert got.dtype == expected.dtype == np.float32, case.name
            np.testing.assert_array_equal(got.view(np.int32), expected.view(np.int32), err_msg=case.name)
    return "ran"


def test_official_onnx_node_tests():
    cases = _node_cases()
    ran, skipped = [], {}
    for case in cases:
        outcome = _run_node_case(case)
        if outcome == "ran":
            ran.append(case.name)
        else:
            skipped[case.name] = outcome
    print(f"\nONNX node tests run against lowbit: {len(ran)} ({', '.join(ran)})")
    for name, why in skipped.items():
        print(f"  not applicable: {name}: {why}")
    assert len(ran) > 5
    for name in (
        "test_quantizelinear",
        "test_quantizelinear_axis",
        "test_dequantizelinear",
        "test_dequantizelinear_axis",
        "test_quantizelinear_int16",
        "test_dequantizelinear_uint16",
        "test_quantizelinear_int4",
    ):
        assert name in ran, name
    # Only float8/float4/int2/blocked cases may be left out.
    assert all("blocked" in n or any(t in n for t in ("e4m3", "e5m2", "float4", "int2")) for n in skipped), skipped


# --------------------------------------------------------------------------------------------------------
# 3. scale_zero_point
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    a=st.floats(float(np.float32(-3e38)), 0, width=32).map(float),
    b=st.floats(0, float(np.float32(3e38)), width=32).map(float),
    symmetric=st.booleans(),
    reduce_range=st.booleans(),
)
def test_zero_is_exactly_representable(dtype, a, b, symmetric, reduce_range):
    s, z = scale_zero_point(a, b, dtype, symmetric, reduce_range=reduce_range)
    qmin, qmax = qrange(dtype, reduce_range=reduce_range)
    assert s.dtype == np.float32 and np.isfinite(s) and s > 0
    assert z.dtype == QTYPES[dtype].np_dtype and qmin <= int(z) <= qmax
    assert quantize(np.float32(0.0), s, z, dtype) == z
    assert quantize(np.float32(-0.0), s, z, dtype) == z
    assert dequantize(z, s, z) == 0.0
    # The observed range is covered: its ends quantize to the ends of the integer range, within one step
    # (ranges narrower than float32's smallest normal scale cannot spread over the integers at all).
    if max(-a, b) < 1e-30:
        return
    lo, hi = quantize(np.array([a, b], np.float32), s, z, dtype).astype(np.int64)
    if symmetric:
        assert (lo <= qmin + 1) if -a >= b else (hi >= qmax - 1)
    else:
        assert (a == 0 or lo <= qmin + 1) and (b == 0 or hi >= qmax - 1)


@settings(max_examples=100, deadline=None)
@given(dtype=st.sampled_from(DTYPES), a=st.floats(-1e4, -1e-3), b=st.floats(1e-3, 1e4), seed=st.integers(0, 2**32 - 1))
def test_round_trip_error_within_half_a_step(dtype, a, b, seed):
    s, z = scale_zero_point(a, b, dtype, symmetric=False)
    lo, hi = dequantize(np.array(qrange(dtype)), s, z)
    x = np.random.default_rng(seed).uniform(lo, hi, 64).astype(np.float32)
    y = dequantize(quantize(x, s, z, dtype), s, z).astype(np.float64)
    err = np.abs(y - x)
    # Half a step from rounding, plus float32 rounding of the division and of the product.
    assert np.all(err <= 0.5 * float(s) + 2.5e-7 * (np.abs(x) + np.abs(y))), (err.max(), s)


@pytest.mark.parametrize(
    "dtype, symmetric, narrow, reduce_range, expect_zp, expect_range",
    [
        ("int8", True, False, False, 0, (-128, 127)),
        ("uint8", True, False, False, 128, (0, 255)),
        ("int8", True, True, False, 0, (-127, 127)),
        ("int8", True, False, True, 0, (-64, 63)),
        ("int8", True, True, True, 0, (-63, 63)),
        ("uint8", True, False, True, 64, (0, 127)),
        ("int16", True, False, False, 0, (-32768, 32767)),
        ("uint16", True, False, False, 32768, (0, 65535)),
        ("int4", True, False, False, 0, (-8, 7)),
        ("uint4", True, False, False, 8, (0, 15)),
    ],
)
def test_symmetric_zero_points_and_ranges(dtype, symmetric, narrow, reduce_range, expect_zp, expect_range):
    assert qrange(dtype, narrow=narrow, reduce_range=reduce_range) == expect_range
    qmin, qmax = expect_range
    s, z = scale_zero_point(-3.0, 1.5, dtype, symmetric, narrow=narrow, reduce_range=reduce_range)
    assert int(z) == expect_zp
    assert s == np.float32(3.0 / ((qmax - qmin) / 2.0))
    # The larger magnitude maps to the end of the range: -3 -> qmin for a full/narrow signed range.
    assert qmin <= int(quantize(np.float32(-3.0), s, z, dtype)) <= qmin + 1


def test_qrange_values_and_errors():
    assert qrange("int8") == (-128, 127)
    assert qrange("uint8") == (0, 255)
    assert qrange("int8", narrow=True) == (-127, 127)
    assert qrange("uint8", reduce_range=True) == (0, 127)
    assert qrange("int8", reduce_range=True) == (-64, 63)
    assert qrange("int16", reduce_range=True) == (-16384, 16383)
    assert qrange("int4", narrow=True) == (-7, 7)
    with pytest.raises(LowbitError, match="uint8"):
        qrange("uint8", narrow=True)
    with pytest.raises(LowbitError, match="int3"):
        qrange("int3")


def test_asymmetric_exact_values():
    s, z = scale_zero_point(-1.0, 3.0, "uint8", symmetric=False)
    assert s == np.float32(4.0 / 255) and int(z) == 64  # rint(1 / (4/255)) = rint(63.75)
    s, z = scale_zero_point(0.5, 2.0, "uint8", symmetric=False)  # range is widened to include 0
    assert s == np.float32(2.0 / 255) and int(z) == 0
    s, z = scale_zero_point(-2.0, -0.5, "int8", symmetric=False)
    assert s == np.float32(2.0 / 255) and int(z) == 127
    s, z = scale_zero_point(-1.1, 3.0, "uint8", symmetric=False)  # 1.1 / (4.1/255) = 68.41: nearest, not floor
    assert int(z) == 68


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(DTYPES), a=st.floats(-1e6, -1e-6), b=st.floats(1e-6, 1e6))
def test_asymmetric_zero_point_is_nearest(dtype, a, b):
    """The zero point is the nearest integer: the range's ends land within half a step of the grid ends."""
    s, z = scale_zero_point(a, b, dtype, symmetric=False)
    qmin, qmax = qrange(dtype)
    step = float(s)
    assert abs((qmin - int(z)) * step - a) <= 0.5 * step * (1 + 1e-6) + abs(a) * 1e-6
    assert abs((qmax - int(z)) * step - b) <= 0.5 * step * (1 + 1e-6) + abs(b) * 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_all_zero_range_gives_finite_positive_scale(dtype, symmetric):
    s, z = scale_zero_point(0.0, 0.0, dtype, symmetric)
    assert np.isfinite(s) and s > 0
    assert quantize(np.zeros(3, np.float32), s, z, dtype).tolist() == [int(z)] * 3
    s, z = scale_zero_point(np.zeros(4), np.zeros(4), dtype, symmetric)
    assert s.shape == (4,) and np.all(np.isfinite(s)) and np.all(s > 0)


@pytest.mark.parametrize(
    "a, b", [(np.nan, 1.0), (-1.0, np.nan), (-np.inf, 1.0), (0.0, np.inf), ([-1.0, np.nan], [1.0, 2.0])]
)
def test_non_finite_range_raises(a, b):
    with pytest.raises(LowbitError, match="NaN or infinite"):
        scale_zero_point(a, b, "uint8", symmetric=False)
    with pytest.raises(LowbitError):
        scale_zero_point(a, b, "int8", symmetric=True)


@settings(max_examples=50, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    symmetric=st.booleans(),
    a=st.lists(st.floats(-1e3, 0), min_size=1, max_size=8),
    data=st.data(),
)
def test_per_channel_arrays_match_per_tensor_calls(dtype, symmetric, a, data):
    b = data.draw(st.lists(st.floats(0, 1e3), min_size=len(a), max_size=len(a)))
    s, z = scale_zero_point(np.array(a), np.array(b), dtype, symmetric)
    assert s.shape == z.shape == (len(a),)
    for i in range(len(a)):
        si, zi = scale_zero_point(a[i], b[i], dtype, symmetric)
        assert s[i] == si and z[i] == zi
    x = np.zeros((2, len(a), 3), np.float32)
    np.testing.assert_array_equal(quantize(x, s, z, dtype, axis=1), np.broadcast_to(z.reshape(1, -1, 1), x.shape))


# --------------------------------------------------------------------------------------------------------
# 4. int4 packing
# --------------------------------------------------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(signed=st.booleans(), n=st.integers(0, 41), seed=st.integers(0, 2**32 - 1))
def test_pack_int4_round_trip_and_matches_onnx(signed, n, seed):
    lo, hi = (-8, 7) if signed else (0, 15)
    rng = np.random.default_rng(seed)
    q = rng.integers(lo, hi + 1, n).astype(np.int8 if signed else np.uint8)
    packed = pack_int4(q)
    assert packed.dtype == np.uint8 and packed.shape == ((n + 1) // 2,)
    np.testing.assert_array_equal(unpack_int4(packed, n, signed=signed), q)
    if n % 2:
        assert packed[-1] >> 4 == 0  # the padding nibble is zero, as ONNX writes it

    # onnx's own packing, through both public routes: make_tensor(INT4/UINT4) and numpy_helper.from_array.
    onnx_type = TensorProto.INT4 if signed else TensorProto.UINT4
    t = helper.make_tensor("t", onnx_type, [n], q.tolist(), raw=False)
    assert bytes(np.asarray(t.int32_data, np.int64).astype(np.uint8)) == packed.tobytes()
    t2 = numpy_helper.from_array(q.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4), "t2")
    assert t2.raw_data == packed.tobytes()
    # ...and onnx unpacks lowbit's bytes to the same values.
    t3 = helper.make_tensor("t3", onnx_type, [n], packed.tobytes(), raw=True)
    np.testing.assert_array_equal(numpy_helper.to_array(t3).astype(np.int64), q.astype(np.int64))


def test_pack_int4_layout_and_2d():
    assert pack_int4(np.array([1, 2, 3], np.int8)).tolist() == [0x21, 0x03]
    assert pack_int4(np.array([-8, -1], np.int8)).tolist() == [0xF8]
    q = np.array([[-8, 7, 0], [1, -1, 3]], np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(q), q.size).reshape(q.shape), q)
    np.testing.assert_array_equal(unpack_int4(np.array([0xF8], np.uint8), 2, signed=False), [8, 15])
