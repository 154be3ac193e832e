"""The kernels-vs-simulation locator (evaluate/kernel_gap.py) on small graphs with a known outcome."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import lowbit
from helpers import model, node, weight
from lowbit.cli.summary import summary_text
from lowbit.evaluate.check import runtime_check
from lowbit.evaluate.kernel_gap import gap_text, locate, regions
from lowbit.runtimes.ort import session


def _conv_net() -> onnx.ModelProto:
    return model(
        [
            node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
            node("Relu", ["c1"], ["r1"], name="relu1"),
            node("Conv", ["r1", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
        ],
        {"x": (1, 3, 8, 8)},
        {"y": (1, 4, 8, 8)},
        {"w1": weight((8, 3, 3, 3), 1), "w2": weight((4, 8, 3, 3), 2)},
    )


def _batches(n: int = 4, seed: int = 0) -> list[dict[str, np.ndarray]]:
    r = np.random.default_rng(seed)
    return [{"x": r.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def test_regions_follow_the_quantized_graph() -> None:
    q = lowbit.quantize(_conv_net(), calib=_batches(), progress=False).model
    found = {r.node: r for r in regions(q)}
    # conv2's region reads the integers conv1 (with its folded Relu) hands on, nothing else.
    assert found["conv2"].op_type == "Conv"
    (read,) = found["conv2"].inputs
    assert found[[k for k, r in found.items() if r.tensor == read][0]].op_type == "Conv"


def test_a_model_whose_kernels_agree_names_no_op() -> None:
    q = lowbit.quantize(_conv_net(), calib=_batches(), progress=False).model
    gap = locate(q, _batches(3, seed=1))
    assert gap["first"] is None
    assert gap["exposure_changed_kernels"] is False
    assert gap["output_cosine"] > 0.999
    assert "no region departs" in gap_text(gap)


def _requantized() -> onnx.ModelProto:
    """x -> Q(fine) -> DQ -> Q(coarse) -> DQ -> Relu: a change of scale with no op between. Under graph
    optimizations ONNX Runtime folds the two pairs into one (DoubleQDQPairsRemover), so kernels skip a rounding
    the simulation does."""
    inits = [
        numpy_helper.from_array(np.array(0.01, np.float32), "s1"),
        numpy_helper.from_array(np.array(128, np.uint8), "z1"),
        numpy_helper.from_array(np.array(0.25, np.float32), "s2"),
        numpy_helper.from_array(np.array(100, np.uint8), "z2"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["q1"], name="q_fine"),
        helper.make_node("DequantizeLinear", ["q1", "s1", "z1"], ["d1"], name="dq_fine"),
        helper.make_node("QuantizeLinear", ["d1", "s2", "z2"], ["q2"], name="q_coarse"),
        helper.make_node("DequantizeLinear", ["q2", "s2", "z2"], ["d2"], name="dq_coarse"),
        helper.make_node("Relu", ["d2"], ["y"], name="relu"),
    ]
    g = helper.make_graph(
        nodes,
        "requant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (4, 64))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (4, 64))],
        inits,
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_a_folded_requantization_is_named_without_being_hidden() -> None:
    m = _requantized()
    batches = [{"x": np.random.default_rng(i).normal(0, 1, (4, 64)).astype(np.float32)} for i in range(2)]
    kern = np.concatenate([session(m, "kernels").run(None, b)[0] for b in batches]).astype(np.float64)
    sim = np.concatenate([session(m, "simulate").run(None, b)[0] for b in batches]).astype(np.float64)
    rows = np.sum(kern * sim, axis=1) / (np.linalg.norm(kern, axis=1) * np.linalg.norm(sim, axis=1))
    assert rows.mean() < 0.999  # the mechanism is real on this ONNX Runtime: the fold changes the numbers

    gap = locate(m, batches)
    assert gap["exposure_changed_kernels"] is False  # the chain's integers were left unexposed, so it still folds
    assert abs(gap["output_cosine"] - rows.mean()) < 1e-9  # per sample, as the check measures it
    first = gap["first"]
    assert first is not None and first["node"] == "relu"
    assert first["ops"] == ["QuantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear", "Relu"]
    assert "Relu 'relu'" in gap_text(gap)


def test_the_quantize_summary_names_the_op(tmp_path: Path) -> None:
    m = _requantized()
    batches = [{"x": np.random.default_rng(0).normal(0, 1, (4, 64)).astype(np.float32)}]
    float_model = _conv_net()
    q = lowbit.quantize(float_model, calib=_batches(), progress=False)
    check = runtime_check(float_model, q.model, _batches(4, seed=3))
    check["kernel_gap"] = locate(m, batches)  # as quantize_cmd adds it when kernels and simulation part
    text = summary_text(q.plan, 100, 50, 1.0, check)
    assert "kernels vs simulation part at Relu 'relu'" in text


def test_diagnose_reports_where_kernels_part() -> None:
    from lowbit.cli.diagnose_cmd import report_text
    from lowbit.evaluate.diagnose import diagnose

    m = _conv_net()
    q = lowbit.quantize(m, calib=_batches(), progress=False)
    x = np.concatenate([b["x"] for b in _batches(8, seed=2)])
    report = diagnose(m, q.model, [x], plan=q.plan, top=1, budget=2, progress=False)
    gap = report.to_dict()["kernel_gap"]
    assert gap["output_cosine"] > 0.999 and gap["first"] is None
    assert "kernels vs simulation: no region departs" in report_text(report.to_dict())


def _crossing(inputs: float, output: float) -> dict:
    first = {
        "node": "dw9",
        "op_type": "Conv",
        "ops": ["Conv"],
        "inputs_cosine": inputs,
        "cosine": output,
        "max_diff_steps": 3,
    }
    return {"threshold": 0.999, "output_cosine": output, "first": first, "worst": [first]}


def test_a_gap_built_up_before_the_crossing_is_called_drift_not_a_kernel() -> None:
    # MobileNetV3-Small on held-out crops: every region one or two steps apart, 0.9991 -> 0.9989 where it crosses.
    text = gap_text(_crossing(0.9991, 0.9989))
    assert "drift apart over many ops, not at one" in text and "Conv 'dw9'" in text
    assert "part at" not in text
    # A region that makes most of the gap itself is the kernel that differs.
    assert "kernels vs simulation part at Conv 'dw9'" in gap_text(_crossing(0.9999, 0.990))
