"""The lint's float-island advice is true: "remove it from exclude_names" only for nodes the recipe excluded,
otherwise the plan's own reason and a fix that exists."""

from __future__ import annotations

import lowbit
from lowbit.evaluate.lint import lint
from test_lint import quantized, sandwich


def islands(findings: list[dict]) -> list[dict]:
    return [f for f in findings if f["kind"] == "float-island"]


def test_excluded_by_name_says_which_exclusion_to_remove() -> None:
    result = quantized(sandwich("Tanh"), lowbit.Recipe(exclude_names=("mid",)))
    (f,) = islands(lint(result.model, plan=result.plan))
    assert f["nodes"] == ["mid"]
    assert f["fix"] == "quantize it: remove mid from exclude_names"


def test_excluded_op_type_names_the_op_type() -> None:
    result = quantized(sandwich("Tanh"), lowbit.Recipe(exclude_op_types=("Tanh",)))
    (f,) = islands(lint(result.model, plan=result.plan))
    assert f["fix"] == "quantize it: remove Tanh from exclude_op_types"


def test_not_excluded_gives_the_plans_reason_not_exclusion_advice() -> None:
    # Sin: no quantized form in lowbit, nobody excluded it.
    result = quantized(sandwich("Sin"))
    for findings in (lint(result.model, plan=result.plan), lint(result.model)):
        (f,) = islands(findings)
        assert "exclude" not in f["fix"]
    (f,) = islands(lint(result.model, plan=result.plan))
    assert result.plan.nodes["mid"].reason in f["message"]


def test_without_a_plan_no_finding_blames_an_exclusion() -> None:
    # Without the plan the lint cannot know what a recipe excluded: it must not claim that anything was.
    result = quantized(sandwich("Tanh"), lowbit.Recipe(exclude_names=("mid",)))
    findings = lint(result.model)
    assert [f["nodes"] for f in findings] == [["mid"]]
    assert all("from exclude_" not in f["fix"] for f in findings)
