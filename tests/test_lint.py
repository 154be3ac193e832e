"""Performance lint: each slow pattern planted in a tiny model is found with its node names; clean models pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import lowbit
import lowbit.runtimes.ort as ort_runtime
from conftest import tiny_cnn
from helpers import model, node, samples, weight
from lowbit.evaluate.lint import lint
from lowbit.plan import plan_path
from test_cli import lowbit as run_cli


def sandwich(op: str, *more: str) -> onnx.ModelProto:
    """Conv -> op (named "mid") -> Conv [-> more[0] (named "mid2") -> Conv ...]."""
    nodes = [node("Conv", ["x", "w0"], ["c0"], name="conv0")]
    inits = {"w0": weight((4, 3, 1, 1))}
    for k, o in enumerate((op, *more)):
        nodes += [
            node(o, [f"c{k}"], [f"m{k}"], name="mid" if k == 0 else f"mid{k + 1}"),
            node("Conv", [f"m{k}", f"w{k + 1}"], [f"c{k + 1}"], name=f"conv{k + 1}"),
        ]
        inits[f"w{k + 1}"] = weight((4, 4, 1, 1), k + 1)
    nodes[-1].output[0] = "y"
    return model(nodes, {"x": (1, 3, 8, 8)}, {"y": None}, inits)


def quantized(m: onnx.ModelProto, recipe: lowbit.Recipe | None = None) -> lowbit.QuantizeResult:
    return lowbit.quantize(m, calib=samples(m, n=8), recipe=recipe, progress=False)


def warnings(findings: list[dict]) -> list[dict]:
    return [f for f in findings if f["level"] != "info"]


def by_kind(findings: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in findings:
        out.setdefault(f["kind"], []).append(f)
    return out


def test_float_island_between_quantized_convs() -> None:
    # lowbit has no quantized Sin, so Sin stays float while both convs around it are quantized.
    result = quantized(sandwich("Sin"))
    assert result.plan.nodes["mid"].quantized is False
    for findings in (lint(result.model), lint(result.model, plan=result.plan)):
        assert [f["kind"] for f in findings] == ["float-island"]
        assert findings[0]["nodes"] == ["mid"]
        assert "mid" in findings[0]["message"] and findings[0]["fix"]


def test_quantized_op_without_integer_kernel() -> None:
    # HardSwish is quantized (QDQ form) but ORT inlines it into float HardSigmoid * x: no integer kernel.
    result = quantized(sandwich("HardSwish"))
    assert result.plan.nodes["mid"].quantized is True
    findings = lint(result.model, plan=result.plan)
    assert [(f["kind"], f["nodes"]) for f in findings] == [("no-integer-kernel", ["mid"])]
    assert "HardSwish" in findings[0]["message"]


def test_dynamically_quantized_conv(tmp_path: Path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    onnx.save(sandwich("Relu"), str(tmp_path / "f.onnx"))
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "d.onnx"), op_types_to_quantize=["Conv"])
    dyn = onnx.load(str(tmp_path / "d.onnx"))
    conv_integer = sorted(n.name for n in dyn.graph.node if n.op_type == "ConvInteger")
    assert len(conv_integer) == 2
    findings = lint(tmp_path / "d.onnx")
    kinds = by_kind(findings)
    assert sorted(kinds["dynamic-conv"][0]["nodes"]) == conv_integer
    assert "--calib" in kinds["dynamic-conv"][0]["fix"]
    assert all(n.startswith("conv") for n in conv_integer)


def test_default_quantization_of_tiny_cnn_is_clean() -> None:
    m = tiny_cnn(batch=1)
    result = quantized(m)
    assert warnings(lint(result.model, plan=result.plan)) == []
    assert warnings(lint(result.model)) == []


def _qlinear_conv(act: type) -> onnx.ModelProto:
    """Quantize -> QLinearConv -> Dequantize with `act` (np.int8 or np.uint8) activations."""
    inits = {
        "xs": np.float32(0.02),
        "xz": act(0),
        "w": np.ones((4, 3, 1, 1), np.int8),
        "ws": np.float32(0.01),
        "wz": np.int8(0),
        "ys": np.float32(0.05),
        "yz": act(0),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="quant"),
        helper.make_node("QLinearConv", ["xq", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["yq"], name="qconv"),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dequant"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_activations_flagged_only_without_vnni(monkeypatch: pytest.MonkeyPatch, vnni: bool) -> None:
    monkeypatch.setattr(ort_runtime, "cpu_has_vnni", lambda: vnni)
    findings = lint(_qlinear_conv(np.int8))
    assert [(f["kind"], f["nodes"]) for f in findings] == [("int8-activations-x86", ["qconv"])]
    assert findings[0]["level"] == ("info" if vnni else "warning")
    assert ("VNNI" in findings[0]["message"]) and ("uint8" in findings[0]["fix"])
    assert lint(_qlinear_conv(np.uint8)) == []


def test_int8_qdq_convs_left_unfused() -> None:
    # ORT 1.32 on x86 does not fuse QDQ convs whose activations are int8: they run in float.
    result = quantized(tiny_cnn(batch=1), lowbit.Recipe(default=lowbit.Scheme(activations="int8")))
    kinds = by_kind(lint(result.model, plan=result.plan))
    assert list(kinds) == ["missing-fusion"]
    nodes = [n for f in kinds["missing-fusion"] for n in f["nodes"]]
    assert {"conv1", "conv2"} <= set(nodes)
    assert all("--activations uint8" in f["fix"] for f in kinds["missing-fusion"])


def test_relu_between_conv_and_its_quantize() -> None:
    # A Relu that ORT cannot drop (output zero point 128) keeps the QDQ conv from fusing.
    def const(name: str, a: np.ndarray) -> onnx.TensorProto:
        return numpy_helper.from_array(np.asarray(a), name)

    inits = [
        const("xs", np.float32(0.02)),
        const("xz", np.uint8(128)),
        const("w", np.ones((4, 3, 1, 1), np.int8)),
        const("ws", np.float32(0.01)),
        const("wz", np.int8(0)),
        const("ys", np.float32(0.05)),
        const("yz", np.uint8(128)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dqw"),
        helper.make_node("Conv", ["xd", "wd"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "ys", "yz"], ["yq"], name="qy"),
        helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"], name="dqy"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    findings = lint(m)
    assert [(f["kind"], f["nodes"]) for f in findings] == [("missing-fusion", ["conv", "relu"])]
    assert "Relu" in findings[0]["message"]


def test_findings_are_deterministic_and_not_duplicated() -> None:
    # Three slow patterns in one model, listed in kind order whatever their order in the graph.
    result = quantized(sandwich("HardSwish", "Erf", "Sin"))
    first, second = lint(result.model, plan=result.plan), lint(result.model)
    assert lint(result.model, plan=result.plan) == first
    # With the plan, a float island's message also says why lowbit kept it float; kinds, nodes, fixes agree.
    assert [(f["kind"], f["nodes"], f["fix"]) for f in first] == [(f["kind"], f["nodes"], f["fix"]) for f in second]
    assert [(f["kind"], f["nodes"]) for f in first] == [
        ("float-island", ["mid2"]),
        ("float-island", ["mid3"]),
        ("no-integer-kernel", ["mid"]),
    ]
    for f in first:
        assert set(f) == {"kind", "level", "nodes", "message", "fix"}
        assert "\n" not in f["message"] and "\n" not in f["fix"]


def test_plan_beside_model_path_is_used(tmp_path: Path) -> None:
    out = tmp_path / "q.onnx"
    result = lowbit.quantize(sandwich("Sin"), output=out, calib=samples(sandwich("Sin"), n=8), progress=False)
    assert plan_path(out).is_file()
    assert lint(out) == lint(result.model, plan=result.plan)


def test_user_mistakes(tmp_path: Path) -> None:
    with pytest.raises(lowbit.LowbitError, match="runtime"):
        lint(_qlinear_conv(np.uint8), runtime="tflite")
    with pytest.raises(lowbit.LowbitError, match="not found"):
        lint(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07 not a model \xff\xff")
    with pytest.raises(lowbit.LowbitError):
        lint(bad)


def test_quantize_cli_prints_lint(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "out.onnx")
    proc = run_cli("quantize", str(tiny_model), "-o", out, "--calib", str(tiny_calib), "--quiet", "--check", "0")
    assert proc.returncode == 0, proc.stderr
    assert "performance lint: nothing found" in proc.stdout
    proc = run_cli(
        "quantize",
        str(tiny_model),
        "-o",
        out,
        "--calib",
        str(tiny_calib),
        "--quiet",
        "--check",
        "0",
        "--activations",
        "int8",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert "missing-fusion" in [f["kind"] for f in data["lint"]]
    proc = run_cli(
        "quantize",
        str(tiny_model),
        "-o",
        out,
        "--calib",
        str(tiny_calib),
        "--quiet",
        "--check",
        "0",
        "--activations",
        "int8",
    )
    section = proc.stdout[proc.stdout.index("performance lint:") :].splitlines()
    assert section[0] == "performance lint:" and section[1].startswith("  missing-fusion: ")


def test_static_int4_weights_are_named_as_the_reason_and_last_layer_included() -> None:
    """Static int4 weights (com.microsoft DequantizeLinear below opset 21) run in float in ORT: the finding says
    why and offers int8 or MatMulNBits, not 're-quantize with lowbit'; the model's last MatMul (no Q after it)
    runs in float too and is named."""
    from test_energy_forms import CALIB, _mlp

    q = lowbit.quantize(
        _mlp(), calib=CALIB, recipe=lowbit.Recipe(default=lowbit.Scheme(weights="int4")), progress=False
    )
    assert any(n.domain == "com.microsoft" and n.op_type == "DequantizeLinear" for n in q.model.graph.node)
    found = lint(q.model, plan=q.plan)
    assert [f["kind"] for f in found] == ["missing-fusion"]
    assert found[0]["nodes"] == ["mm1", "gemm", "mm3"]
    assert "4-bit weights" in found[0]["message"] and "MatMulNBits" in found[0]["fix"]
    assert "re-quantize" not in found[0]["fix"]


@pytest.mark.parametrize(
    "scheme",
    [
        lowbit.Scheme(mode="dynamic"),
        lowbit.Scheme(mode="weight_only"),
        lowbit.Scheme(mode="weight_only", weights="int4", block_size=32),
    ],
)
def test_dynamic_and_weight_only_models_are_clean(scheme: lowbit.Scheme) -> None:
    from test_energy_forms import _mlp
    from test_recurrent import lstm_model

    for m in (_mlp(), lstm_model()):
        if scheme.weights == "int4" and m.graph.node[0].op_type == "LSTM":
            continue  # weight-only LSTM stays float: nothing quantized to lint
        q = lowbit.quantize(m, recipe=lowbit.Recipe(default=scheme), progress=False)
        assert any(e.quantized for e in q.plan.nodes.values())
        assert lint(q.model, plan=q.plan) == []
