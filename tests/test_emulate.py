"""The non-VNNI AVX2 emulator: exact against ORT without saturation, clips pairs like vpmaddubsw with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import model, node, run, samples, weight
from lowbit.runtimes.avx2 import im2col_nhwc, u8s8_matmul_avx2
from lowbit.runtimes.emulate import _u8s8, run_emulated, saturation_report

NO_GUARD = lowbit.Recipe(default=lowbit.Scheme(avoid_overflow=False))


def conv_net() -> onnx.ModelProto:
    """Regular, depthwise and two 1x1 convs, Add, GlobalAveragePool, Flatten, Gemm."""
    w1 = weight((8, 3, 3, 3), 1)
    w1[0, :2, 0, 0] = [2.0, 1.9]  # adjacent in kernel order: a pair that can clip without the guard
    nodes = [
        node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8, strides=[2, 2]),
        node("Relu", ["c2"], ["r2"]),
        node("Conv", ["r2", "w3", "b3"], ["c3"]),
        node("Conv", ["r2", "w4", "b4"], ["c4"]),
        node("Relu", ["c4"], ["r4"]),  # two branches, not one conv: summed convs of one input would merge
        node("Add", ["c3", "r4"], ["a"]),
        node("GlobalAveragePool", ["a"], ["g"]),
        node("Flatten", ["g"], ["f"]),
        node("Gemm", ["f", "w5", "b5"], ["y"], transB=1),
    ]
    inits = dict(
        w1=w1,
        b1=weight((8,), 2),
        w2=weight((8, 1, 3, 3), 3),
        b2=weight((8,), 4),
        w3=weight((12, 8, 1, 1), 5),
        b3=weight((12,), 6),
        w4=weight((12, 8, 1, 1), 7),
        b4=weight((12,), 8),
        w5=weight((5, 12), 9),
        b5=weight((5,), 10),
    )
    return model(nodes, {"x": (1, 3, 10, 10)}, {"y": (1, 5)}, inits)


def ort_quantized(m: onnx.ModelProto, tmp_path: Path, per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(samples(m))

        def get_next(self) -> dict | None:
            return next(self.it, None)

    out = tmp_path / "ort_q.onnx"
    quantize_static(
        m,
        out,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=per_channel,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return onnx.load(out)


def output_step(m: onnx.ModelProto) -> float:
    """The output's quantization step; for a float output (lowbit keeps a Gemm's model output float),
    the step of the Gemm's input times its largest weight scale, what one input step moves an output by."""
    last = next(n for n in m.graph.node if m.graph.output[0].name in n.output)
    scale = lambda name: float(np.max(next(numpy_helper.to_array(t) for t in m.graph.initializer if t.name == name)))  # noqa: E731
    if last.op_type == "DequantizeLinear":
        return scale(last.input[1])
    dqs = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    return scale(dqs[last.input[0]].input[1]) * scale(dqs[last.input[1]].input[1]) * 128


@pytest.mark.parametrize("source", ["lowbit", "ort", "ort_per_channel"])
def test_without_saturation_matches_ort(source: str, tmp_path: Path) -> None:
    m = conv_net()
    if source == "lowbit":
        q = lowbit.quantize(m, calib=samples(m), recipe=NO_GUARD, progress=False).model
    else:
        q = ort_quantized(m, tmp_path, per_channel=source == "ort_per_channel")
    assert len(saturation_report(q, samples(q, 1))) == 5  # every conv and the Gemm take the integer path
    feeds = samples(q, 8, seed=5)
    emu = np.concatenate([run_emulated(q, f, saturate=False)[0] for f in feeds])
    sim = run(q, feeds, "simulate")[0]
    kernels = run(q, feeds, "kernels")[0]
    np.testing.assert_allclose(emu, sim, rtol=1e-4, atol=1e-4 * np.abs(sim).max())
    assert np.abs(emu - kernels).max() <= output_step(q) * 1.001


def test_pair_sums_clip_like_the_avx2_kernel() -> None:
    r = np.random.default_rng(0)
    a = np.where(r.random((300, 37)) < 0.6, 255, r.integers(0, 256, (300, 37))).astype(np.uint8)
    w = np.where(r.random((9, 37)) < 0.5, r.choice([-127, 127], (9, 37)), r.integers(-128, 128, (9, 37))).astype(
        np.int8
    )
    za, zw = 17, r.integers(-3, 4, 9)
    correction = za * w.sum(1, dtype=np.int64)[None] + zw[None] * a.sum(1, dtype=np.int64)[:, None] - 37 * za * zw[None]
    saturated = u8s8_matmul_avx2(a, w) - correction
    exact = (a.astype(np.int64) - za) @ (w.astype(np.int64) - zw[:, None]).T
    assert not np.array_equal(saturated, exact)
    np.testing.assert_array_equal(_u8s8(a, za, w, zw, True, None), saturated)
    np.testing.assert_array_equal(_u8s8(a, za, w, zw, False, None), exact)


def qdq_conv(w_q: np.ndarray, w_s: np.ndarray, x_shape: tuple, x_zp: int, **attrs: object) -> onnx.ModelProto:
    """x -> Q(scale 1, zp x_zp) -> DQ -> Conv(DQ(int8 w_q)) -> y, float output so nothing hides the accumulator."""
    inits = [
        numpy_helper.from_array(a, n)
        for n, a in [
            ("xs", np.array(1.0, np.float32)),
            ("xz", np.array(x_zp, np.uint8)),
            ("wq", w_q.astype(np.int8)),
            ("ws", w_s.astype(np.float32)),
            ("wz", np.zeros(len(w_s), np.int8)),
        ]
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="wdq", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv", **attrs),
    ]
    g = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_adjacent_127_weights_on_255_inputs_clip_to_int16() -> None:
    w = np.zeros((2, 4, 1, 1))
    w[0, :, 0, 0] = [127, 127, 0, 0]  # pair (c0, c1): 255 * 254 = 64770 -> 32767
    w[1, :, 0, 0] = [127, -127, 127, 0]  # no pair leaves int16
    s = np.array([0.01, 0.02])
    m = qdq_conv(w, s, (1, 4, 3, 3), 0)
    feed = {"x": np.full((1, 4, 3, 3), 255.0, np.float32)}
    exact = run_emulated(m, feed, saturate=False)[0]
    clipped = run_emulated(m, feed)[0]
    np.testing.assert_allclose(exact[0, 0], 255 * 254 * 0.01, rtol=1e-6)
    np.testing.assert_allclose(clipped[0, 0], 32767 * 0.01, rtol=1e-6)
    np.testing.assert_array_equal(clipped[0, 1], exact[0, 1])
    np.testing.assert_allclose(exact, run(m, [feed])[0], rtol=1e-5)
    assert saturation_report(m, feed) == {
        "conv": {"pairs_total": 9 * 2 * 2, "pairs_saturated": 9, "outputs_affected": 9}
    }


def test_padding_is_the_zero_point_and_can_clip() -> None:
    """A real zero is uint8 200 here: every pair of 127s over it clips, in the padding too, so the clipped
    result is the same at the borders as in the middle while the exact one is zero everywhere."""
    w = np.zeros((2, 2, 3, 3))
    w[0] = 127
    w[1, 0] = 1
    m = qdq_conv(w, np.array([0.5, 0.5]), (1, 2, 4, 4), 200, pads=[1, 1, 1, 1])
    feed = {"x": np.zeros((1, 2, 4, 4), np.float32)}
    np.testing.assert_array_equal(run_emulated(m, feed, saturate=False)[0], 0)
    np.testing.assert_allclose(run_emulated(m, feed)[0][0, 0], 9 * (32767 - 200 * 254) * 0.5)
    np.testing.assert_array_equal(run_emulated(m, feed)[0][0, 1], 0)
    assert saturation_report(m, feed)["conv"]["pairs_saturated"] == 16 * 9


@pytest.mark.parametrize("group,stride", [(1, 1), (2, 2)])
def test_conv_is_the_avx2_kernel_in_kernel_order(group: int, stride: int) -> None:
    r = np.random.default_rng(group)
    c, m_out, zp = 6, 4, 30
    w = np.where(r.random((m_out, c // group, 3, 3)) < 0.4, 127, r.integers(-127, 128, (m_out, c // group, 3, 3)))
    s = r.uniform(0.01, 0.02, m_out)
    m = qdq_conv(w, s, (1, c, 7, 7), zp, pads=[1, 1, 1, 1], group=group, strides=[stride, stride])
    xq = r.integers(150, 256, (1, c, 7, 7)).astype(np.uint8)
    got = run_emulated(m, {"x": xq.astype(np.float32) - zp})[0]
    cg, mg = c // group, m_out // group
    for g in range(group):
        cols = im2col_nhwc(xq[:, g * cg : (g + 1) * cg], 3, 3, (1, 1, 1, 1), pad_value=zp)
        rows = np.moveaxis(w[g * mg : (g + 1) * mg], 1, -1).reshape(mg, -1).astype(np.int8)
        acc = u8s8_matmul_avx2(cols, rows) - zp * rows.sum(1, dtype=np.int64)
        want = (acc * s[g * mg : (g + 1) * mg]).T.reshape(mg, 7, 7)[:, ::stride, ::stride]
        np.testing.assert_allclose(got[0, g * mg : (g + 1) * mg], want, rtol=1e-6)
    assert saturation_report(m, {"x": xq.astype(np.float32) - zp})["conv"]["pairs_saturated"] > 0


def test_depthwise_convs_never_saturate() -> None:
    w = np.full((4, 1, 3, 3), 127)
    m = qdq_conv(w, np.full(4, 0.01), (1, 4, 5, 5), 0, pads=[1, 1, 1, 1], group=4)
    feed = {"x": np.full((1, 4, 5, 5), 255.0, np.float32)}
    np.testing.assert_array_equal(run_emulated(m, feed)[0], run_emulated(m, feed, saturate=False)[0])
    np.testing.assert_allclose(run_emulated(m, feed)[0], run(m, [feed])[0], rtol=1e-5)
    assert saturation_report(m, feed)["conv"] == {"pairs_total": 0, "pairs_saturated": 0, "outputs_affected": 0}


def test_matmul_with_3d_activations_saturates() -> None:
    w = np.zeros((6, 3), np.float32)
    w[0:2, 0] = 1.0  # both rows of a pair at full scale
    w[2:, 1:] = np.abs(weight((4, 2), 3)) * np.array([1, -1, 1, -1])[:, None]  # opposite signs in each pair
    m = model([node("MatMul", ["x", "w"], ["y"])], {"x": (2, 5, 6)}, {"y": (2, 5, 3)}, {"w": w})
    cal = [{"x": np.abs(f["x"])} for f in samples(m)]
    q = lowbit.quantize(m, calib=cal, recipe=NO_GUARD, progress=False).model
    feed = {"x": np.ones((2, 5, 6), np.float32)}
    exact, clipped = run_emulated(q, feed, saturate=False)[0], run_emulated(q, feed)[0]
    assert clipped.shape == (2, 5, 3)
    assert (clipped[..., 0] < exact[..., 0] - 0.3).all()
    np.testing.assert_allclose(clipped[..., 1:], exact[..., 1:])
    report = saturation_report(q, feed)
    assert [v["pairs_saturated"] for v in report.values()] == [10]


def test_overflow_guard_prevents_saturation() -> None:
    m = conv_net()
    calib = samples(m)
    guarded = lowbit.quantize(m, calib=calib, progress=False).model
    report = saturation_report(guarded, calib)
    assert sum(v["pairs_total"] for v in report.values()) > 0
    assert all(v["pairs_saturated"] == 0 for v in report.values())

    unguarded = lowbit.quantize(m, calib=calib, recipe=NO_GUARD, progress=False).model
    large = [{"x": np.ones((1, 3, 10, 10), np.float32)}, {"x": -np.ones((1, 3, 10, 10), np.float32)}]
    report = saturation_report(unguarded, large)
    assert report["Conv_c1"]["pairs_saturated"] > 0
    assert report["Conv_c1"]["outputs_affected"] > 0
