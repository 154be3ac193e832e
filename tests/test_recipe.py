"""Recipes: JSON round trip, validation messages, rule matching and exclusions, loading files."""

from __future__ import annotations

import json

import pytest

from lowbit.errors import LowbitError
from lowbit.recipe import PRESETS, RECIPE_VERSION, Recipe, Rule, Scheme, preset


def custom_recipe() -> Recipe:
    return Recipe(
        default=Scheme(activations="int8", per_channel=False, calibration="percentile", percentile=99.9),
        rules=(
            Rule(names=("head/*",), scheme=None),
            Rule(op_types=("Conv", "ConvTranspose"), scheme=Scheme(activations="uint16", calibration="entropy")),
            Rule(names=("block*",), op_types=("MatMul",), scheme=Scheme(weights="uint8", symmetric_weights=False)),
        ),
        exclude_names=("*softmax*", "final"),
        exclude_op_types=("LayerNormalization",),
        calibration_samples=64,
        batch_size=4,
    )


# ----------------------------------------------------------------------------------------------------------
# JSON round trip
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name, tmp_path):
    r = preset(name)
    text = r.to_json()
    assert json.loads(text)["version"] == RECIPE_VERSION
    back = Recipe.from_dict(json.loads(text))
    assert back == r
    assert back.to_json() == text
    path = tmp_path / f"{name}.json"
    path.write_text(text)
    assert Recipe.load(path) == r


def test_custom_recipe_round_trip(tmp_path):
    r = custom_recipe()
    data = json.loads(r.to_json())
    assert data["rules"][0]["scheme"] is None
    assert data["rules"][1]["op_types"] == ["Conv", "ConvTranspose"]
    assert data["exclude_names"] == ["*softmax*", "final"]
    back = Recipe.from_dict(data)
    assert back == r
    assert isinstance(back.rules, tuple) and isinstance(back.rules[2].names, tuple)
    assert back.rules[1].scheme == Scheme(activations="uint16", calibration="entropy")
    path = tmp_path / "r.json"
    path.write_text(r.to_json())
    assert Recipe.load(path) == r
    # Recipes are hashable frozen values: equal recipes hash equal.
    assert hash(back) == hash(r)


def test_partial_dict_fills_defaults():
    r = Recipe.from_dict({"default": {"activations": "int16"}, "rules": [{"op_types": ["Gemm"]}]})
    assert r.default == Scheme(activations="int16")
    assert r.rules == (Rule(op_types=("Gemm",), scheme=None),)
    assert r.calibration_samples == Recipe().calibration_samples
    assert Recipe.from_dict({}) == Recipe()


def test_presets():
    assert preset("default") == Recipe()
    assert preset("accurate").default.calibration == "layer_error"
    assert preset("int16-activations").default.activations == "uint16"
    with pytest.raises(LowbitError, match="unknown preset 'fast'.*default"):
        preset("fast")


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, key, where",
    [
        ({"defualt": {}}, "defualt", "recipe"),
        ({"default": {"activation": "int8"}}, "activation", "recipe.default"),
        ({"rules": [{"op_types": ["Conv"]}, {"op_type": ["Conv"]}]}, "op_type", "recipe.rules[1]"),
        ({"rules": [{"op_types": ["Conv"], "scheme": {"calib": "mse"}}]}, "calib", "recipe.rules[0].scheme"),
    ],
)
def test_unknown_key_is_named(data, key, where):
    with pytest.raises(LowbitError) as e:
        Recipe.from_dict(data)
    msg = str(e.value)
    assert f"'{key}'" in msg and where in msg
    assert "valid keys" in msg


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"default": {"symetric_weights": True}}))
    with pytest.raises(LowbitError, match=r"'symetric_weights'.*bad\.json\.default"):
        Recipe.load(path)


@pytest.mark.parametrize(
    "scheme, option",
    [
        ({"activations": "int4"}, "activations"),
        ({"activations": 8}, "activations"),
        ({"weights": "int16"}, "weights"),
        ({"calibration": "kl"}, "calibration"),
        ({"per_channel": "yes"}, "per_channel"),
        ({"per_channel": 1}, "per_channel"),
        ({"reduce_range": None}, "reduce_range"),
        ({"bias_correction": "no"}, "bias_correction"),
        ({"percentile": 50}, "percentile"),
        ({"percentile": 100.5}, "percentile"),
        ({"percentile": "99"}, "percentile"),
    ],
)
def test_bad_literal_values(scheme, option):
    with pytest.raises(LowbitError, match=f"'{option}'"):
        Recipe.from_dict({"default": scheme})
    with pytest.raises(LowbitError, match=f"'{option}'"):
        Scheme(**scheme)


def test_percentile_bounds_are_open_closed():
    assert Scheme(percentile=100).percentile == 100
    assert Scheme(percentile=50.001).percentile == 50.001


@pytest.mark.parametrize(
    "data, option",
    [
        ({"calibration_samples": 0}, "calibration_samples"),
        ({"calibration_samples": 1.5}, "calibration_samples"),
        ({"calibration_samples": True}, "calibration_samples"),
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": "8"}, "batch_size"),
    ],
)
def test_bad_counts(data, option):
    with pytest.raises(LowbitError, match=f"'{option}' must be a positive integer"):
        Recipe.from_dict(data)


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"version": 2}, "version 2"),
        ({"exclude_names": "conv1"}, "exclude_names must be a list of strings"),
        ({"exclude_op_types": [1]}, "exclude_op_types must be a list of strings"),
        ({"rules": [{"names": "conv*"}]}, "rules[0].names must be a list of strings"),
        ({"default": ["int8"]}, "recipe.default must be a JSON object"),
        ({"rules": ["Conv"]}, "recipe.rules[0] must be a JSON object"),
        ({"rules": None}, "recipe.rules must be a list"),
        ({"rules": 5}, "recipe.rules must be a list"),
        ({"rules": {"names": ["conv*"]}}, "recipe.rules must be a list"),
    ],
)
def test_bad_structure(data, needle):
    with pytest.raises(LowbitError) as e:
        Recipe.from_dict(data)
    assert needle in str(e.value)


def test_conflicting_options():
    with pytest.raises(LowbitError, match="conflicting options.*symmetric weights.*int8"):
        Scheme(weights="uint8")  # symmetric_weights defaults to True
    with pytest.raises(LowbitError, match="conflicting options"):
        Recipe.from_dict({"rules": [{"op_types": ["Conv"], "scheme": {"weights": "uint8", "symmetric_weights": True}}]})
    assert Scheme(weights="uint8", symmetric_weights=False).weights == "uint8"
    with pytest.raises(LowbitError, match="conflicting options.*reduce_range"):
        Scheme(activations="int16", reduce_range=True)
    assert Scheme(activations="uint8", reduce_range=True).reduce_range


# ----------------------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------------------


def test_first_matching_rule_wins_and_reason_is_reported():
    r = custom_recipe()
    s, why = r.scheme_for("head/conv", "Conv")  # rules 0 and 1 both match: 0 wins
    assert s is None and why.startswith("rule 0") and "head/*" in why
    s, why = r.scheme_for("stem/conv", "Conv")
    assert s == Scheme(activations="uint16", calibration="entropy")
    assert why == "rule 1 rule(op_types=['Conv', 'ConvTranspose'])"
    s, why = r.scheme_for("block3/mm", "MatMul")  # both criteria of rule 2
    assert s.weights == "uint8" and why.startswith("rule 2") and "names=['block*']" in why and "MatMul" in why
    s, why = r.scheme_for("other/mm", "MatMul")  # name criterion fails: falls to the default
    assert (s, why) == (r.default, "default")
    s, why = r.scheme_for("block3/add", "Add")  # op type criterion fails
    assert (s, why) == (r.default, "default")

    swapped = Recipe(rules=(r.rules[1], r.rules[0]))
    s, why = swapped.scheme_for("head/conv", "Conv")
    assert s == r.rules[1].scheme and why.startswith("rule 0")


def test_exclusions_come_before_rules():
    r = custom_recipe()
    assert r.scheme_for("attn/softmax_1", "Conv") == (None, "excluded by name")
    assert r.scheme_for("final", "Conv") == (None, "excluded by name")
    assert r.scheme_for("final_proj", "Conv")[1].startswith("rule 1")  # patterns match whole names
    assert r.scheme_for("ln", "LayerNormalization") == (None, "excluded op type LayerNormalization")
    assert r.scheme_for("ln", "layernormalization")[1] == "default"  # op types are exact


def test_name_patterns_are_case_sensitive_fnmatch():
    r = Recipe(rules=(Rule(names=("Conv_[0-9]", "dense?"), scheme=Scheme(activations="int16")),))
    assert r.scheme_for("Conv_3", "Conv")[0].activations == "int16"
    assert r.scheme_for("dense1", "Gemm")[0].activations == "int16"
    assert r.scheme_for("conv_3", "Conv")[1] == "default"
    assert r.scheme_for("Conv_12", "Conv")[1] == "default"
    assert r.scheme_for("dense12", "Gemm")[1] == "default"


def test_empty_rule_matches_nothing():
    r = Recipe(rules=(Rule(scheme=None),))
    assert r.scheme_for("anything", "Conv") == (r.default, "default")
    assert not Rule().matches("x", "Conv")


# ----------------------------------------------------------------------------------------------------------
# Loading files
# ----------------------------------------------------------------------------------------------------------


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(LowbitError) as e:
        Recipe.load(path)
    msg = str(e.value)
    assert "not found" in msg and str(path) in msg and "\n" not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__


@pytest.mark.parametrize("text", ['{"default": {"activations": "int8",}}', "{\n\n  'default': 1\n}", "", "\xff\xfe"])
def test_load_invalid_json_is_one_line(tmp_path, text):
    path = tmp_path / "broken.json"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(LowbitError) as e:
        Recipe.load(path)
    msg = str(e.value)
    assert "not valid JSON" in msg and str(path) in msg
    assert "\n" not in msg
    assert e.value.__suppress_context__


def test_load_directory_is_a_lowbit_error(tmp_path):
    with pytest.raises(LowbitError) as e:
        Recipe.load(tmp_path)
    assert "cannot read recipe file" in str(e.value) and "\n" not in str(e.value)


def test_load_non_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(LowbitError, match="must hold a JSON object"):
        Recipe.load(path)
