"""lowbit.passes: graph rewrites before calibration must not change what the float model computes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest
from onnx import helper, numpy_helper

from helpers import attr, const_node, init, model, node, nodes_of, op_counts, run, samples, weight
from lowbit.passes import fold_batchnorm, fold_constants, fold_pad, prepare

I64 = np.int64


def apply(m: onnx.ModelProto, *passes) -> tuple[onnx.ModelProto, list[bool]]:
    irm = ir.from_proto(m)
    changed = [p(irm) for p in passes]
    out = ir.to_proto(irm)
    onnx.checker.check_model(out)
    return out, changed


def assert_same_outputs(a: onnx.ModelProto, b: onnx.ModelProto, atol: float = 1e-5, n: int = 4) -> None:
    feeds = samples(a, n, seed=11, low=-2.0, high=2.0)
    ra, rb = run(a, feeds, float_model=True), run(b, feeds, float_model=True)
    assert [o.name for o in a.graph.output] == [o.name for o in b.graph.output]
    for x, y in zip(ra, rb):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------------ fold_batchnorm


def bn_model(bias: bool, extra_use: bool = False):
    r = np.random.default_rng(3)
    inits = {
        "w": weight((4, 3, 3, 3), 1),
        "gamma": r.uniform(0.5, 2.0, 4).astype(np.float32),
        "beta": r.normal(size=4).astype(np.float32),
        "mean": r.normal(size=4).astype(np.float32),
        "var": r.uniform(0.1, 3.0, 4).astype(np.float32),
    }
    ins = ["x", "w"]
    if bias:
        inits["b"] = weight((4,), 2)
        ins.append("b")
    nodes = [
        node("Conv", ins, ["c"], name="conv", pads=[1] * 4),
        node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3),
    ]
    outs = {"y": (1, 4, 8, 8)}
    if extra_use:
        nodes.append(node("Relu", ["c"], ["r"], name="relu"))
        outs["r"] = (1, 4, 8, 8)
    return model(nodes, {"x": (1, 3, 8, 8)}, outs, inits)


@pytest.mark.parametrize("bias", [True, False])
def test_fold_batchnorm_into_conv(bias):
    m = bn_model(bias)
    out, (changed,) = apply(m, fold_batchnorm)
    assert changed
    assert op_counts(out) == {"Conv": 1}
    (conv,) = out.graph.node
    assert len(conv.input) == 3 and conv.input[2]  # a bias appears when there was none
    assert conv.output[0] == "y"
    assert_same_outputs(m, out, atol=1e-5)


@pytest.mark.parametrize("group", [1, 2])
def test_fold_batchnorm_into_conv_transpose(group):
    """A decoder's upsampling ConvTranspose -> BatchNorm: weights [C_in, C_out / group, k, k], each group's input
    rows writing its own block of output channels."""
    r = np.random.default_rng(4)
    inits = {
        "w": weight((4, 6 // group, 2, 2), 3),
        "b": weight((6,), 4),
        "gamma": r.uniform(0.5, 2.0, 6).astype(np.float32),
        "beta": r.normal(size=6).astype(np.float32),
        "mean": r.normal(size=6).astype(np.float32),
        "var": r.uniform(0.1, 3.0, 6).astype(np.float32),
    }
    nodes = [
        node("ConvTranspose", ["x", "w", "b"], ["c"], name="up", strides=[2, 2], group=group),
        node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"], name="bn", epsilon=1e-3),
    ]
    m = model(nodes, {"x": (1, 4, 5, 5)}, {"y": (1, 6, 10, 10)}, inits)
    out, (changed,) = apply(m, fold_batchnorm)
    assert changed and op_counts(out) == {"ConvTranspose": 1}
    assert_same_outputs(m, out, atol=1e-5)


def test_fold_batchnorm_skips_conv_output_used_elsewhere():
    m = bn_model(True, extra_use=True)
    out, (changed,) = apply(m, fold_batchnorm)
    assert not changed
    assert op_counts(out)["BatchNormalization"] == 1
    assert_same_outputs(m, out, atol=0)


# ------------------------------------------------------------------------------------------------ fold_pad


def pad_model(pads, value=None, mode="constant", conv_pads=(1, 1, 1, 1)):
    inits = {"pads": np.array(pads, I64), "w": weight((4, 3, 3, 3), 1)}
    ins = ["x", "pads"]
    if value is not None:
        inits["v"] = np.array(value, np.float32)
        ins.append("v")
    return model(
        [
            node("Pad", ins, ["p"], name="pad", mode=mode),
            node("Conv", ["p", "w"], ["y"], name="conv", pads=list(conv_pads)),
        ],
        {"x": (1, 3, 8, 8)},
        {"y": None},
        inits,
    )


@pytest.mark.parametrize("value", [None, 0.0])
def test_fold_zero_spatial_pad_into_conv(value):
    m = pad_model([0, 0, 1, 2, 0, 0, 3, 0], value)
    out, (changed,) = apply(m, fold_pad)
    assert changed
    assert op_counts(out) == {"Conv": 1}
    (conv,) = out.graph.node
    assert conv.input[0] == "x"
    assert attr(conv, "pads") == [1 + 1, 1 + 2, 1 + 3, 1 + 0]
    assert_same_outputs(m, out, atol=1e-5)


@pytest.mark.parametrize(
    "pads, value, mode",
    [
        ([0, 0, 1, 1, 0, 0, 1, 1], 0.5, "constant"),  # non-zero pad value is not what conv padding does
        ([0, 1, 1, 1, 0, 0, 1, 1], None, "constant"),  # channel padding cannot become conv padding
        ([0, 0, 1, 1, 0, 0, 1, 1], None, "reflect"),
    ],
)
def test_fold_pad_leaves_non_equivalent_pads(pads, value, mode):
    m = pad_model(pads, value, mode)
    if pads[1]:  # padded channels: the conv needs one more input channel
        m.graph.initializer[1].CopyFrom(numpy_helper.from_array(weight((4, 4, 3, 3), 1), "w"))
        onnx.checker.check_model(m)
    out, (changed,) = apply(m, fold_pad)
    assert not changed
    assert op_counts(out) == {"Pad": 1, "Conv": 1}
    assert attr(nodes_of(out, "Conv")[0], "pads") == [1, 1, 1, 1]
    assert_same_outputs(m, out, atol=0)


# ------------------------------------------------------------------------------------------ fold_constants


def const_pads_model(with_shape_branch: bool = False):
    """Pad's pads computed by a constant subgraph: Constant -> ConstantOfShape -> Concat -> Reshape."""
    nodes = [
        const_node("n2", np.array([2], I64)),
        helper.make_node(
            "ConstantOfShape", ["n2"], ["zeros"], name="zeros_of", value=numpy_helper.from_array(np.array([0], I64))
        ),
        const_node("spatial", np.array([1, 2], I64)),
        node("Concat", ["zeros", "spatial", "zeros", "spatial"], ["cat"], name="cat", axis=0),
        const_node("flat", np.array([-1], I64)),
        node("Reshape", ["cat", "flat"], ["pads"], name="reshape_pads"),
        node("Pad", ["x", "pads"], ["p"], name="pad"),
        node("Conv", ["p", "w"], ["y"], name="conv"),
    ]
    outs: dict = {"y": None}
    if with_shape_branch:  # depends on the input: must stay
        nodes += [
            node("Shape", ["x"], ["shp"], name="shape_of"),
            node("Reshape", ["x", "shp"], ["same"], name="reshape_x"),
        ]
        outs["same"] = (1, 3, 8, 8)
    return model(nodes, {"x": (1, 3, 8, 8)}, outs, {"w": weight((4, 3, 3, 3), 1)})


def test_fold_constants_folds_constant_subgraph():
    m = const_pads_model(with_shape_branch=True)
    lift = common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)
    out, (_, changed) = apply(m, lift, fold_constants)
    assert changed
    ops = op_counts(out)
    for gone in ("ConstantOfShape", "Concat", "Constant"):
        assert ops[gone] == 0, dict(ops)
    assert ops["Reshape"] == 1 and ops["Shape"] == 1  # the input-dependent branch stays
    (pad,) = nodes_of(out, "Pad")
    np.testing.assert_array_equal(init(out, pad.input[1]), [0, 0, 1, 2, 0, 0, 1, 2])
    assert_same_outputs(m, out, atol=0)


def test_fold_constants_keeps_large_results():
    # ConstantOfShape of a big shape would bloat the file: it stays a node
    m = model(
        [
            node(
                "ConstantOfShape",
                ["big"],
                ["z"],
                name="zeros_big",
                value=numpy_helper.from_array(np.array([1.0], np.float32)),
            ),
            node("Add", ["x", "z"], ["y"], name="add"),
        ],
        {"x": (512, 256)},
        {"y": (512, 256)},
        {"big": np.array([512, 256], I64)},
    )
    out, (changed,) = apply(m, fold_constants)
    assert not changed and op_counts(out)["ConstantOfShape"] == 1


# --------------------------------------------------------------------------------------------------- prepare


def test_prepare_keeps_outputs():
    r = np.random.default_rng(5)
    c = 4
    nodes = [
        const_node("w1", weight((c, 3, 3, 3), 1)),  # weights as Constant nodes
        const_node("n2", np.array([2], I64)),
        helper.make_node(
            "ConstantOfShape", ["n2"], ["zeros"], name="zeros_of", value=numpy_helper.from_array(np.array([0], I64))
        ),
        const_node("spatial", np.array([1, 1], I64)),
        node("Concat", ["zeros", "spatial", "zeros", "spatial"], ["pads"], name="cat", axis=0),
        node("Pad", ["x", "pads"], ["p"], name="pad"),
        node("Conv", ["p", "w1", "b1"], ["c1"], name="conv1"),
        node("BatchNormalization", ["c1", "g", "be", "mu", "var"], ["bn"], name="bn"),
        node("Relu", ["bn"], ["r"], name="relu"),
        node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1] * 4),
    ]
    inits = {
        "b1": weight((c,), 2),
        "g": r.uniform(0.5, 2, c).astype(np.float32),
        "be": r.normal(size=c).astype(np.float32),
        "mu": r.normal(size=c).astype(np.float32),
        "var": r.uniform(0.2, 2, c).astype(np.float32),
        "w2": weight((2, c, 3, 3), 3),
    }
    m = model(nodes, {"x": (1, 3, 8, 8)}, {"y": (1, 2, 8, 8)}, inits)
    irm = ir.from_proto(m)
    prepare(irm)
    out = ir.to_proto(irm)
    onnx.checker.check_model(out)
    assert op_counts(out) == {"Conv": 2, "Relu": 1}
    conv1 = [n for n in out.graph.node if n.op_type == "Conv" and n.input[0] == "x"]
    assert len(conv1) == 1 and attr(conv1[0], "pads") == [1, 1, 1, 1]
    assert all(i in {t.name for t in out.graph.initializer} for n in out.graph.node for i in n.input[1:])
    # shapes were inferred for the intermediate tensors
    assert {v.name for v in out.graph.value_info} >= {"r"}
    assert_same_outputs(m, out, atol=1e-5)
