"""Quantization-aware training on Fashion-MNIST: float vs PTQ vs QAT, W8A8 and W4A8, on the 10k test images.

A small MobileNet-style CNN (depthwise separable convs, BatchNorm, ReLU6) is trained here in float, then:
  * PTQ W8A8 / W4A8: `lowbit.quantize(module, example_inputs=..., calib=..., recipe=...)` (the ONNX path:
    min-max ranges, bias correction; W8A8 also the overflow guard);
  * QAT W8A8 / W4A8: `lowbit.torch.prepare_qat(module, recipe, ...)`, a short fine-tune, `lowbit.torch.export_onnx`.
One recipe per width drives both workflows: W4A8 is `Recipe(default=Scheme(weights="int4"))`, per-channel
4-bit weights stored as ONNX INT4 (two per byte) behind DequantizeLinear. Every quantized accuracy is measured
on the exported ONNX model in ONNX Runtime (its kernels; it has no integer kernel for 4-bit weights and runs
those layers in float on the dequantized weights); for QAT the fake-quant module's own accuracy is printed
beside it. Data: Debian package dataset-fashion-mnist (IDX files read with numpy).

    python examples/qat_fashion_mnist.py [--epochs 6] [--qat-epochs 2] [--results bench/RESULTS_QAT.md]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

import lowbit
import lowbit.torch as lt
from lowbit.runtimes.ort import session

DATA = Path("/usr/share/datasets/fashion-mnist")
RECIPES = {"W8A8": lowbit.Recipe(), "W4A8": lowbit.Recipe(default=lowbit.Scheme(weights="int4"))}
# PTQ only: AdaRound learns each weight's rounding on the calibration data (about 2 minutes here on 1 thread).
PTQ_ONLY = {"W4A8 AdaRound": lowbit.Recipe(default=lowbit.Scheme(weights="int4", adaround=True))}
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path) -> np.ndarray:
    """IDX format: magic (2 zero bytes, type code, ndim), big-endian dims, then uint8 data."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    x = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz").astype(np.float32)
    y = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64)
    return ((x / 255.0 - MEAN) / STD)[:, None], y


def dw_sep(cin: int, cout: int, stride: int) -> list[torch.nn.Module]:
    return [
        torch.nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
        torch.nn.BatchNorm2d(cin),
        torch.nn.ReLU6(),
        torch.nn.Conv2d(cin, cout, 1, bias=False),
        torch.nn.BatchNorm2d(cout),
        torch.nn.ReLU6(),
    ]


class SmallMobileNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, 1, 1, bias=False),
            torch.nn.BatchNorm2d(16),
            torch.nn.ReLU6(),
            *dw_sep(16, 32, 2),
            *dw_sep(32, 64, 2),
            *dw_sep(64, 128, 2),
            *dw_sep(128, 128, 1),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.classifier = torch.nn.Linear(128, 10)

    def forward(self, x):
        return self.classifier(self.features(x))


def train(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, batch: int, seed: int) -> float:
    """Adam with a cosine schedule; returns seconds."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for i in range(len(x) // batch):
            idx = order[i * batch : (i + 1) * batch]
            xb = torch.from_numpy(x[idx])
            if rng.random() < 0.5:  # horizontal flip: clothes are left-right symmetric enough
                xb = xb.flip(3)
            loss = torch.nn.functional.cross_entropy(model(xb), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - start


def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        pred = np.concatenate(
            [model(torch.from_numpy(x[i : i + 500])).argmax(1).numpy() for i in range(0, len(x), 500)]
        )
    return float(np.mean(pred == y) * 100)


def ort_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    sess = session(model, mode="kernels")
    pred = np.concatenate([sess.run(None, {"x": x[i : i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float(np.mean(pred == y) * 100)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calib", type=int, default=512, help="calibration images (from the training set)")
    ap.add_argument("--results", type=Path, help="write a markdown section with the numbers here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if not (args.data / "t10k-images-idx3-ubyte.gz").is_file():
        print(f"Fashion-MNIST not found in {args.data}: apt-get install dataset-fashion-mnist", file=sys.stderr)
        return 2
    xtr, ytr = load("train", args.data)
    xte, yte = load("test", args.data)
    calib = xtr[np.random.default_rng(1).choice(len(xtr), args.calib, replace=False)]
    calib_batches = [torch.from_numpy(calib[i : i + 64]) for i in range(0, len(calib), 64)]
    example = (torch.from_numpy(xte[:1]),)
    # name, ORT accuracy, torch accuracy, train seconds, ONNX file bytes
    rows: list[tuple[str, float, float | None, float, int | None]] = []

    model = SmallMobileNet()
    t_float = train(model, xtr, ytr, args.epochs, 2e-3, 128, args.seed)
    acc_float = torch_accuracy(model, xte, yte)
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float.onnx"
        onnx.save(lt.module_to_onnx(model, example), float_path)
        rows.append(("float32", acc_float, None, t_float, float_path.stat().st_size))
        print(f"float: {acc_float:.2f}% ({t_float:.0f} s)", flush=True)

        for name, recipe in {**RECIPES, **PTQ_ONLY}.items():
            out = Path(tmp) / f"ptq_{name.replace(' ', '_')}.onnx"
            ptq = lowbit.quantize(model, out, example_inputs=example, calib=calib, recipe=recipe, progress=False)
            rows.append((f"PTQ {name}", ort_accuracy(ptq.model, xte, yte), None, 0.0, out.stat().st_size))
            print(f"PTQ {name}: {rows[-1][1]:.2f}% (quantized in {ptq.seconds:.0f} s)", flush=True)

        # Control: QAT trains for qat_epochs more; the float model given the same extra epochs shows how much of
        # QAT's result is just more training.
        more = copy.deepcopy(model)
        t = train(more, xtr, ytr, args.qat_epochs, 2e-4, 128, args.seed + 1)
        rows.append((f"float32 + {args.qat_epochs} epochs (control)", torch_accuracy(more, xte, yte), None, t, None))

        for name, recipe in RECIPES.items():
            steps_per_epoch = len(xtr) // 128
            qat = lt.prepare_qat(
                model,
                recipe,
                example_inputs=example,
                calib=calib_batches,
                freeze_bn_after=steps_per_epoch * args.qat_epochs // 2,
            )
            t = train(qat, xtr, ytr, args.qat_epochs, 2e-4, 128, args.seed + int(name[1]))
            out = Path(tmp) / f"qat_{name}.onnx"
            res = lt.export_onnx(qat, out, example)
            lowbit.Plan.load(lowbit.plan.plan_path(out))  # the plan is there for lowbit eval/diagnose
            rows.append(
                (f"QAT {name}", ort_accuracy(res.model, xte, yte), torch_accuracy(qat, xte, yte), t, out.stat().st_size)
            )
            print(f"QAT {name}: {rows[-1][1]:.2f}% in ORT, {rows[-1][2]:.2f}% fake-quant ({t:.0f} s)", flush=True)

    lines = [
        "| model | accuracy (quantized: ONNX Runtime; float: PyTorch) | fake-quant module in PyTorch | vs float "
        "| training time | ONNX file |",
        "|---|---|---|---|---|---|",
    ]
    for name, acc, tacc, secs, size in rows:
        lines.append(
            f"| {name} | {acc:.2f}% | {'' if tacc is None else f'{tacc:.2f}%'} | "
            f"{acc - acc_float:+.2f} | {f'{secs:.0f} s' if secs else ''} | "
            f"{'' if size is None else f'{size / 1024:.0f} KiB'} |"
        )
    ort_gap = max(abs(acc - tacc) for name, acc, tacc, _, _ in rows if name.startswith("QAT"))
    control = next(acc for name, acc, _, _, _ in rows if name.endswith("(control)"))
    vs_control = ", ".join(f"{name} {acc - control:+.2f}" for name, acc, _, _, _ in rows if name.startswith("QAT"))
    table = "\n".join(lines)
    print(table)
    if args.results:
        cmd = "python examples/qat_fashion_mnist.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        text = (
            f"## Fashion-MNIST: float vs PTQ vs QAT ({len(xte)} test images)\n\n"
            f"Command: `{cmd}` ({args.threads} thread(s), float {args.epochs} epochs, QAT {args.qat_epochs} "
            f"epochs from the float model, calibration {args.calib} training images).\n\n{table}\n\n"
            f"Largest gap between an exported QAT model in ONNX Runtime and its fake-quant module: "
            f"{ort_gap:.2f} points. Against the float control trained as long as QAT: {vs_control} points. "
            f"Training times are wall-clock on a 2-core x86 machine shared with other jobs. W4A8: per-channel "
            "symmetric 4-bit weights stored as ONNX INT4 (two per byte); ONNX Runtime has no integer kernel for "
            "them and runs those layers in float on the dequantized weights, so W4A8 saves file size, not "
            "ONNX Runtime time.\n"
        )
        args.results.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
