"""A `lowbit.torch` QAT module as an ExecuTorch `.pte` program: its learned scales go into PT2E, and the program
computes what the module's own ONNX export computes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("executorch")

import lowbit  # noqa: E402
import lowbit.torch as lt  # noqa: E402
from lowbit.errors import LowbitError  # noqa: E402
from lowbit.evaluate.metrics import top1_agreement  # noqa: E402
from lowbit.runtimes.ort import session  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_torch import data, small_cnn  # noqa: E402
from test_torch_qat import batches, train_steps  # noqa: E402


def test_qat_pte_runs_the_learned_scales(tmp_path: Path) -> None:
    from lowbit.export.executorch.export import _export
    from lowbit.export.executorch.qat import learned_graph
    from lowbit.runtimes.executorch import ExecutorchSession
    from lowbit.torch.fakequant import ActFakeQuant

    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 3)
    x1 = batches(1)[0][:1]
    # the fake quantizers leave the graph; their learned parameters stay, as int8 on the same grid
    graph, learned = learned_graph(q, (x1,), _export)
    fq = [m for m in q.modules() if isinstance(m, ActFakeQuant)]
    assert sorted(learned.values()) == sorted(
        (float(m.effective_scale()), int(m.zero_point) - 128) for m in fq
    )  # fmt: skip
    assert not any("fake_quantize" in str(n.target) for n in graph.graph.nodes)

    res = lowbit.export_executorch(q, x1, tmp_path / "q.pte", input_names=["x"], output_names=["y"])
    assert res.quantized and res.calibration == "learned (QAT)" and res.samples == 0
    assert res.delegated["aten.convolution"] == 3 and not res.left  # everything in XNNPACK
    onnx = lt.export_onnx(q, tmp_path / "q.onnx", (x1,))
    x = data(64, seed=7)
    ref = session(onnx.model, mode="kernels").run(None, {"x": x})[0]
    out = ExecutorchSession(tmp_path / "q.pte").run(None, {"x": x})[0]
    # The same integers up to the kernels' rounding: within one step of the final layer's input.
    fc_in = onnx.plan.tensors[next(k for k in onnx.plan.tensors if k.endswith("Flatten_output_0"))].scale[0]
    bound = fc_in * q.fc.linear.weight.detach().abs().sum(1).numpy()
    assert np.all(np.abs(out - ref) <= bound)
    assert top1_agreement(ref, out) >= 0.98
    # Halving one learned scale moves the program off the ONNX model: the scales in it are the learned ones.
    with torch.no_grad():
        fq[1].scale.mul_(0.5)
    lowbit.export_executorch(q, x1, tmp_path / "half.pte", input_names=["x"], output_names=["y"])
    off = ExecutorchSession(tmp_path / "half.pte").run(None, {"x": x})[0]
    assert np.abs(off - ref).max() > 4 * np.abs(out - ref).max()


def test_qat_modules_it_cannot_run_are_one_line_errors(tmp_path: Path) -> None:
    x1 = batches(1)[0][:1]
    cases = [
        (lowbit.Recipe(default=lowbit.Scheme(activations="uint16")), None, "16-bit"),
        (lowbit.Recipe(default=lowbit.Scheme(weights="int4")), None, "int4"),
        (lowbit.Recipe(), np.zeros((4, 1, 8, 8), np.float32), "without calibration data"),
    ]
    for recipe, calib, message in cases:
        q = lt.prepare_qat(small_cnn(), recipe, example_inputs=(x1,), calib=batches(2))
        with pytest.raises(LowbitError, match=message) as e:
            lowbit.export_executorch(q, x1, tmp_path / "q.pte", calib=calib)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "q.pte").exists()


QAT_FILE = """
import sys

sys.path.insert(0, {tests!r})
import lowbit.torch as lt
from test_torch import small_cnn
from test_torch_qat import batches, train_steps


def make():
    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 3)
    return q
"""


def test_cli_exports_a_qat_module(tmp_path: Path) -> None:
    """`lowbit export FILE.py:NAME --to executorch` of a lowbit.torch QAT module: no calibration, its learned
    ranges, the API's bytes; calibration data for it is a one-line error."""
    from conftest import run_cli

    (tmp_path / "qnet.py").write_text(QAT_FILE.format(tests=str(Path(__file__).parent)))
    spec, pte = f"{tmp_path / 'qnet.py'}:make", tmp_path / "cli.pte"
    run = run_cli("export", spec, "--to", "executorch", "-o", str(pte), "--shape", "x=1x1x12x12", "--json")
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["quantized"] and summary["calibration"] == "learned (QAT)" and summary["calibration_samples"] == 0
    assert summary["delegated_ops"]["aten.convolution"] == 3 and not summary["portable_ops"]
    q = lt.prepare_qat(small_cnn(), example_inputs=(batches(1)[0][:1],), calib=batches())
    train_steps(q, 3)
    lowbit.export_executorch(q, batches(1)[0][:1], tmp_path / "api.pte", input_names=["x"])
    assert pte.read_bytes() == (tmp_path / "api.pte").read_bytes()
    text = run_cli("export", spec, "--to", "executorch", "-o", str(tmp_path / "t.pte"), "--shape", "x=1x1x12x12")
    assert text.returncode == 0 and "the QAT module's learned ranges" in text.stdout, text
    np.save(tmp_path / "c.npy", data(8))
    bad = run_cli(
        "export", spec, "--to", "executorch", "-o", str(tmp_path / "b.pte"), "--shape", "x=1x1x12x12",
        "--calib", str(tmp_path / "c.npy"),
    )  # fmt: skip
    assert bad.returncode == 2 and "without calibration data" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "b.pte").exists()


@pytest.mark.slow
def test_fashion_mnist_qat_pte_matches_its_onnx_accuracy(tmp_path: Path) -> None:
    """The QAT Fashion-MNIST model (examples/qat_fashion_mnist.py), trained briefly: its .pte in ExecuTorch is
    within 0.2 points of its ONNX export in ONNX Runtime on the 10k test images."""
    from lowbit.runtimes.executorch import ExecutorchSession

    qat_example = pytest.importorskip("qat_fashion_mnist")
    if not (qat_example.DATA / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.fail("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    torch.manual_seed(0)
    xtr, ytr = qat_example.load("train", qat_example.DATA)
    xte, yte = qat_example.load("test", qat_example.DATA)
    xtr, ytr = xtr[:12000], ytr[:12000]
    model = qat_example.SmallMobileNet()
    qat_example.train(model, xtr, ytr, 1, 2e-3, 128, 0)
    example = (torch.from_numpy(xte[:1]),)
    calib = [torch.from_numpy(xtr[i : i + 64]) for i in range(0, 512, 64)]
    qat = lt.prepare_qat(model, example_inputs=example, calib=calib, freeze_bn_after=40)
    qat_example.train(qat, xtr[:6000], ytr[:6000], 1, 2e-4, 128, 1)
    onnx = lt.export_onnx(qat, tmp_path / "q.onnx", example)
    lowbit.export_executorch(qat, example[0], tmp_path / "q.pte", input_names=["x"])
    acc_onnx = qat_example.ort_accuracy(onnx.model, xte, yte)
    pred = ExecutorchSession(tmp_path / "q.pte").run(None, {"x": xte})[0].argmax(1)
    acc_pte = float(np.mean(pred == yte) * 100)
    assert acc_onnx > 65  # it learned (one short epoch on 12k images): the comparison is between trained models
    assert abs(acc_pte - acc_onnx) <= 0.2, (acc_pte, acc_onnx)
