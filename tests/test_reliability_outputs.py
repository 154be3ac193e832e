"""Promises about what lowbit writes: the model and its plan together or not at all, never over a file it reads,
interrupts that leave no temporaries and say what was written, plans checked before they are applied."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import lowbit
from conftest import CliRun, run_cli, tiny_cnn
from lowbit.graph import write as gwrite
from lowbit.plan import Plan

SRC = Path(__file__).resolve().parents[1] / "src"


def one_line_error(r: CliRun, *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def snapshot(*paths: Path) -> dict[Path, bytes | None]:
    return {p: p.read_bytes() if p.is_file() else None for p in paths}


@pytest.fixture
def quantized(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> Path:
    """tiny_model quantized to q.onnx (+ q.plan.json) by the CLI."""
    r = run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "q.onnx"), "--calib", str(tiny_calib), "--quiet")
    assert r.returncode == 0, r.stderr
    return tmp_path / "q.onnx"


# 1. the model and its plan: both or neither


def test_model_and_plan_are_written_both_or_neither(
    tiny_model: Path, quantized: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = quantized.with_suffix(".plan.json")
    before = snapshot(quantized, plan)
    real_replace = os.replace
    calls: list[str] = []

    def model_rename_fails(src, dst):  # the plan is renamed first, the model last: fail the model's
        calls.append(str(dst))
        if str(dst).endswith(".onnx"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(gwrite.os, "replace", model_rename_fails)
    data = np.random.default_rng(5).normal(0, 3, (8, 3, 16, 16)).astype(np.float32)
    with pytest.raises(OSError):
        lowbit.quantize(tiny_model, quantized, calib=[data], progress=False)
    assert calls[0].endswith(".plan.json") and calls[1].endswith(".onnx")
    assert snapshot(quantized, plan) == before  # the old plan is back beside the old model
    assert temps(tmp_path) == []

    # a failure while writing the temporaries (a full disk) replaces nothing either
    monkeypatch.setattr(gwrite.os, "replace", real_replace)
    real_temp = gwrite._temp_beside

    def disk_full(path, data):
        if path.suffix == ".onnx":
            raise OSError(28, "No space left on device")
        return real_temp(path, data)

    monkeypatch.setattr(gwrite, "_temp_beside", disk_full)
    with pytest.raises(OSError):
        lowbit.quantize(tiny_model, quantized, calib=[data], progress=False)
    assert snapshot(quantized, plan) == before and temps(tmp_path) == []


def test_plan_records_its_model_bytes_so_a_mismatched_pair_is_detectable(quantized: Path, tmp_path: Path) -> None:
    plan = Plan.load(quantized.with_suffix(".plan.json"))
    data = quantized.read_bytes()
    assert plan.model_sha256 == hashlib.sha256(data).hexdigest()
    plan.check_model(data, quantized)
    with pytest.raises(lowbit.LowbitError, match="not the model its plan was written with"):
        plan.check_model(data + b"x", quantized)


def test_plan_path_that_is_a_folder_is_refused_before_anything_is_written(
    tiny_model: Path, tiny_calib: Path, tmp_path: Path
) -> None:
    (tmp_path / "out.plan.json").mkdir()
    r = run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "out.onnx"), "--calib", str(tiny_calib))
    one_line_error(r, "is a folder")
    assert not (tmp_path / "out.onnx").exists() and temps(tmp_path) == []


def _sigint_as_in_a_terminal() -> None:
    """A job started in the background (nohup, some CI runners) inherits SIGINT ignored, and Python then leaves it
    ignored; a user's terminal delivers it. Restored to the default, the child's Python installs its handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


_INTERRUPT = """
import os, signal, sys
import lowbit.graph.write as gwrite
from lowbit.cli.main import main
sig, phase = int(sys.argv[1]), sys.argv[2]
real_fsync, real_replace = os.fsync, os.replace
def fsync(fd):  # the signal arrives while the temporaries are being written
    os.kill(os.getpid(), sig)
    return real_fsync(fd)
def replace(src, dst):  # the signal arrives between the renames of one commit
    os.kill(os.getpid(), sig)
    return real_replace(src, dst)
if phase == "write":
    gwrite.os.fsync = fsync
else:
    gwrite.os.replace = replace
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("phase", ["write", "commit"])
def test_interrupt_during_write_leaves_no_temporaries_and_says_what_was_written(
    sig: int, phase: str, tiny_model: Path, tiny_calib: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.onnx"
    args = ["quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--quiet", "--check", "0"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT, str(int(sig)), phase, *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert proc.returncode == 130, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert temps(tmp_path) == []
    if phase == "write":  # interrupted before the commit: nothing written, and it says so
        assert lines[0] == "lowbit: interrupted; no output was written"
        assert not out.exists() and not out.with_suffix(".plan.json").exists()
    else:  # the signal waited for both renames: both written, and it says so (never "no output was written")
        assert "no output was written" not in lines[0] and "interrupted after writing" in lines[0]
        plan = Plan.load(out.with_suffix(".plan.json"))
        assert plan.model_sha256 == hashlib.sha256(out.read_bytes()).hexdigest()


_INTERRUPT_AT = """
import importlib, os, signal, sys
from lowbit.cli.main import main
sig, where = int(sys.argv[1]), sys.argv[2]
module, name = where.rsplit(".", 1)
mod = importlib.import_module(module)
real = getattr(mod, name)
def interrupted(*args, **kwargs):  # the signal arrives as the stage starts
    os.kill(os.getpid(), sig)
    return real(*args, **kwargs)
setattr(mod, name, interrupted)
sys.exit(main(sys.argv[3:]))
"""

# Every stage of `lowbit quantize`, by the function that runs it (the CLI imports check, speed and lint late).
_STAGES = [
    "lowbit.pipeline.load",
    "lowbit.pipeline.prepare",
    "lowbit.pipeline.calibrate_layout",
    "lowbit.pipeline.decide_activations",
    "lowbit.pipeline.apply",
    "lowbit.evaluate.check.runtime_check",
    "lowbit.evaluate.speed.speed_check",
    "lowbit.evaluate.lint.lint",
]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("stage", _STAGES, ids=lambda s: s.rsplit(".", 1)[1])
def test_interrupt_at_each_stage_writes_nothing_and_says_so(
    sig: int, stage: str, tiny_model: Path, tiny_calib: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.onnx"
    args = ["quantize", str(tiny_model), "-o", str(out), "--calib", str(tiny_calib), "--quiet", "--check", "4"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    before = tiny_model.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-c", _INTERRUPT_AT, str(int(sig)), stage, *args],
        capture_output=True,
        text=True,
        env=env,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["lowbit: interrupted; no output was written"], proc.stderr
    assert not out.exists() and not out.with_suffix(".plan.json").exists() and temps(tmp_path) == []
    assert tiny_model.read_bytes() == before


# 2. nothing lowbit writes is a file it reads


@pytest.mark.parametrize("spelling", ["same", "dot", "symlink", "hardlink"])
def test_quantize_never_writes_over_a_file_it_reads(
    spelling: str, tiny_model: Path, tiny_calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "OUT.plan.json"
    recipe.write_text(lowbit.Recipe().to_json())
    name = {"same": "OUT.plan.json", "dot": "./OUT.plan.json", "symlink": "link.json", "hardlink": "hard.json"}
    if spelling == "symlink":
        os.symlink(recipe, tmp_path / "link.json")
    if spelling == "hardlink":
        os.link(recipe, tmp_path / "hard.json")
    before = recipe.read_bytes()
    r = run_cli("quantize", str(tiny_model), "--recipe", name[spelling], "-o", "OUT.onnx", "--calib", str(tiny_calib))
    one_line_error(r, "recipe", "which this run reads")
    assert recipe.read_bytes() == before and not (tmp_path / "OUT.onnx").exists()
    # the Python API takes paths too, and checks the same way before loading anything
    with pytest.raises(lowbit.LowbitError, match="which this run reads"):
        lowbit.quantize(tiny_model, "OUT.onnx", calib=tiny_calib, recipe=name[spelling], progress=False)
    # -o a hard link to the model, and the plan written over the calibration data or the plan read
    os.link(tiny_model, tmp_path / "hard.onnx")
    one_line_error(run_cli("quantize", str(tiny_model), "-o", "hard.onnx", "--calib", str(tiny_calib)), "input")
    calib = tmp_path / "c.plan.json"
    calib.write_bytes(tiny_calib.read_bytes())
    one_line_error(run_cli("quantize", str(tiny_model), "-o", "c.onnx", "--calib", str(calib)), "calibration data")


def test_quantize_with_plan_never_writes_over_that_plan(quantized: Path) -> None:
    plan = quantized.with_suffix(".plan.json")
    before = snapshot(quantized, plan)
    r = run_cli("quantize", str(quantized.parent / "tiny.onnx"), "--plan", str(plan), "-o", str(quantized))
    one_line_error(r, "plan", "which this run reads")
    assert snapshot(quantized, plan) == before


# 3. diagnose's outputs


@pytest.mark.parametrize("target", ["float", "quant", "data", "plan"])
@pytest.mark.parametrize("option", ["--recipe-out", "-o"])
def test_diagnose_outputs_never_overwrite_its_inputs(
    option: str, target: str, tiny_model: Path, tiny_calib: Path, quantized: Path
) -> None:
    plan = quantized.with_suffix(".plan.json")
    paths = {"float": tiny_model, "quant": quantized, "data": tiny_calib, "plan": plan}
    path = paths[target]
    if option == "-o" and target in ("data", "plan"):  # -o must end in .onnx: its plan lands on the file
        path = path.with_name("clash.onnx")
        os.replace(paths[target], path.with_suffix(".plan.json"))
        paths[target] = path.with_suffix(".plan.json")
    before = snapshot(*paths.values())
    args = ["diagnose", str(tiny_model), str(quantized), "--data", str(paths["data"]), "--quiet"]
    args += ["--plan", str(paths["plan"]), option, str(path)]
    r = run_cli(*args)
    if option == "-o" and target in ("float", "quant"):
        one_line_error(r, "is the input model")
    else:
        one_line_error(r, option if option == "--recipe-out" else "plan file (beside -o)", "which this run reads")
    assert snapshot(*paths.values()) == before


def test_a_plan_is_used_only_with_the_model_it_was_written_with(
    tiny_model: Path, tiny_calib: Path, quantized: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.onnx"
    r = run_cli("quantize", str(tiny_model), "-o", str(other), "--calib", str(tiny_calib), "--per-tensor", "--quiet")
    assert r.returncode == 0, r.stderr
    args = ["diagnose", str(tiny_model), str(quantized), "--data", str(tiny_calib), "--quiet"]
    one_line_error(run_cli(*args, "--plan", str(other.with_suffix(".plan.json"))), "is not the model its plan")
    with pytest.raises(lowbit.LowbitError, match="is not the model its plan"):
        lowbit.report(tiny_model, [quantized], tiny_calib, plan=other.with_suffix(".plan.json"), bench=False)


# 4. --plan applies the plan's own recipe


def test_cli_plan_uses_the_recipe_stored_in_the_plan(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    first = tmp_path / "a.onnx"
    r = run_cli("quantize", str(tiny_model), "-o", str(first), "--calib", str(tiny_calib), "--per-tensor", "--quiet")
    assert r.returncode == 0, r.stderr
    again = tmp_path / "b.onnx"
    r = run_cli("quantize", str(tiny_model), "-o", str(again), "--plan", str(first.with_suffix(".plan.json")))
    assert r.returncode == 0, r.stderr
    assert again.read_bytes() == first.read_bytes()  # per-tensor, as the plan's recipe says, like the Python API
    api = lowbit.quantize(tiny_model, plan=first.with_suffix(".plan.json"), progress=False)
    assert api.model.SerializeToString() == first.read_bytes()


def test_cli_plan_refuses_recipe_options_and_calibration_data(
    tiny_model: Path, tiny_calib: Path, quantized: Path, tmp_path: Path
) -> None:
    plan = str(quantized.with_suffix(".plan.json"))
    out = str(tmp_path / "b.onnx")
    one_line_error(run_cli("quantize", str(tiny_model), "-o", out, "--plan", plan, "--mode", "dynamic"), "--mode")
    one_line_error(run_cli("quantize", str(tiny_model), "-o", out, "--plan", plan, "--per-tensor"), "--per-tensor")
    r = run_cli("quantize", str(tiny_model), "-o", out, "--plan", plan, "--calib", str(tiny_calib))
    one_line_error(r, "--calib data would not be used", "drop --calib")
    with pytest.raises(lowbit.LowbitError, match="not used when a plan is given"):
        lowbit.quantize(tiny_model, calib=tiny_calib, plan=plan, progress=False)
    assert not Path(out).exists()


# 5. plan values are validated


def _bad(entry: dict, **change) -> dict:
    return {**entry, **change}


@pytest.mark.parametrize(
    "change, words",
    [
        ({"scale": [1e39]}, "float32 cannot represent"),
        ({"scale": [-0.1]}, "finite numbers > 0"),
        ({"scale": [0.0]}, "finite numbers > 0"),
        ({"scale": [float("nan")]}, "finite numbers > 0"),
        ({"scale": ["0.1"]}, "finite numbers > 0"),
        ({"scale": "0.1"}, "list of scales"),
        ({"zero_point": [300]}, "outside uint8's range"),
        ({"zero_point": [1.5]}, "must be integers"),
        ({"zero_point": ["3"]}, "must be integers"),
        ({"scale": [0.1, 0.2], "zero_point": [0, 0]}, "no axis"),
        ({"scale": [0.1, 0.2], "zero_point": [0, 0, 0], "axis": 0}, "activations are per tensor"),
        ({"axis": 0}, "activations are per tensor"),  # found by the plan fuzz: a crash in the Add alignment
        ({"dtype": "float"}, "has dtype"),
        ({"range": ["a", 1]}, "two finite numbers"),
    ],
)
def test_bad_plan_values_are_one_line_errors_naming_the_tensor(
    change: dict, words: str, quantized: Path, tmp_path: Path
) -> None:
    data = json.loads(quantized.with_suffix(".plan.json").read_text())
    name = next(k for k, v in data["tensors"].items() if v["kind"] == "activation" and v["dtype"] == "uint8")
    data["tensors"][name] = _bad(data["tensors"][name], **change)
    bad = tmp_path / "bad.plan.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(lowbit.LowbitError, match=words) as e:
        Plan.load(bad)
    assert f"'{name}'" in str(e.value) and "\n" not in str(e.value) and "--calib" in str(e.value)
    # a Plan object passed in is checked the same way
    good = Plan.load(quantized.with_suffix(".plan.json"))
    for k, v in change.items():
        setattr(good.tensors[name], k, v)
    with pytest.raises(lowbit.LowbitError, match=words):
        lowbit.quantize(quantized.parent / "tiny.onnx", plan=good, progress=False)


def test_bad_channel_means_are_a_one_line_error(quantized: Path, tmp_path: Path) -> None:
    data = json.loads(quantized.with_suffix(".plan.json").read_text())
    data["channel_means"] = {"conv1": ["a", 1.0]}
    bad = tmp_path / "bad.plan.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(lowbit.LowbitError, match="channel means of 'conv1'"):
        Plan.load(bad)


# 6. the graph fingerprint


def test_plan_for_another_graph_is_refused_unless_ranges_are_reused(quantized: Path, tmp_path: Path) -> None:
    plan = quantized.with_suffix(".plan.json")
    assert isinstance(Plan.load(plan).graph_fingerprint, str)
    # a retrained model (other weights, same structure) matches
    retrained = tiny_cnn(seed=3)
    assert (
        lowbit.quantize(retrained, plan=plan, progress=False).plan.graph_fingerprint
        == Plan.load(plan).graph_fingerprint
    )
    # a renamed node is another graph: refused, unless asked for
    other = tiny_cnn()
    other.graph.node[5].name = "pool"
    path = tmp_path / "other.onnx"
    onnx.save(other, str(path))
    with pytest.raises(lowbit.LowbitError, match="made for a graph of another structure.*--reuse-ranges"):
        lowbit.quantize(path, plan=plan, progress=False)
    reused = lowbit.quantize(path, plan=plan, progress=False, reuse_ranges=True)
    assert "pool" in reused.plan.nodes
    r = run_cli("quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--plan", str(plan))
    one_line_error(r, "--reuse-ranges")
    assert not (tmp_path / "o.onnx").exists()
    r = run_cli("quantize", str(path), "-o", str(tmp_path / "o.onnx"), "--plan", str(plan), "--reuse-ranges")
    assert r.returncode == 0, r.stderr
    # a plan from before fingerprints is applied as before
    data = json.loads(plan.read_text())
    del data["graph_fingerprint"], data["model_sha256"]
    old = tmp_path / "old.plan.json"
    old.write_text(json.dumps(data))
    assert Plan.load(old).graph_fingerprint is None
    lowbit.quantize(path, plan=old, progress=False)


# 7. options refused before any work; duplicate node names


def test_negative_check_is_refused_before_any_work(tiny_model: Path, tiny_calib: Path, tmp_path: Path) -> None:
    r = run_cli(
        "quantize", str(tiny_model), "-o", str(tmp_path / "o.onnx"), "--calib", str(tiny_calib), "--check", "-1"
    )
    one_line_error(r, "--check")
    r = run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "o.onnx"), "--reuse-ranges", "--calib", "x.npy")
    one_line_error(r, "--reuse-ranges")
    r = run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "o.onnx"), "--calib", str(tmp_path / "nope.npy"))
    one_line_error(r, "calibration data not found", "--calib")
    assert not (tmp_path / "o.onnx").exists()


def test_duplicate_node_names_quantize_and_check_without_a_crash(
    tiny_calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = tiny_cnn()
    for node in m.graph.node:
        node.name = "same"
    path = tmp_path / "dup.onnx"
    onnx.save(m, str(path))
    out = tmp_path / "dup.q.onnx"
    r = run_cli("quantize", str(path), "-o", str(out), "--calib", str(tiny_calib), "--quiet", "--check", "4")
    assert r.returncode == 0, r.stderr
    assert len(Plan.load(out.with_suffix(".plan.json")).nodes) == len(m.graph.node)

    # outputs are written after the check and the lint: a failure there leaves nothing behind
    import lowbit.evaluate.check as check

    def broken(*args, **kwargs):
        raise lowbit.LowbitError("the check failed")

    monkeypatch.setattr(check, "runtime_check", broken)
    out2 = tmp_path / "dup2.onnx"
    one_line_error(run_cli("quantize", str(path), "-o", str(out2), "--calib", str(tiny_calib), "--quiet"), "check")
    assert not out2.exists() and not out2.with_suffix(".plan.json").exists()
