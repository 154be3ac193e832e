"""A Concat, Add or Mul that no quantized op feeds or reads stays float (planner._drop_isolated): quantizing it
would only round what it hands on, such as a recurrent model's state output stacked from float states."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import model, node, weight
from lowbit.decision import Reason
from lowbit.runtimes.ort import session


def _state_model():
    """x -> Conv -> Relu -> y (quantized); h, c -> Sin, Cos (no quantized form) -> Unsqueeze -> Concat -> state,
    and Sin(h) * Cos(c) -> gate (an output of float arithmetic on float ops)."""
    nodes = [
        node("Conv", ["x", "w"], ["cv"], name="conv", pads=[1, 1, 1, 1]),
        node("Relu", ["cv"], ["y"], name="relu"),
        node("Sin", ["h"], ["hs"], name="sin"),
        node("Cos", ["c"], ["cs"], name="cos"),
        node("Unsqueeze", ["hs", "axis"], ["hu"], name="unsq_h"),
        node("Unsqueeze", ["cs", "axis"], ["cu"], name="unsq_c"),
        node("Concat", ["hu", "cu"], ["state"], name="stack", axis=0),
        node("Mul", ["hs", "cs"], ["gate"], name="gate"),
    ]
    inits = {"w": weight((4, 3, 3, 3), 1), "axis": np.array([0], np.int64)}
    return model(
        nodes,
        {"x": (1, 3, 8, 8), "h": (1, 16), "c": (1, 16)},
        {"y": (1, 4, 8, 8), "state": (2, 1, 16), "gate": (1, 16)},
        inits,
    )


def _feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [
        {
            "x": r.normal(size=(1, 3, 8, 8)).astype(np.float32),
            "h": r.normal(size=(1, 16)).astype(np.float32),
            "c": r.normal(size=(1, 16)).astype(np.float32) * 3,
        }
        for _ in range(n)
    ]


def test_ops_no_quantized_op_feeds_or_reads_stay_float() -> None:
    m = _state_model()
    res = lowbit.quantize(m, calib=_feeds(8, 0), progress=False)
    nodes = res.plan.nodes
    assert nodes["conv"].quantized
    for name in ("stack", "gate"):
        assert not nodes[name].quantized and nodes[name].code is Reason.ISOLATED, (name, nodes[name].reason)
    feed = _feeds(1, 5)[0]
    ref = session(m, "kernels").run(None, feed)
    got = session(res.model, "kernels").run(None, feed)
    assert np.array_equal(ref[1], got[1]) and np.array_equal(ref[2], got[2])  # the state is not rounded


def test_a_concat_a_quantized_op_reads_stays_quantized() -> None:
    m = _state_model()
    m.graph.node.append(node("Concat", ["y", "y"], ["yy"], name="pair", axis=1))
    m.graph.node.append(node("Concat", ["hu", "cu"], ["st2"], name="stack2", axis=0))
    m.graph.node.append(node("Flatten", ["st2"], ["fl"], name="flat"))
    m.graph.node.append(node("Gemm", ["fl", "wg"], ["z"], name="fc", transB=1))
    m.graph.initializer.append(numpy_helper.from_array(weight((4, 16), 3), "wg"))
    for name, shape in (("yy", (1, 8, 8, 8)), ("z", (2, 4))):
        m.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
    nodes = lowbit.quantize(m, calib=_feeds(8, 0), progress=False).plan.nodes
    assert nodes["pair"].quantized  # fed by the quantized conv
    assert nodes["stack2"].quantized  # read by the quantized Gemm (through Flatten)
