from __future__ import annotations

import contextlib
import io
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

# lowbit_zoo (models, photographs, sentences, speech for tests) lives in examples/, outside the installed package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


@dataclass
class CliRun:
    """What `lowbit ARGS...` did, with subprocess.CompletedProcess's names: exit code, stdout, stderr."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str) -> CliRun:
    """`lowbit ARGS...` in this process, through lowbit.cli.main.main: for the one-line user-error tests, where a
    subprocess adds only an interpreter start-up. argparse's own errors raise SystemExit with the exit code.
    A few tests per command still run the real entry point (`python -m lowbit.cli.main`) in a subprocess."""
    from lowbit.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return CliRun(code, out.getvalue(), err.getvalue())


def tiny_cnn(seed: int = 0, batch: int | str = "N") -> onnx.ModelProto:
    """Conv-Relu -> Conv-Clip -> residual Add -> GlobalAveragePool -> Flatten -> Gemm, opset 17."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (8,)).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 1, 1)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.normal(0, 0.3, (8, 10)).astype(np.float32), "w3"),
        numpy_helper.from_array(rng.normal(0, 0.1, (10,)).astype(np.float32), "b3"),
        numpy_helper.from_array(np.array(0.0, np.float32), "lo"),
        numpy_helper.from_array(np.array(6.0, np.float32), "hi"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2"),
        helper.make_node("Clip", ["c2", "lo", "hi"], ["r2"], name="clip2"),
        helper.make_node("Add", ["r1", "r2"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(path))
    return path


@pytest.fixture
def tiny_calib(tmp_path: Path) -> Path:
    path = tmp_path / "calib.npy"
    np.save(path, np.random.default_rng(1).normal(0, 1, (32, 3, 16, 16)).astype(np.float32))
    return path


@pytest.fixture(scope="session")
def efficientnet_lite0(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EfficientNet-Lite0 exported once per test session (slow tests share it)."""
    from lowbit_zoo.zoo import efficientnet_lite0_onnx

    return efficientnet_lite0_onnx(tmp_path_factory.mktemp("zoo") / "efficientnet_lite0.onnx")
