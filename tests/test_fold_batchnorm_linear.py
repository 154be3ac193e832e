"""BatchNorm folds into a Gemm before it, and forward into the layer after it where that is exact."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import model, node, op_counts, weight
from lowbit.passes import fold_batchnorm
from test_passes import apply, assert_same_outputs


def _bn_inits(c: int, seed: int = 3) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    return {
        "gamma": r.uniform(0.5, 2.0, c).astype(np.float32),
        "beta": r.normal(size=c).astype(np.float32),
        "mean": r.normal(size=c).astype(np.float32),
        "var": r.uniform(0.1, 3.0, c).astype(np.float32),
    }


def _bn(x: str, y: str) -> object:
    return node("BatchNormalization", [x, "gamma", "beta", "mean", "var"], [y], name="bn", epsilon=1e-3)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("bias", [True, False])
def test_gemm_then_batchnorm1d(trans_b: int, bias: bool) -> None:
    """A face embedder's last Linear -> BatchNorm1d."""
    inits = {"w": weight((6, 5) if trans_b else (5, 6), 1), **_bn_inits(6)}
    ins = ["x", "w"]
    if bias:
        inits["b"] = weight((6,), 2)
        ins.append("b")
    m = model([node("Gemm", ins, ["g"], name="fc", transB=trans_b), _bn("g", "y")], {"x": (2, 5)}, {"y": (2, 6)}, inits)
    out, (changed,) = apply(m, fold_batchnorm)
    assert changed and op_counts(out) == {"Gemm": 1}
    assert out.graph.node[0].output[0] == "y"
    assert_same_outputs(m, out)


@pytest.mark.parametrize(("shape", "group"), [((2, 4, 6, 6), 1), ((2, 4, 6, 6), 4), ((2, 4, 9), 2)])
def test_batchnorm_after_activation_into_unpadded_conv(shape: tuple[int, ...], group: int) -> None:
    k = (1,) * (len(shape) - 2)
    inits = {"w": weight((8, 4 // group, *k), 1), "cb": weight((8,), 2), **_bn_inits(4)}
    nodes = [
        node("Relu", ["x"], ["r"], name="relu"),
        _bn("r", "n"),
        node("Conv", ["n", "w", "cb"], ["y"], name="conv", group=group),
    ]
    m = model(nodes, {"x": shape}, {"y": (shape[0], 8, *shape[2:])}, inits)
    out, (changed,) = apply(m, fold_batchnorm)
    assert changed and op_counts(out) == {"Relu": 1, "Conv": 1}
    assert_same_outputs(m, out)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_batchnorm_flatten_gemm(trans_b: int) -> None:
    """ArcFace's head: BatchNorm2d -> Flatten -> Linear; each channel is H*W adjacent columns of the Gemm's input."""
    k = 3 * 2 * 2
    inits = {"w": weight((5, k) if trans_b else (k, 5), 1), "b": weight((5,), 2), **_bn_inits(3)}
    nodes = [
        node("Relu", ["x"], ["r"], name="relu"),
        _bn("r", "n"),
        node("Flatten", ["n"], ["f"], name="flat", axis=1),
        node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=trans_b),
    ]
    m = model(nodes, {"x": (2, 3, 2, 2)}, {"y": (2, 5)}, inits)
    out, (changed,) = apply(m, fold_batchnorm)
    assert changed and op_counts(out) == {"Relu": 1, "Flatten": 1, "Gemm": 1}
    assert_same_outputs(m, out)


def test_batchnorm_before_a_padded_conv_stays() -> None:
    """Zero padding after a BatchNorm is not zero before it: folding would change the border outputs."""
    inits = {"w": weight((4, 4, 3, 3), 1), **_bn_inits(4)}
    nodes = [
        node("Relu", ["x"], ["r"], name="relu"),
        _bn("r", "n"),
        node("Conv", ["n", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    m = model(nodes, {"x": (1, 4, 5, 5)}, {"y": (1, 4, 5, 5)}, inits)
    out, (changed,) = apply(m, fold_batchnorm)
    assert not changed and op_counts(out)["BatchNormalization"] == 1
