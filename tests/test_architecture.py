"""The shape the code promises (docs/architecture.md): one op registry for every mode, decisions as data, plans of
both versions, targets as data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import lowbit
from helpers import model, node, quantize, samples, weight
from lowbit.decision import TEMPLATES, Reason, render
from lowbit.ops import OpSpec, Skip, registry
from lowbit.ops.base import float_input
from lowbit.recipe import Scheme


def test_every_reason_has_a_sentence() -> None:
    assert set(TEMPLATES) == set(Reason)


def _conv_sub() -> object:
    """Conv -> Sub(constant image) -> Conv: Sub has no static handler in lowbit (a per-channel constant would fold
    into conv1's bias)."""
    nodes = [
        node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        node("Sub", ["c1", "k"], ["s"], name="sub"),
        node("Conv", ["s", "w2"], ["y"], name="conv2"),
    ]
    inits = {
        "w1": weight((4, 3, 3, 3)),
        "w2": weight((4, 4, 3, 3), seed=1),
        "k": np.linspace(0, 0.5, 36, dtype=np.float32).reshape(1, 1, 6, 6),
    }
    return model(nodes, {"x": (1, 3, 8, 8)}, {"y": None}, inits)


def test_a_new_op_family_is_one_registration(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worked example of docs/architecture.md: Sub becomes quantizable by registering a decide function."""
    before = quantize(_conv_sub())
    sub = before.plan.nodes["sub"]
    assert (
        not sub.quantized
        and sub.code is Reason.NO_QUANTIZED_FORM
        and sub.reason == "no quantized form for Sub in lowbit"
    )

    def sub_family(n: ir.Node, scheme: Scheme) -> OpSpec | Skip:
        for i in range(2):
            if (bad := float_input(n, i)) is not None:
                return bad
        return OpSpec(activations=(0, 1))

    monkeypatch.setattr(registry, "_TABLE", dict(registry._TABLE))  # keep the change inside this test
    registry.register("static", ["Sub"], sub_family)
    after = quantize(_conv_sub())
    sub = after.plan.nodes["sub"]
    assert sub.quantized and sub.code is Reason.STATIC and sub.mode == "static"
    assert "s" in after.plan.tensors and "k" in after.plan.tensors  # its output and its constant operand

    def fed_by_dq(res: lowbit.QuantizeResult) -> int:
        made = {o: n.op_type for n in res.model.graph.node for o in n.output}
        sub_node = next(n for n in res.model.graph.node if n.op_type == "Sub")
        return sum(made.get(i) == "DequantizeLinear" for i in sub_node.input)

    assert (fed_by_dq(before), fed_by_dq(after)) == (1, 2)  # the constant operand is stored quantized too


def test_registering_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("static", ["Conv"], lambda n, s: Skip(Reason.NO_QUANTIZED_FORM, {"op": "Conv"}))


def test_decisions_are_codes_with_details_and_the_deciding_rule(tmp_path: Path) -> None:
    m = _conv_sub()
    recipe = lowbit.Recipe(rules=(lowbit.Rule(names=("conv2",), scheme=Scheme(mode="float")),))
    res = lowbit.quantize(m, tmp_path / "q.onnx", calib=samples(m), recipe=recipe, progress=False)
    data = json.loads((tmp_path / "q.plan.json").read_text())
    assert data["version"] == 2
    conv2 = data["nodes"]["conv2"]
    assert conv2["code"] == "mode_float" and conv2["rule_index"] == 0 and conv2["decided_by"] == "rule"
    assert conv2["reason"] == res.plan.nodes["conv2"].reason == "kept float (rule 0 rule(names=['conv2']): mode float)"
    conv1 = data["nodes"]["conv1"]
    assert conv1["code"] == "static" and conv1["details"] == {
        "activations": "uint8",
        "weights": "int8",
        "granularity": "per-channel",
    }
    assert conv1["rule_index"] is None and conv1["decided_by"] == "default"
    assert render(Reason(conv1["code"]), conv1["details"]) == "uint8 activations, int8 per-channel weights"


def _as_version_1(plan_file: Path) -> None:
    """Rewrite a plan file the way lowbit 0.1 stored it: each node's sentence only."""
    data = json.loads(plan_file.read_text())
    data["version"] = 1
    data["nodes"] = {
        k: {"op_type": v["op_type"], "quantized": v["quantized"], "reason": v["reason"], "rule": v["rule"]}
        for k, v in data["nodes"].items()
    }
    plan_file.write_text(json.dumps(data))


def test_version_1_plans_are_read_and_reapply_to_the_same_bytes(tmp_path: Path) -> None:
    nodes = [
        node("Conv", ["x", "w1"], ["c1"], name="conv1"),
        node("Relu", ["c1"], ["r1"], name="relu1"),
        node("MaxPool", ["r1"], ["p"], name="pool", kernel_shape=[2, 2]),
        node("Conv", ["p", "w2"], ["y"], name="conv2"),
    ]
    m = model(nodes, {"x": (1, 3, 8, 8)}, {"y": None}, {"w1": weight((4, 3, 3, 3)), "w2": weight((4, 4, 3, 3), 1)})
    first = lowbit.quantize(m, tmp_path / "q.onnx", calib=samples(m), progress=False)
    _as_version_1(tmp_path / "q.plan.json")
    old = lowbit.Plan.load(tmp_path / "q.plan.json")
    assert old.version == 2
    assert old.nodes["relu1"].code is Reason.FOLDED and old.nodes["relu1"].details == {"into": "conv1"}
    assert old.nodes["pool"].code is Reason.SHARES_SCALE
    assert old.nodes["conv1"].code is Reason.LEGACY and old.nodes["conv1"].reason == first.plan.nodes["conv1"].reason
    again = lowbit.quantize(m, plan=old, progress=False)
    assert again.model.SerializeToString() == first.model.SerializeToString()


def test_a_plan_of_an_unknown_version_is_a_clear_error(tmp_path: Path) -> None:
    p = tmp_path / "p.plan.json"
    p.write_text(json.dumps({"version": 99, "recipe": {}, "tensors": {}, "nodes": {}}))
    with pytest.raises(lowbit.LowbitError, match="version 99; this lowbit reads versions 1, 2"):
        lowbit.Plan.load(p)


def _residual() -> object:
    """Two convs whose outputs are added: the Add is quantized, with a scale of its own on each side."""
    nodes = [
        node("Conv", ["x", "w1"], ["a"], name="conv1"),
        node("Conv", ["x", "w2"], ["c"], name="conv2"),
        node("Relu", ["c"], ["b"], name="relu"),  # else the summed convs of one input merge
        node("Add", ["a", "b"], ["s"], name="add"),
        node("Conv", ["s", "w3"], ["y"], name="conv3"),
    ]
    # 4 input channels: a 3-channel image stem would stay float for the onnxruntime target (test_image_stem.py)
    inits = {"w1": weight((4, 4, 3, 3)), "w2": weight((4, 4, 3, 3), 1), "w3": weight((4, 4, 3, 3), 2)}
    return model(nodes, {"x": (1, 4, 8, 8)}, {"y": None}, inits)


def test_the_target_decides_whether_add_scales_are_aligned_for_litert() -> None:
    m = _residual()
    portable = quantize(m)
    plain = quantize(m, lowbit.Recipe(target="onnxruntime"))
    ranges = {k: v.range for k, v in plain.plan.tensors.items() if v.kind == "activation"}
    assert ranges == {k: v.range for k, v in portable.plan.tensors.items() if v.kind == "activation"}
    from lowbit.numerics import scale_zero_point

    # onnxruntime: every activation scale is the one its range gives; portable: Add scales moved by ~1e-7 at most
    for name, p in plain.plan.tensors.items():
        if p.kind == "activation":
            assert p.scale == [float(scale_zero_point(*p.range, "uint8", False)[0])], name
    moved = [
        k for k, v in portable.plan.tensors.items() if v.kind == "activation" and v.scale != plain.plan.tensors[k].scale
    ]
    assert moved and all(
        abs(portable.plan.tensors[k].scale[0] / plain.plan.tensors[k].scale[0] - 1) < 1e-5 for k in moved
    )
    with pytest.raises(lowbit.LowbitError, match="'target' must be one of portable, onnxruntime"):
        lowbit.Recipe(target="tflite")  # type: ignore[arg-type]


def test_16_bit_adds_are_left_as_calibrated() -> None:
    """The LiteRT alignment is for 8-bit ADDs; on uint16 ones it tried all 65536^2 input pairs (MemoryError on
    EfficientNet-Lite0 with the int16-activations preset)."""
    res = quantize(_residual(), lowbit.Recipe(default=Scheme(activations="uint16")))
    from lowbit.numerics import scale_zero_point

    for name, p in res.plan.tensors.items():
        if p.kind == "activation":
            assert p.dtype == "uint16" and p.scale == [float(scale_zero_point(*p.range, "uint16", False)[0])], name
