"""Reliability: inputs that used to end in a traceback (or a hang, or a huge allocation) are one-line errors
(`lowbit: error: ...`, exit 2, nothing written) that name the problem and the fix, found before calibration."""

from __future__ import annotations

import os
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lowbit
from conftest import CliRun, run_cli, tiny_cnn
from lowbit.data import InputSpec, open_data
from lowbit.observe import select_range
from lowbit.observe.histogram import Histogram
from lowbit.recipe import Recipe
from lowbit.recipe import preset as preset_named


def one_line_error(run: CliRun, *words: str) -> None:
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("lowbit: error: "), run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert "Traceback" not in run.stderr
    for w in words:
        assert w in run.stderr, (w, run.stderr)


def nothing_written(folder: Path) -> bool:
    return not list(folder.glob("out*"))


def quantize(model: Path, folder: Path, calib: Path, *extra: str) -> CliRun:
    return run_cli("quantize", str(model), "-o", str(folder / "out.onnx"), "--calib", str(calib), "--quiet", *extra)


def small(opset: int) -> onnx.ModelProto:
    """Conv-Relu-Conv-GlobalAveragePool-Flatten-MatMul with ops spelled the same from opset 7 to 13."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 10)).astype(np.float32), "w3"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("GlobalAveragePool", ["c2"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w3"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4 if opset < 9 else 7
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(1).normal(0, 1, (8, 3, 16, 16)).astype(np.float32))
    return path


# --- 8. tracebacks that are now one-line errors ------------------------------------------------------------


def test_unknown_custom_op_is_one_line_in_quantize_and_bench(tmp_path: Path, calib: Path) -> None:
    m = tiny_cnn()
    m.graph.node.insert(2, helper.make_node("Foo", ["r1"], ["r1f"], domain="com.example", name="foo"))
    m.graph.node[3].input[0] = "r1f"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(m, tmp_path / "custom.onnx")
    one_line_error(quantize(tmp_path / "custom.onnx", tmp_path, calib), "com.example::Foo", "'foo'", "replace")
    assert nothing_written(tmp_path)
    one_line_error(run_cli("bench", str(tmp_path / "custom.onnx"), "--runs", "2"), "com.example::Foo")


def test_custom_op_that_ort_can_run_stays_float_with_its_reason(tmp_path: Path, calib: Path) -> None:
    m = tiny_cnn()
    # A model-local function: ONNX Runtime inlines it, so the model runs and lowbit keeps the node float.
    body = [helper.make_node("Relu", ["a"], ["b"])]
    m.functions.append(helper.make_function("com.example", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)]))
    m.graph.node.insert(2, helper.make_node("MyRelu", ["r1"], ["r1f"], domain="com.example", name="foo"))
    m.graph.node[3].input[0] = "r1f"
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    onnx.save(m, tmp_path / "func.onnx")
    run = quantize(tmp_path / "func.onnx", tmp_path, calib, "--check", "0")
    assert run.returncode == 0, run.stderr
    plan = lowbit.Plan.load(tmp_path / "out.plan.json")
    foo = plan.nodes["foo"]
    assert not foo.quantized and foo.reason


@pytest.mark.parametrize("opset", [7, 9, 11, 12])
def test_old_opsets_are_upgraded_to_13_with_unchanged_outputs(tmp_path: Path, calib: Path, opset: int) -> None:
    onnx.save(small(opset), tmp_path / "old.onnx")
    run = quantize(tmp_path / "old.onnx", tmp_path, calib)
    assert run.returncode == 0, run.stderr
    out = onnx.load(str(tmp_path / "out.onnx"))
    assert {o.domain: o.version for o in out.opset_import}[""] >= 13
    onnx.checker.check_model(out)


def test_old_opset_image_model_with_dynamic_size_is_verified_at_a_size_it_runs(tmp_path: Path) -> None:
    """A 3x3 conv without padding cannot run on the 1x1 pixels a dynamic height/width first gets in the upgrade
    check (PP-OCR's detectors fail there in Resize); the check tries larger sizes before giving up."""
    model = small(11)
    model.graph.node[0].attribute.pop()  # conv1 without pads: needs at least 3x3 pixels
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    model.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "W"
    onnx.save(model, tmp_path / "old.onnx")
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(1).normal(0, 1, (8, 3, 16, 16)).astype(np.float32))
    run = quantize(tmp_path / "old.onnx", tmp_path, calib)
    assert run.returncode == 0, run.stderr
    assert "Non-zero status" not in run.stderr  # ONNX Runtime's own log of the failed 1x1 run is not shown
    assert {o.domain: o.version for o in onnx.load(str(tmp_path / "out.onnx")).opset_import}[""] >= 13


def _wrong_shape(folder: Path) -> Path:
    """Calibration data that exists but fits no test model here: an error about it means calibration began."""
    path = folder / "wrong-shape.npy"
    np.save(path, np.zeros((2, 5), np.float32))
    return path


def test_old_opset_that_cannot_be_upgraded_is_refused_before_calibration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lowbit.passes import opset

    def no_adapter(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
        raise RuntimeError("adapter_lookup: No Adapter From Version $9 for Foo")

    monkeypatch.setattr(opset.version_converter, "convert_version", no_adapter)
    onnx.save(small(9), tmp_path / "old.onnx")
    # The calibration data has the wrong shape: the opset is refused first, before calibration reads it.
    run = quantize(tmp_path / "old.onnx", tmp_path, _wrong_shape(tmp_path))
    one_line_error(run, "opset 9", "opset 13", "No Adapter", "re-export")
    assert nothing_written(tmp_path)


def test_old_opset_whose_upgrade_changes_outputs_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lowbit.passes import opset

    def wrong(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
        out = small(13)
        out.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.ones((8, 10), np.float32), "w3"))
        return out

    monkeypatch.setattr(opset.version_converter, "convert_version", wrong)
    onnx.save(small(11), tmp_path / "old.onnx")
    one_line_error(quantize(tmp_path / "old.onnx", tmp_path, _wrong_shape(tmp_path)), "changes output 'y'")


def test_models_at_opset_13_or_later_are_not_touched_by_the_upgrade(tmp_path: Path, calib: Path) -> None:
    from lowbit.passes.opset import upgrade_opset

    model = lowbit.graph.load_model(small(13))
    assert upgrade_opset(model, "m") is model


def test_model_without_inputs_and_empty_model_are_one_line(tmp_path: Path, calib: Path) -> None:
    const = helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones(3, np.float32)))
    g = helper.make_graph([const], "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "noin.onnx")
    one_line_error(quantize(tmp_path / "noin.onnx", tmp_path, calib), "has no inputs")
    assert nothing_written(tmp_path)
    onnx.save(onnx.ModelProto(), tmp_path / "empty.onnx")
    one_line_error(quantize(tmp_path / "empty.onnx", tmp_path, calib), "no graph nodes")
    with pytest.raises(lowbit.LowbitError, match="no graph nodes"):
        lowbit.quantize(onnx.ModelProto(), calib=str(calib), progress=False)
    assert nothing_written(tmp_path)


@pytest.mark.parametrize("case", ["outside", "absolute", "missing", "symlink"])
def test_external_data_onnx_refuses_is_one_line_naming_the_fix(tmp_path: Path, calib: Path, case: str) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(tiny_cnn(), str(folder / "m.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    (tmp_path / "elsewhere.bin").write_bytes((folder / "w.bin").read_bytes())
    os.symlink(folder / "w.bin", folder / "link.bin")
    location = {
        "outside": "../elsewhere.bin",
        "absolute": str(folder / "w.bin"),
        "missing": "nope.bin",
        "symlink": "link.bin",
    }[case]
    fix = {"outside": "move it into", "absolute": "relative location", "missing": "beside", "symlink": "the file"}
    proto = onnx.load(str(folder / "m.onnx"), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(proto, str(folder / "bad.onnx"))
    bad = str(folder / "bad.onnx")
    one_line_error(quantize(Path(bad), tmp_path, calib), fix[case])
    one_line_error(run_cli("bench", bad, "--runs", "2"), fix[case])
    one_line_error(run_cli("export", bad, "--to", "tflite", "-o", str(tmp_path / "out.tflite")), fix[case])
    assert nothing_written(tmp_path)


def test_unwritable_output_folder_is_refused_before_calibration(tiny_model: Path, tmp_path: Path) -> None:
    # /proc refuses new files even to root (chmod would not stop a root test run). The calibration data has the
    # wrong shape: the output check must come first.
    one_line_error(quantize(tiny_model, Path("/proc"), _wrong_shape(tmp_path)), "cannot write", "/proc")


def test_output_naming_a_folder_is_refused_before_calibration(tiny_model: Path, tmp_path: Path) -> None:
    (tmp_path / "dir.onnx").mkdir()
    run = run_cli("quantize", str(tiny_model), "-o", str(tmp_path / "dir.onnx"), "--calib", str(_wrong_shape(tmp_path)))
    one_line_error(run, "is a folder", "file path")


def test_check_writable_is_a_separate_function(tmp_path: Path) -> None:
    from lowbit.graph.io import check_writable

    check_writable(tmp_path / "ok.onnx")
    assert not list(tmp_path.iterdir())  # the probe file is gone
    with pytest.raises(lowbit.LowbitError, match="does not exist"):
        check_writable(tmp_path / "missing" / "x.onnx")


def test_calibration_files_differing_in_a_dynamic_dim_are_batched_apart(tmp_path: Path) -> None:
    relu = helper.make_node("Relu", ["x"], ["r"])
    mm = helper.make_node("MatMul", ["r", "w"], ["y"])
    g = helper.make_graph(
        [relu, mm],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", 4])],
        [numpy_helper.from_array(np.ones((8, 4), np.float32), "w")],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "dyn.onnx")
    data = tmp_path / "calib"
    data.mkdir()
    np.save(data / "a.npy", np.ones((3, 5, 8), np.float32))
    np.save(data / "b.npy", np.ones((3, 7, 8), np.float32))
    # Each length forms its own batches (they were refused before: "--batch-size 1" was the fix).
    assert quantize(tmp_path / "dyn.onnx", tmp_path, data, "--check", "0").returncode == 0
    assert quantize(tmp_path / "dyn.onnx", tmp_path, data, "--batch-size", "1", "--check", "0").returncode == 0


def test_samples_differing_in_a_dynamic_dim_within_an_iterable_are_batched_apart() -> None:
    spec = [InputSpec("x", np.dtype(np.float32), ("N", "T"))]
    source = open_data(iter([np.ones((1, 3), np.float32), np.ones((1, 4), np.float32)]), spec, batch_size=2)
    assert [b["x"].shape for b in source] == [(1, 3), (1, 4)]


def test_deeply_nested_recipe_is_one_line(tiny_model: Path, tmp_path: Path, calib: Path) -> None:
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    one_line_error(quantize(tiny_model, tmp_path, calib, "--recipe", str(tmp_path / "deep.json")), "nests too deeply")


def test_recipe_version_as_a_string_names_the_number_expected(tiny_model: Path, tmp_path: Path, calib: Path) -> None:
    (tmp_path / "v.json").write_text('{"version": "1"}')
    run = quantize(tiny_model, tmp_path, calib, "--recipe", str(tmp_path / "v.json"))
    one_line_error(run, "must be the number 1", "'1'")
    assert "not supported" not in run.stderr


def test_zero_size_tensor_gets_a_range_not_an_internal_message() -> None:
    h = Histogram()
    h.update(np.zeros((4, 0), np.float32))
    for method in ("minmax", "percentile", "entropy", "mse"):
        assert select_range(h, method) == (0.0, 0.0)
    with pytest.raises(lowbit.LowbitError, match="empty"):
        select_range(Histogram(), "minmax")  # never fed at all: still an error


def test_warnings_print_once_as_lowbit_warning(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    from lowbit.cli import main as cli_main

    def noisy(_args: object) -> int:
        for _ in range(3):
            warnings.warn("something third-party said\nwith a second line", UserWarning, stacklevel=1)
        return 0

    parser = cli_main._parser
    try:
        cli_main._parser = lambda: _FakeParser(noisy)  # type: ignore[assignment]
        assert cli_main.main([]) == 0
    finally:
        cli_main._parser = parser
    err = capsys.readouterr().err
    assert err == "lowbit: warning: something third-party said\n"


class _FakeParser:
    def __init__(self, run: object) -> None:
        self.run = run

    def parse_args(self, _argv: object) -> object:
        class Args:
            pass

        args = Args()
        args.run = self.run  # type: ignore[attr-defined]
        return args


# --- 9. resource limits and argument types ---------------------------------------------------------------------


def test_npz_member_is_read_only_up_to_the_samples_needed(tmp_path: Path) -> None:
    # A small file holding a large compressed array (256 MiB of zeros); --samples 16 must not inflate it whole.
    rows, row = 5461, np.zeros((3, 64, 64), np.float32)  # 5461 x 48 KiB = 256 MiB
    path = tmp_path / "big.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as f:
            header = {"descr": "<f4", "fortran_order": False, "shape": (rows, 3, 64, 64)}
            np.lib.format.write_array_header_1_0(f, header)
            block = np.zeros((256, 3, 64, 64), np.float32).tobytes()
            for start in range(0, rows, 256):
                f.write(block[: min(256, rows - start) * row.nbytes])
    assert path.stat().st_size < 2_000_000
    spec = [InputSpec("x", np.dtype(np.float32), ("N", 3, 64, 64))]
    tracemalloc.start()
    try:
        batches = list(open_data(path, spec, batch_size=8, limit=16))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(len(b["x"]) for b in batches) == 16
    assert peak < 32 * 2**20, peak


def test_calib_naming_a_fifo_is_one_line_not_a_hang(tiny_model: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "calib.npy"
    os.mkfifo(fifo)
    one_line_error(quantize(tiny_model, tmp_path, fifo), "not a regular file")


def test_api_wrong_argument_types_name_the_expected_type(tiny_model: Path, calib: Path) -> None:
    with pytest.raises(lowbit.LowbitError, match="path to an .onnx file or an onnx.ModelProto, got NoneType"):
        lowbit.quantize(model=None, calib=str(calib), progress=False)  # type: ignore[arg-type]
    with pytest.raises(lowbit.LowbitError, match="pass a path or an iterable"):
        lowbit.quantize(tiny_model, calib=3, progress=False)
    with pytest.raises(lowbit.LowbitError, match="a Recipe, a dict or a path"):
        lowbit.quantize(tiny_model, calib=str(calib), recipe=3, progress=False)  # type: ignore[arg-type]


def test_api_accepts_a_dict_recipe_like_from_dict(tiny_model: Path, calib: Path) -> None:
    as_dict = lowbit.quantize(tiny_model, calib=str(calib), recipe={"calibration_samples": 8}, progress=False)  # type: ignore[arg-type]
    as_recipe = lowbit.quantize(tiny_model, calib=str(calib), recipe=Recipe(calibration_samples=8), progress=False)
    assert as_dict.model.SerializeToString() == as_recipe.model.SerializeToString()


@pytest.mark.parametrize("preset", ["default", "dynamic", "weight-only-int8", "weight-only-int4"])
def test_an_empty_weight_stays_float_with_the_reason(preset: str) -> None:
    """A (0, 4) MatMul weight has no range to quantize; it crashed in the weight quantizer (zero-size min)."""
    from helpers import model, node

    m = model(
        [node("MatMul", ["x", "w"], ["y"], name="mm")], {"x": (1, 0)}, {"y": None}, {"w": np.zeros((0, 4), np.float32)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # weight-only-int4's rule for convolutions matches nothing here
        res = lowbit.quantize(
            m, calib=[{"x": np.zeros((1, 0), np.float32)}], recipe=preset_named(preset), progress=False
        )
    assert (
        not res.plan.nodes["mm"].quantized
        and res.plan.nodes["mm"].reason == "weight is empty (shape [0, 4]): nothing to quantize"
    )


def test_the_command_starts_without_loading_heavy_modules() -> None:
    """Ctrl-C while numpy, ONNX Runtime and LiteRT load must be a one-line exit 130: they load inside the command,
    where interrupts are handled, not while `lowbit.cli.main` is imported."""
    import subprocess
    import sys

    code = (
        "import sys, lowbit.cli.main; "
        "print(sorted(m for m in ('numpy', 'onnx', 'onnxruntime', 'onnx_ir', 'torch', 'PIL') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_an_interrupt_while_a_command_loads_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import lowbit.cli.quantize_cmd as quantize_cmd

    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize_cmd, "run", interrupted)
    res = run_cli("quantize", "m.onnx", "-o", "q.onnx", "--calib", "x.npy")
    assert res.returncode == 130 and len(res.stderr.strip().splitlines()) == 1 and "interrupted" in res.stderr
