"""Constant per-channel Mul/Add/Sub after a conv (BatchNorm exported as arithmetic) folds into its weights."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import lowbit
from lowbit.passes import fold_affine

C = 8


def _model(
    tail: list[onnx.NodeProto], consts: dict[str, np.ndarray], conv: str = "Conv", out: str = "y", big: float = 1.0
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (C, 3, 3, 3) if conv == "Conv" else (3, C, 3, 3)).astype(np.float32)
    w[0 if conv == "Conv" else slice(None), 0 if conv != "Conv" else slice(None)] *= big
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(0, 0.1, C).astype(np.float32), "b")]
    inits += [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()]
    nodes = [helper.make_node(conv, ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]), *tail]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", C, 12, 12])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _folded(model: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    m = ir.from_proto(model)
    changed = fold_affine(m)
    return ir.to_proto(m), changed


X = np.random.default_rng(1).normal(0, 1, (2, 3, 12, 12)).astype(np.float32)


def test_mul_then_add_fold_into_the_conv_with_the_same_outputs() -> None:
    rng = np.random.default_rng(2)
    for conv in ("Conv", "ConvTranspose"):
        model = _model(
            [
                helper.make_node("Mul", ["s", "c"], ["m"]),  # constant first: either operand order
                helper.make_node("Add", ["m", "t"], ["a"]),
                helper.make_node("Sub", ["a", "u"], ["y"]),
            ],
            {"s": rng.uniform(0, 0.5, (C, 1, 1)), "t": rng.normal(0, 1, (1, C, 1, 1)), "u": np.array([0.25])},
            conv,
        )
        folded, changed = _folded(model)
        assert changed
        assert [n.op_type for n in folded.graph.node] == [conv]
        assert folded.graph.output[0].name == "y"
        np.testing.assert_allclose(_run(folded, X), _run(model, X), rtol=1e-5, atol=1e-5)


def test_what_is_not_per_channel_or_not_alone_is_left() -> None:
    spatial = _model([helper.make_node("Mul", ["c", "s"], ["y"])], {"s": np.ones((1, 1, 12, 12))})
    shared = _model(
        [helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])],
        {"s": np.ones((C, 1, 1))},
    )
    flipped = _model([helper.make_node("Sub", ["s", "c"], ["y"])], {"s": np.ones((C, 1, 1))})
    widening = _model([helper.make_node("Mul", ["c", "s"], ["y"])], {"s": np.ones((1, 1, 1, 1, 1))})
    for model in (spatial, shared, flipped, widening):
        folded, changed = _folded(model)
        assert not changed
        assert len(folded.graph.node) == len(model.graph.node)


def test_quantizing_the_exported_batchnorm_keeps_its_small_channels() -> None:
    # One channel with a large raw output that the BatchNorm scale nearly zeroes (the captcha CRNN's first block has
    # scales from 0.0 to 0.44): unfolded, that channel sets the conv output's one range and every other channel
    # keeps a few levels of it (measured: 9.5 dB).
    rng = np.random.default_rng(3)
    scale = np.ones(C)
    scale[0] = 0.002
    model = _model(
        [
            helper.make_node("Mul", ["c", "s"], ["m"]),
            helper.make_node("Add", ["m", "t"], ["a"]),
            helper.make_node("Relu", ["a"], ["y"]),
        ],
        {"s": scale.reshape(C, 1, 1), "t": rng.normal(0, 0.1, (C, 1, 1))},
        big=40.0,
    )
    calib = rng.normal(0, 1, (32, 3, 12, 12)).astype(np.float32)
    q = lowbit.quantize(model, calib=calib, progress=False)
    ref, got = _run(model, X), _run(q.model, X)
    sqnr = 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - got).astype(np.float64) ** 2))
    assert sqnr > 30, sqnr
    assert not any(n.op_type in ("Mul", "Add") for n in q.model.graph.node)


def _affine_then_convs() -> onnx.ModelProto:
    """PP-LCNetV3's learnable affine after an activation: HardSwish -> Mul(a) -> Add(b) -> Conv 1x1 (no padding),
    and again before a padded depthwise Conv 3x3."""
    rng = np.random.default_rng(3)
    inits = {
        "a1": np.array(0.17),
        "b1": np.array(0.05),
        "w1": rng.normal(0, 0.3, (C, 3, 1, 1)),
        "a2": np.array([0.6]),
        "b2": np.array(-0.3),
        "w2": rng.normal(0, 0.3, (C, 1, 3, 3)),
        "bias2": rng.normal(0, 0.1, C),
    }
    nodes = [
        helper.make_node("HardSwish", ["x"], ["h1"]),
        helper.make_node("Mul", ["a1", "h1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["s1"]),
        helper.make_node("Conv", ["s1", "w1"], ["c1"], name="pw"),
        helper.make_node("HardSwish", ["c1"], ["h2"]),
        helper.make_node("Mul", ["h2", "a2"], ["m2"]),
        helper.make_node("Add", ["b2", "m2"], ["s2"]),
        helper.make_node("Conv", ["s2", "w2", "bias2"], ["y"], name="dw", group=C, pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C, 12, 12])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_scalar_affine_before_a_conv_folds_into_it_exactly() -> None:
    model = _affine_then_convs()
    folded, changed = _folded(model)
    assert changed
    # unpadded: Mul and Add both gone; padded: the Mul goes into the weights, the shift stays before it (b / a)
    assert [n.op_type for n in folded.graph.node] == ["HardSwish", "Conv", "HardSwish", "Add", "Conv"]
    np.testing.assert_allclose(_run(folded, X), _run(model, X), rtol=1e-5, atol=1e-5)


def test_a_scalar_affine_read_elsewhere_too_is_left() -> None:
    model = _affine_then_convs()
    model.graph.output.append(helper.make_tensor_value_info("s1", TensorProto.FLOAT, None))
    folded, _ = _folded(model)
    assert [n.op_type for n in folded.graph.node][:4] == ["HardSwish", "Mul", "Add", "Conv"]
    np.testing.assert_allclose(_run(folded, X), _run(model, X), rtol=1e-5, atol=1e-5)
