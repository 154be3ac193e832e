"""`lowbit export --to executorch` / `lowbit.export_executorch`: a PyTorch module as an ExecuTorch `.pte` program
(XNNPACK) quantized with lowbit's ranges, and `.pte` files in eval and bench."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

import lowbit
from conftest import run_cli
from lowbit.errors import LowbitError
from lowbit.evaluate.metrics import top1_agreement

torch = pytest.importorskip("torch")

MODEL_FILE = '''
import torch


class Net(torch.nn.Module):
    """Conv-BN-ReLU6, a depthwise conv with a residual Add, global mean, linear: EfficientNet's pieces."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.fc = torch.nn.Linear(8, 5)
        with torch.no_grad():  # BatchNorm statistics that are not the identity, so folding it matters
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, image):
        y = torch.nn.functional.relu6(self.bn(self.c1(image)))
        y = y + torch.relu(self.dw(y))
        return self.fc(y.mean((2, 3)))


def make():
    return Net().eval()
'''


def _inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The module written as a file, exported by the CLI with calibration, and its float ONNX twin."""
    folder = tmp_path_factory.mktemp("et")
    (folder / "net.py").write_text(MODEL_FILE)
    np.save(folder / "calib.npy", _inputs(32, 1))
    np.save(folder / "eval.npy", _inputs(48, 2))
    pte = folder / "net.pte"
    run = run_cli(
        "export", f"{folder / 'net.py'}:make", "--to", "executorch", "-o", str(pte), "--shape", "x=1x3x16x16",
        "--calib", str(folder / "calib.npy"), "--output-name", "y", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    sys.path.insert(0, str(folder))
    try:
        import net  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(folder))
    module = net.make()
    onnx_path = folder / "net.onnx"
    import onnx

    from lowbit.torch import module_to_onnx

    onnx.save(module_to_onnx(module, (torch.zeros(1, 3, 16, 16),)), onnx_path)  # input x, output y
    return {"folder": folder, "pte": pte, "summary": json.loads(run.stdout), "module": module, "onnx": onnx_path}


def test_small_module_runs_in_executorch(small: dict) -> None:
    from lowbit.runtimes.executorch import ExecutorchSession

    s = small["summary"]
    assert s["quantized"] and s["calibration"] == "layer_error_fast" and s["calibration_samples"] == 32
    assert s["layers_from_onnx"] == 3  # both convs and the linear layer carry lowbit's integers
    assert s["inputs"] == ["x"] and s["size_bytes"] == small["pte"].stat().st_size
    # XNNPACK runs the convolutions and the linear layer as int8 (their q/dq pairs went into the delegate)
    assert s["delegated_ops"]["aten.convolution"] == 2 and s["delegated_ops"]["aten.linear"] == 1
    sess = ExecutorchSession(small["pte"])
    assert [i.name for i in sess.get_inputs()] == ["x"] and [o.name for o in sess.get_outputs()] == ["y"]
    x = _inputs(48, 2)
    out = sess.run(None, {"x": x})[0]  # batch 48 through a batch-1 program: one sample at a time
    with torch.no_grad():
        ref = small["module"](torch.from_numpy(x)).numpy()
    assert out.shape == ref.shape
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < err < 0.05  # int8 (not float: some error), and close
    assert top1_agreement(ref, out) >= 0.9


def test_same_inputs_same_bytes_and_api(small: dict, tmp_path: Path) -> None:
    """The Python API with the same module and calibration writes the CLI's bytes."""
    calib = np.load(small["folder"] / "calib.npy")
    res = lowbit.export_executorch(
        small["module"],
        torch.zeros(1, 3, 16, 16),
        tmp_path / "api.pte",
        calib=calib,
        input_names=["x"],
        output_names=["y"],
    )
    assert res.path == tmp_path / "api.pte"
    assert (tmp_path / "api.pte").read_bytes() == small["pte"].read_bytes()


def test_eval_and_bench_run_pte(small: dict) -> None:
    data = small["folder"] / "eval.npy"
    run = run_cli(
        "eval", str(small["pte"]), "--data", str(data), "--reference", str(small["onnx"]), "--json", "--quiet"
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["runtime"] == "executorch (XNNPACK)" and result["samples"] == 48
    out = result["outputs"]["y"]
    assert out["top1_agreement"] >= 0.9 and 0.99 < out["cosine"] < 1.0
    bench = run_cli("bench", str(small["onnx"]), str(small["pte"]), "--runs", "3", "--warmup", "1", "--json", "--quiet")
    assert bench.returncode == 0, bench.stderr
    entry = json.loads(bench.stdout)["models"][str(small["pte"])]
    assert entry["runtime"] == "executorch (XNNPACK)" and entry["energy"] is None and entry["op_time_ms"] is None
    assert entry["latency_ms"]["1"]["p50"] > 0


def test_pte_computes_lowbits_default_onnx(small: dict, tmp_path: Path) -> None:
    """The .pte carries the numbers of lowbit's default int8 ONNX model of the same module and calibration data
    (ranges measured by error, overflow guard, bias correction, float logits): its outputs are that model's up
    to float rounding, far closer than either is to float."""
    from lowbit.runtimes.executorch import ExecutorchSession
    from lowbit.runtimes.ort import session

    calib, x = np.load(small["folder"] / "calib.npy"), _inputs(48, 2)
    q = lowbit.quantize(small["onnx"], tmp_path / "q.onnx", calib=calib, progress=False)
    assert q.plan.recipe["default"]["calibration"] == "layer_error_fast"
    ref = session(q.model, mode="kernels").run(None, {"x": x})[0]
    out = ExecutorchSession(small["pte"]).run(None, {"x": x})[0]
    with torch.no_grad():
        f = small["module"](torch.from_numpy(x)).numpy()
    quant_err = np.abs(ref - f).max()
    assert quant_err > 1e-3  # int8: the ONNX model is not float
    assert np.abs(out - ref).max() <= 1e-3 * quant_err  # measured 6e-8 against 2e-3
    # percentile ranges give another model, and the .pte made with them follows that one
    other = lowbit.Recipe(default=lowbit.Scheme(calibration="percentile", percentile=99.0))
    q2 = lowbit.quantize(small["onnx"], tmp_path / "q2.onnx", calib=calib, recipe=other, progress=False)
    ref2 = session(q2.model, mode="kernels").run(None, {"x": x})[0]
    run = run_cli(
        "export", f"{small['folder'] / 'net.py'}:make", "--to", "executorch", "-o", str(tmp_path / "mm.pte"),
        "--shape", "image=1x3x16x16", "--calib", str(small["folder"] / "calib.npy"),
        "--calibration", "percentile", "--percentile", "99",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "int8, percentile ranges on 32 samples, 3 layers' integers from lowbit's int8 ONNX model" in run.stdout
    out2 = ExecutorchSession(tmp_path / "mm.pte").run(None, {"image": x})[0]
    assert np.abs(ref2 - ref).max() > 10 * np.abs(out2 - ref2).max()


def test_observers_hold_the_plans_parameters(small: dict, tmp_path: Path) -> None:
    """Every activation observer of the prepared PT2E graph holds a quantized tensor's scale and zero point
    from the plan (uint8 shifted by 128); the ReLU6 after the first conv shares its producer's; the linear
    layer's output (float in the ONNX model: the plan has no range for it) has none."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    from lowbit.export.executorch.quantizer import Choice, LowbitObserver, make_quantizer
    from lowbit.export.executorch.twin import fx_values, make_twin

    module, calib = small["module"], np.load(small["folder"] / "calib.npy")
    example = (torch.zeros(1, 3, 16, 16),)
    twin = make_twin(module, example, [(torch.from_numpy(calib[i : i + 8]),) for i in range(0, 32, 8)], None)
    plan = twin.result.plan.tensors
    want = {(float(np.float32(t.scale[0])), t.zero_point[0] - 128) for t in plan.values() if t.kind == "activation"}
    seen: dict[str, tuple[float, int]] = {}

    def fixed(model):
        out = {n: twin.params[t] for n, v in fx_values(model, twin.sample).items() if (t := twin.match(v, twin.params))}
        seen.update(out)
        return out

    prepared = prepare_pt2e(
        torch.export.export(module, example, strict=False).module(), make_quantizer(Choice(), fixed, False)
    )
    observers = {n: m for n, m in prepared.named_modules() if isinstance(m, LowbitObserver)}
    assert observers and {o.fixed for o in observers.values()} <= want
    assert len(seen) >= 4  # the input, the folded ReLU6, the ReLU, the Add, the mean
    clipped = [n for n in plan if n.endswith("Clip_output_0")]
    assert len(clipped) == 1 and any(p == twin.params[clipped[0]] for p in seen.values())
    linear = next(n for n in prepared.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert not any(u.op == "call_module" for u in linear.users)  # no observer after it: float logits


def test_errors_are_one_line(small: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pte = str(tmp_path / "x.pte")
    net = f"{small['folder'] / 'net.py'}:make"
    evalx = str(small["folder"] / "eval.npy")
    cases = [
        (("export", str(small["onnx"]), "--to", "executorch", "-o", pte), "needs the PyTorch model"),
        (("export", "net.py", "--to", "executorch", "-o", pte), "FILE.py:NAME"),
        (("export", str(tmp_path / "none.py") + ":make", "--to", "executorch", "-o", pte), "not found"),
        (("export", f"{small['folder'] / 'net.py'}:nope", "--to", "executorch", "-o", pte), "has no attribute 'nope'"),
        (("export", net, "--to", "executorch", "-o", str(tmp_path / "x.onnx"), "--shape", "x=1x3x16x16"), ".pte"),
        (("export", net, "--to", "executorch", "-o", pte), "--shape"),
        (("export", str(small["onnx"]), "-o", pte + ".tflite", "--calibration", "mse"), "only for --to executorch"),
        (("eval", str(small["pte"]), "--data", evalx, "--mode", "simulate"), "ExecuTorch program"),
        (("eval", str(small["onnx"]), "--data", evalx, "--quiet"), None),
    ]  # fmt: skip
    for args, message in cases:
        run = run_cli(*args)
        if message is None:  # the ONNX twin still evaluates: nothing above broke the ordinary path
            assert run.returncode == 0, run.stderr
            continue
        assert run.returncode == 2 and message in run.stderr, (args, run)
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert not Path(pte).exists()
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program at all")
    with pytest.raises(LowbitError, match="not an ExecuTorch program"):
        lowbit.evaluate_model(bad, small["folder"] / "eval.npy", progress=False)
    with pytest.raises(LowbitError, match="mode 'dynamic' is not supported"):
        lowbit.export_executorch(
            small["module"],
            torch.zeros(1, 3, 16, 16),
            calib=_inputs(4, 1),
            recipe=lowbit.Recipe(default=lowbit.Scheme(mode="dynamic")),
        )
    # Without ExecuTorch installed: the install line, before any work.
    monkeypatch.setitem(sys.modules, "executorch.exir", None)
    run = run_cli("export", net, "--to", "executorch", "-o", pte, "--shape", "x=1x3x16x16")
    assert run.returncode == 2 and "pip install 'lowbit[executorch]'" in run.stderr


def _layers(graph) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """(int8 weight, weight scales, float bias) of each conv/linear of a converted PT2E graph, in graph order;
    (float weight, None, float bias) for a layer computed in float."""
    from functools import reduce

    def value(node) -> np.ndarray:
        return reduce(getattr, str(node.target).split("."), graph).detach().numpy()

    out = []
    for n in graph.graph.nodes:
        if n.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            w = n.args[1]
            if w.op == "get_attr":
                out.append((value(w), None, value(n.args[2])))
            else:
                out.append((value(w.args[0]), value(w.args[1]), value(n.args[2])))
    return out


def _against_onnx(module, onnx_path: Path, calib: np.ndarray, tmp_path: Path) -> int:
    """Checks each conv/linear of the default-recipe PT2E graph against lowbit's default int8 ONNX of the same
    module and calibration data: equal int8 weights and scales, biases within half an int32 step (the ONNX bias
    is rounded to int32). Returns how many weights or biases differ without the two steps."""
    from onnx import numpy_helper

    from lowbit.export.executorch.export import _ptq_graph

    res = lowbit.quantize(onnx_path, tmp_path / "q.onnx", calib=calib, progress=False)
    g = res.model.graph
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in g.initializer}
    by_out = {o: n for n in g.node for o in n.output}

    def dq(name: str) -> tuple[np.ndarray, np.ndarray]:
        n = by_out[name]
        return init[n.input[0]], init[n.input[1]]

    onnx_layers = [(dq(n.input[1]), dq(n.input[2])) for n in g.node if n.op_type in ("Conv", "Gemm")]
    example, names = (torch.zeros(1, *calib.shape[1:]),), ["x"]
    ours = _layers(_ptq_graph(module, example, names, calib, None, None, None)[0])
    off = lowbit.Recipe(default=lowbit.Scheme(bias_correction=False, avoid_overflow=False))
    plain = _layers(_ptq_graph(module, example, names, calib, off, None, None)[0])
    assert len(ours) == len(onnx_layers)
    moved = 0
    for ((wq, ws), (bq, bs)), (q, s, b), (q0, _, b0) in zip(onnx_layers, ours, plain):
        if s is None:  # a layer with a float output (the logits): its weight is the ONNX model's, dequantized
            assert np.array_equal(q, (wq * ws.reshape(-1, 1)).astype(np.float32).reshape(q.shape))
        else:
            assert np.array_equal(wq.reshape(q.shape), q)
            assert np.allclose(ws, s, rtol=1e-6, atol=0)
        assert np.all(np.abs(bq * bs - b) <= 0.5 * bs + 1e-12)
        moved += int(not np.array_equal(q, q0)) + int(np.any(np.abs(b - b0) > bs))
    return moved


def test_overflow_guard_and_bias_correction_are_lowbits(small: dict, tmp_path: Path) -> None:
    """The default recipe's overflow guard (rescaled and trimmed channels) and bias correction land in the PT2E
    graph as lowbit's ONNX path computes them."""
    calib = np.load(small["folder"] / "calib.npy")
    res = lowbit.quantize(small["onnx"], tmp_path / "g.onnx", calib=calib, progress=False)
    assert res.plan.overflow_guard  # the guard changed channels: this module exercises it
    assert _against_onnx(small["module"], small["onnx"], calib, tmp_path) >= 3


class Padded(torch.nn.Module):
    """ReLU6 -> zero pad -> strided depthwise conv, as EfficientNet's blocks: lowbit folds the pad into the conv,
    so bias correction uses the means of the unpadded input."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.c1 = torch.nn.Conv2d(3, 8, 1)
        self.dw = torch.nn.Conv2d(8, 8, 3, stride=2, groups=8)

    def forward(self, x):
        y = torch.nn.functional.relu6(self.c1(x))
        return self.dw(torch.nn.functional.pad(y, (0, 1, 0, 1)))


def test_bias_correction_behind_a_zero_pad(tmp_path: Path) -> None:
    import onnx

    from lowbit.torch import module_to_onnx

    module = Padded().eval()
    onnx.save(module_to_onnx(module, (torch.zeros(1, 3, 16, 16),)), tmp_path / "p.onnx")
    calib = np.abs(_inputs(16, 3)) + 0.5  # positive inputs: the ReLU6 output's mean is far from zero
    assert _against_onnx(module, tmp_path / "p.onnx", calib, tmp_path) >= 1


@pytest.mark.slow
def test_efficientnet_lite0_pte_agrees(efficientnet_lite0: Path, tmp_path: Path) -> None:
    """EfficientNet-Lite0's .pte in ExecuTorch against lowbit's default int8 ONNX model made from the same 128
    calibration crops (layer_error_fast ranges, overflow guard, bias correction, float logits), and against
    float, on 200 held-out crops (bench/RESULTS_EXECUTORCH.md)."""
    from lowbit.runtimes.executorch import ExecutorchSession
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import _efficientnet_lite0_torch, photo_crops

    calib = photo_crops(128, "calib")
    q = tmp_path / "q.onnx"
    lowbit.quantize(efficientnet_lite0, q, calib=calib, progress=False)
    pte = tmp_path / "q.pte"
    res = lowbit.export_executorch(
        _efficientnet_lite0_torch(), torch.zeros(1, 3, 224, 224), pte, calib=calib,
        input_names=["input"], output_names=["logits"],
    )  # fmt: skip
    assert res.calibration == "layer_error_fast" and res.layers_from_onnx == 50  # 49 convs and the classifier
    crops = photo_crops(200, "eval")
    batches = [{"input": crops[i : i + 25]} for i in range(0, len(crops), 25)]
    ref = run_all(session(efficientnet_lite0), batches)[0]
    int8 = run_all(session(q), batches)[0]
    out = ExecutorchSession(pte).run(None, {"input": crops})[0]
    assert top1_agreement(int8, out) >= 0.98  # 200 crops: at most 4 may differ
    assert top1_agreement(ref, out) >= 0.85
