"""Hybrid recipes: one model, a scheme per rule, every mode at once; rules that match nothing warn."""

from __future__ import annotations

import json

import onnx
import pytest

import lowbit
from helpers import model, node, op_counts, rel_rms, run, samples, weight
from lowbit import LowbitError, Recipe, Rule, Scheme
from lowbit.cli.main import main


def stack(d: int = 32) -> onnx.ModelProto:
    names = ["static8", "x16", "dyn", "wo8", "wo4", "half", "keep"]
    nodes, x = [], "x"
    inits = {}
    for i, n in enumerate(names):
        inits[f"w_{n}"] = weight((d, d), i + 1, 0.25)
        nodes += [node("MatMul", [x, f"w_{n}"], [f"m_{n}"], n), node("Tanh", [f"m_{n}"], [f"t_{n}"], f"tanh_{n}")]
        x = f"t_{n}"
    nodes.append(node("Identity", [x], ["y"], "out"))
    return model(nodes, {"x": (4, d)}, {"y": (4, d)}, inits)


HYBRID = Recipe(
    default=Scheme(mode="float"),
    rules=(
        Rule(names=("static8",), scheme=Scheme()),
        Rule(names=("x16", "tanh_x16"), scheme=Scheme(activations="uint16")),
        Rule(names=("dyn",), scheme=Scheme(mode="dynamic")),
        Rule(names=("wo8",), scheme=Scheme(mode="weight_only")),
        Rule(names=("wo4",), scheme=Scheme(mode="weight_only", weights="int4", block_size=16)),
        Rule(names=("half", "tanh_half"), scheme=Scheme(mode="float16")),
        Rule(names=("keep",), scheme=None),
    ),
)


def test_every_scheme_in_one_model():
    m = stack()
    feeds = samples(m, 16)
    res = lowbit.quantize(m, calib=feeds, recipe=HYBRID, progress=False)
    counts = op_counts(res.model)
    assert counts["MatMulInteger"] == 1 and counts["MatMulNBits"] == 1 and counts["DynamicQuantizeLinear"] == 1
    assert counts["MatMul"] == 5  # static8, x16 (QDQ), wo8 (DQ weight), half (fp16), keep (float)
    n = res.plan.nodes
    assert n["static8"].rule.startswith("rule 0") and "uint8 activations" in n["static8"].reason
    assert res.plan.tensors["m_x16"].dtype == "uint16"
    assert n["dyn"].rule.startswith("rule 2") and "dynamic" in n["dyn"].reason
    assert n["wo8"].rule.startswith("rule 3") and "weight-only int8" in n["wo8"].reason
    assert n["wo4"].rule.startswith("rule 4") and "blocks of 16" in n["wo4"].reason
    assert n["half"].rule.startswith("rule 5") and n["half"].reason == "float16 weights and compute"
    assert not n["keep"].quantized and n["keep"].rule.startswith("rule 6")
    assert not n["tanh_dyn"].quantized and n["tanh_dyn"].rule == "default"
    ref = run(m, feeds, float_model=True)[0]
    for mode in ("kernels", "simulate"):
        assert rel_rms(ref, run(res.model, feeds, mode=mode)[0]) < 0.15  # int4 round-to-nearest alone: 0.12


def test_recipe_json_round_trip_with_modes():
    back = Recipe.from_dict(json.loads(HYBRID.to_json()))
    assert back == HYBRID


def test_rule_matching_nothing_warns():
    rec = Recipe(default=Scheme(mode="dynamic"), rules=(Rule(names=("nothing*",), scheme=None),))
    with pytest.warns(UserWarning, match=r"names=\['nothing\*'\].*rule 0.*matches no node"):
        lowbit.quantize(stack(), recipe=rec, progress=False)


def test_cli_modes_warnings_and_errors(tmp_path, capsys):
    src = tmp_path / "m.onnx"
    onnx.save(stack(), str(src))
    rec = tmp_path / "r.json"
    rec.write_text(json.dumps({"default": {"mode": "dynamic"}, "rules": [{"op_types": ["LSTM"], "scheme": None}]}))
    assert main(["quantize", str(src), "-o", str(tmp_path / "d.onnx"), "--recipe", str(rec), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "lowbit: warning: recipe rule(op_types=['LSTM']) (rule 0) matches no node" in err
    assert (tmp_path / "d.plan.json").exists()
    out = tmp_path / "w4.onnx"
    assert main(["quantize", str(src), "-o", str(out), "--mode", "weight_only", "--weights", "int4", "--quiet"]) == 0
    assert op_counts(onnx.load(str(out)))["MatMulNBits"] == 7
    rec.write_text(json.dumps({"default": {"mode": "dynamc"}}))
    assert main(["quantize", str(src), "-o", str(tmp_path / "bad.onnx"), "--recipe", str(rec)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lowbit: error: recipe option 'mode' must be one of") and "\n" not in err
    assert not (tmp_path / "bad.onnx").exists()


@pytest.mark.parametrize("name", ["dynamic", "weight-only-int8", "weight-only-int4", "float16", "mixed-16x8"])
def test_presets_print_and_load(name, capsys):
    assert main(["recipe", "--show", name]) == 0
    assert Recipe.from_dict(json.loads(capsys.readouterr().out)) == lowbit.recipe.preset(name)


def test_unknown_scheme_key_is_one_line():
    with pytest.raises(LowbitError, match="unknown recipe key 'precision'") as e:
        Recipe.from_dict({"rules": [{"names": ["a"], "scheme": {"precision": "int4"}}]})
    assert "\n" not in str(e.value)
