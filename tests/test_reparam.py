"""Summed parallel convs of one input become one conv (passes/reparam.py): RepVGG/MobileOne training forms."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import lowbit
from helpers import model, node, weight
from lowbit import passes
from lowbit.passes import prepare
from lowbit.runtimes.ort import session

C = 8


def _bn(name: str, x: str, y: str, seed: int) -> tuple[onnx.NodeProto, dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    params = {
        f"{name}_g": r.uniform(0.5, 1.5, C).astype(np.float32),
        f"{name}_b": r.normal(0, 0.2, C).astype(np.float32),
        f"{name}_m": r.normal(0, 0.3, C).astype(np.float32),
        f"{name}_v": r.uniform(0.5, 2.0, C).astype(np.float32),
    }
    return node("BatchNormalization", [x, *params], [y], name=name), params


def _repvgg(pads_1x1: tuple[int, ...] = (0, 0, 0, 0), pads_3x3: tuple[int, ...] = (1, 1, 1, 1)) -> onnx.ModelProto:
    """Block 1 (RepVGG with identity): 3x3 + 1x1 + BatchNorm(x), ReLU. Block 2 (MobileOne depthwise): two 3x3
    depthwise + 1x1 depthwise + BatchNorm(x). Block 3 (stride 2, no identity): 3x3 + 1x1."""
    bn, inits = _bn("idbn", "x", "b1_id", 9)
    bn2, inits2 = _bn("idbn2", "y1", "b2_id", 11)
    inits |= inits2
    inits |= {
        "w1k": weight((C, C, 3, 3), 1),
        "w1p": weight((C, C, 1, 1), 2),
        "b1k": weight((C,), 3),
        "w2a": weight((C, 1, 3, 3), 4),
        "w2b": weight((C, 1, 3, 3), 5),
        "w2p": weight((C, 1, 1, 1), 6),
        "w3k": weight((C, C, 3, 3), 7),
        "w3p": weight((C, C, 1, 1), 8),
        "b3p": weight((C,), 10),
    }
    nodes = [
        node("Conv", ["x", "w1k", "b1k"], ["b1_k"], name="b1_3x3", pads=list(pads_3x3)),
        node("Conv", ["x", "w1p"], ["b1_p"], name="b1_1x1", pads=list(pads_1x1)),
        bn,
        node("Add", ["b1_k", "b1_p"], ["b1_s"], name="b1_add"),
        node("Add", ["b1_s", "b1_id"], ["b1_t"], name="b1_add_1"),
        node("Relu", ["b1_t"], ["y1"], name="b1_relu"),
        node("Conv", ["y1", "w2a"], ["b2_a"], name="b2_3x3a", pads=[1, 1, 1, 1], group=C),
        node("Conv", ["y1", "w2b"], ["b2_b"], name="b2_3x3b", pads=[1, 1, 1, 1], group=C),
        node("Conv", ["y1", "w2p"], ["b2_p"], name="b2_1x1", group=C),
        node("Add", ["b2_a", "b2_b"], ["b2_s"], name="b2_add"),
        node("Add", ["b2_p", "b2_s"], ["b2_t"], name="b2_add_1"),
        bn2,
        node("Add", ["b2_id", "b2_t"], ["b2_u"], name="b2_add_2"),
        node("Relu", ["b2_u"], ["y2"], name="b2_relu"),
        node("Conv", ["y2", "w3k"], ["b3_k"], name="b3_3x3", pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Conv", ["y2", "w3p", "b3p"], ["b3_p"], name="b3_1x1", strides=[2, 2]),
        node("Add", ["b3_k", "b3_p"], ["y"], name="b3_add"),
    ]
    return model(nodes, {"x": (1, C, 12, 12)}, {"y": (1, C, 6, 6)}, inits)


def _run(m: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return session(m, "kernels").run(None, {"x": x})[0]


def _prepared(m: onnx.ModelProto) -> onnx.ModelProto:
    return ir.serde.serialize_model(prepare(ir.serde.deserialize_model(m)))


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (1, C, 12, 12)).astype(np.float32)


def test_each_block_becomes_one_conv_computing_the_same() -> None:
    m = _repvgg()
    p = _prepared(m)
    ops = [n.op_type for n in p.graph.node]
    assert ops == ["Conv", "Relu", "Conv", "Relu", "Conv"]
    assert [o.name for o in p.graph.output] == ["y"]
    for seed in range(3):
        ref, got = _run(m, _x(seed)), _run(p, _x(seed))
        assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))


def test_branches_that_do_not_read_one_window_are_left_apart() -> None:
    # The 1x1 conv padded 1 on the far side only, the 3x3 on the far side only: same output size, but the 1x1 sits at
    # the 3x3 window's corner, not its centre, so centring would shift it.
    m = _repvgg(pads_1x1=(0, 0, 0, 0), pads_3x3=(0, 0, 2, 2))
    p = _prepared(m)
    names = {n.name for n in p.graph.node}
    assert {"b1_3x3", "b1_1x1", "b1_add"} <= names  # block 1's branches stay apart; the others still merge
    assert "b3_add" not in names and "b2_add_2" not in names
    ref, got = _run(m, _x(4)), _run(p, _x(4))
    assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))


def test_a_branch_read_elsewhere_is_kept() -> None:
    m = _repvgg()
    m.graph.output.append(onnx.helper.make_tensor_value_info("b3_p", onnx.TensorProto.FLOAT, (1, C, 6, 6)))
    p = _prepared(m)
    assert {"b3_3x3", "b3_1x1", "b3_add"} <= {n.name for n in p.graph.node}


def test_a_repmixer_becomes_a_residual_conv() -> None:
    """FastViT's RepMixer as the dynamo exporter writes it: x + s * ((dwconv(x) + BN(x)) - BN(x)), one BatchNorm
    read by both the Add and the Sub: the Sub merges like an Add with the second term negated, the scale folds into
    the merged conv, and x + conv(x) is left as a residual Add."""
    bn, inits = _bn("bn", "x", "n", 12)
    inits |= {"wd": weight((C, 1, 3, 3), 13), "s": weight((1, C, 1, 1), 14)}
    nodes = [
        node("Conv", ["x", "wd"], ["d"], name="dw", pads=[1, 1, 1, 1], group=C),
        bn,
        node("Add", ["d", "n"], ["mix"], name="mixer"),
        node("Sub", ["mix", "n"], ["diff"], name="minus_norm"),
        node("Mul", ["diff", "s"], ["scaled"], name="layer_scale"),
        node("Add", ["x", "scaled"], ["y"], name="residual"),
    ]
    m = model(nodes, {"x": (1, C, 12, 12)}, {"y": (1, C, 12, 12)}, inits)
    p = _prepared(m)
    assert [n.op_type for n in p.graph.node] == ["Conv", "Add"]
    for seed in range(2):
        ref, got = _run(m, _x(seed)), _run(p, _x(seed))
        assert np.max(np.abs(ref - got)) <= 1e-5 * np.max(np.abs(ref))


def test_a_bare_residual_stays_an_add() -> None:
    # x + conv(x): the Add quantizes as it is; a unit tap in the kernel would coarsen the conv's own weights.
    m = model(
        [node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]), node("Add", ["x", "c"], ["y"], name="add")],
        {"x": (1, C, 12, 12)},
        {"y": (1, C, 12, 12)},
        {"w": weight((C, C, 3, 3), 1)},
    )
    assert [n.op_type for n in _prepared(m).graph.node] == ["Conv", "Add"]


def test_the_merged_model_quantizes_closer_to_float(monkeypatch: pytest.MonkeyPatch) -> None:
    m = _repvgg()
    calib = [{"x": _x(s)} for s in range(10, 26)]
    held = [_x(s) for s in range(40, 56)]
    merged = lowbit.quantize(m, calib=calib, progress=False).model
    ops = {n.op_type for n in merged.graph.node}
    assert "BatchNormalization" not in ops and "Add" not in ops

    def cos(q: onnx.ModelProto) -> float:
        a = np.stack([_run(m, x).ravel() for x in held])
        b = np.stack([_run(q, x).ravel() for x in held])
        return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))

    monkeypatch.setattr(passes, "merge_parallel_convs", lambda model: False)
    apart = lowbit.quantize(m, calib=calib, progress=False).model
    assert "BatchNormalization" in {n.op_type for n in apart.graph.node}  # the identity BatchNorm stays float
    assert cos(merged) > cos(apart) and cos(merged) > 0.999  # 0.99967 against 0.99915 when written
