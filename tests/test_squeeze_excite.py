"""A squeeze-excitation block's mean shares its input's scale; a classifier head's mean keeps its own range.

The SE pool's own calibrated range is a maximum over one value per channel per calibration sample, so images unlike
the calibration ones go past it and their gates saturate for the whole feature map (MobileNetV3-Large's photos:
bench/RESULTS_CORPUS.md, eighth session). A mean never leaves its input's range, so sharing it never clips.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from helpers import model, node, nodes_of, output_qparams, quantize, samples, weight
from lowbit.decide import TIE_NUDGE
from lowbit.ops.pooling import squeeze_excitation
from lowbit.runtimes.ort import session

C = 8


def _se_model(head: bool = False, gate_first: bool = True) -> onnx.ModelProto:
    """x -> Conv -> Relu -> SE (GlobalAveragePool -> Conv -> Relu -> Conv -> HardSigmoid -> Mul) -> Conv; with
    `head`, a classifier head (GlobalAveragePool -> Flatten -> Gemm) reads the block's output instead."""
    mul_in = ["g", "r"] if gate_first else ["r", "g"]
    nodes = [
        node("Conv", ["x", "w0", "b0"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"], name="relu"),
        node("GlobalAveragePool", ["r"], ["p"], name="se_pool"),
        node("Conv", ["p", "w1", "b1"], ["f1"], name="fc1"),
        node("Relu", ["f1"], ["f1r"], name="fc1_relu"),
        node("Conv", ["f1r", "w2", "b2"], ["f2"], name="fc2"),
        node("HardSigmoid", ["f2"], ["g"], name="gate", alpha=1 / 6),
        node("Mul", mul_in, ["s"], name="excite"),
    ]
    inits = {
        "w0": weight((C, 3, 3, 3), 1),
        "b0": np.zeros(C, np.float32),
        "w1": weight((4, C, 1, 1), 2),
        "b1": np.zeros(4, np.float32),
        "w2": weight((C, 4, 1, 1), 3, scale=1.0),
        "b2": np.zeros(C, np.float32),
    }
    if head:
        nodes += [
            node("GlobalAveragePool", ["s"], ["hp"], name="head_pool"),
            node("Flatten", ["hp"], ["hf"], name="flatten"),
            node("Gemm", ["hf", "wh", "bh"], ["y"], name="fc", transB=1),
        ]
        inits |= {"wh": weight((10, C), 4), "bh": np.zeros(10, np.float32)}
        return model(nodes, {"x": (1, 3, 8, 8)}, {"y": (1, 10)}, inits)
    nodes.append(node("Conv", ["s", "w3", "b3"], ["y"], name="project"))
    inits |= {"w3": weight((C, C, 1, 1), 5), "b3": np.zeros(C, np.float32)}
    return model(nodes, {"x": (1, 3, 8, 8)}, {"y": (1, C, 8, 8)}, inits)


def _qparams(q: onnx.ModelProto, name: str) -> tuple[float, int]:
    n = next(n for n in q.graph.node if n.name == name)
    s, z = output_qparams(q, n)
    return float(s), int(z)


@pytest.mark.parametrize("gate_first", [True, False])
def test_the_se_pool_takes_its_inputs_range(gate_first: bool) -> None:
    res = quantize(_se_model(gate_first=gate_first))
    q = res.model
    pool = next(n for n in q.graph.node if n.op_type == "GlobalAveragePool")
    (conv,) = [n for n in q.graph.node if n.op_type == "Conv" and n.output[0] == "r"]  # the Relu folded into it
    (s_pool, z_pool), (s_in, z_in) = _qparams(q, pool.name), _qparams(q, conv.name)
    assert z_pool == z_in
    assert s_pool == pytest.approx(s_in * (1 + TIE_NUDGE), rel=2e-7)  # float32 scales: 6e-8 apart at most
    assert res.plan.nodes["se_pool"].code.value == "shares_scale"


def test_kernels_round_the_se_mean_as_the_simulation_does() -> None:
    """A mean of 64 integers on its input's exact scale can land on an exact half, which ONNX Runtime's
    QLinearGlobalAveragePool and the float simulation round differently (87 of these 256 channels measured at
    equal scales); with lowbit's scales they agree."""
    q = quantize(_se_model()).model
    pool = next(n for n in q.graph.node if n.op_type == "GlobalAveragePool")
    (conv,) = [n for n in q.graph.node if n.op_type == "Conv" and n.output[0] == "r"]
    (s_out, zp), (s_in, _) = _qparams(q, pool.name), _qparams(q, conv.name)
    nodes = [
        node("DequantizeLinear", ["x", "si", "z"], ["xf"]),
        node("GlobalAveragePool", ["xf"], ["p"]),
        node("QuantizeLinear", ["p", "so", "z"], ["y"]),
    ]
    inits = {"si": np.float32(s_in), "so": np.float32(s_out), "z": np.uint8(zp)}
    g = onnx.helper.make_graph(
        nodes,
        "mean",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [1, 256, 8, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [1, 256, 1, 1])],
        [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    mean = onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 17)])
    q = np.random.default_rng(0).integers(0, 20, (1, 256, 8, 8))
    q[:, :, 0, 0] += (32 - q.sum(axis=(2, 3)) % 64) % 64  # each channel's sum is 32 (mod 64): a mean of k + 1/2 steps
    x = (q + zp).astype(np.uint8)
    kernels, simulation = (session(mean, mode=m).run(None, {"x": x})[0] for m in ("kernels", "simulate"))
    np.testing.assert_array_equal(kernels, simulation)


def test_a_head_pool_keeps_its_own_range() -> None:
    q = quantize(_se_model(head=True)).model
    head = next(n for n in nodes_of(q, "GlobalAveragePool") if n.name == "head_pool")
    mul = next(n for n in q.graph.node if n.op_type == "Mul")
    head_in = _qparams(q, mul.name)
    assert _qparams(q, head.name) != head_in, "the head's mean has its own (narrower) range"
    assert _qparams(q, head.name)[0] < head_in[0]
    assert squeeze_excitation(_ir_node(_se_model(head=True), "se_pool"))
    assert not squeeze_excitation(_ir_node(_se_model(head=True), "head_pool"))


def _ir_node(m: onnx.ModelProto, name: str) -> ir.Node:
    g = ir.serde.deserialize_model(m).graph
    return next(n for n in g if n.name == name)


def _se_on_input() -> onnx.ModelProto:
    """The SE block straight on the input, so that only its mean can go past what calibration saw."""
    nodes = [
        node("GlobalAveragePool", ["x"], ["p"], name="se_pool"),
        node("Conv", ["p", "w1", "b1"], ["f1"], name="fc1"),
        node("Relu", ["f1"], ["f1r"], name="fc1_relu"),
        node("Conv", ["f1r", "w2", "b2"], ["f2"], name="fc2"),
        node("HardSigmoid", ["f2"], ["g"], name="gate", alpha=1 / 6),
        node("Mul", ["g", "x"], ["s"], name="excite"),
        node("Conv", ["s", "w3", "b3"], ["y"], name="project"),
    ]
    inits = {
        "w1": weight((4, C, 1, 1), 2, scale=2.0),
        "b1": np.zeros(4, np.float32),
        "w2": weight((C, 4, 1, 1), 3, scale=2.0),
        "b2": np.zeros(C, np.float32),
        "w3": weight((C, C, 1, 1), 5),
        "b3": np.zeros(C, np.float32),
    }
    return model(nodes, {"x": (1, C, 8, 8)}, {"y": (1, C, 8, 8)}, inits)


def _images(m: onnx.ModelProto, n: int, seed: int, density: float) -> list[dict[str, np.ndarray]]:
    """Inputs in [0, 1] with a fraction `density` of pixels set: the same pixel range, other per-image means."""
    r = np.random.default_rng(seed + 1000)  # not the stream samples() draws the values from
    feeds = samples(m, n=n, seed=seed, low=0.0, high=1.0)
    return [{"x": f["x"] * (r.random(f["x"].shape) < density).astype(np.float32)} for f in feeds]


def test_a_mean_of_images_unlike_calibration_is_not_clipped() -> None:
    """Calibrated on sparse images, the pooled means of dense ones (same pixel range) go past every mean calibration
    saw: with the pool's own range (before this rule) they clip at 0.18 (measured); the input's range holds them."""
    m = _se_on_input()
    recipe = lowbit.Recipe(default=lowbit.Scheme(calibration="minmax"))  # the input's range as calibrated: [0, 1]
    q = lowbit.quantize(m, calib=_images(m, 16, 1, 0.2), recipe=recipe, progress=False).model
    scale, zero = _qparams(q, "se_pool")
    top = (255 - zero) * scale  # the largest mean the quantized pool can carry
    means = np.concatenate([f["x"].mean(axis=(2, 3)).ravel() for f in _images(m, 16, 7, 1.0)])
    assert means.max() > 0.4  # the dense images' means, well past the sparse ones' (about 0.1)
    assert top >= means.max()
