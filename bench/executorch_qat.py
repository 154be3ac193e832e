"""The QAT Fashion-MNIST model (examples/qat_fashion_mnist.py's SmallMobileNet, `lowbit.torch` QAT W8A8) as an
ExecuTorch program: test-set accuracy of the `.pte` (ExecuTorch, XNNPACK) beside the same module's ONNX export
(ONNX Runtime kernels) and the fake-quant module in PyTorch, on the 10k test images.

Training is shortened for a shared 2-core machine (defaults: float 2 epochs and QAT 1 epoch on the 60k training
images); the comparison is between exports of one trained module, so its length does not matter to the gap.

Usage: PYTHONPATH=src:examples python bench/executorch_qat.py [--epochs 2] [--qat-epochs 1] [--train 60000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--train", type=int, default=60000, help="training images used (the first N)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import numpy as np
    import torch

    import lowbit
    import lowbit.torch as lt
    from lowbit.runtimes.executorch import ExecutorchSession
    from qat_fashion_mnist import DATA, SmallMobileNet, load, ort_accuracy, torch_accuracy, train

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    xtr, ytr = load("train", DATA)
    xte, yte = load("test", DATA)
    xtr, ytr = xtr[: args.train], ytr[: args.train]
    model = SmallMobileNet()
    t_float = train(model, xtr, ytr, args.epochs, 2e-3, 128, 0)
    calib = xtr[np.random.default_rng(1).choice(len(xtr), 512, replace=False)]
    example = (torch.from_numpy(xte[:1]),)
    steps = len(xtr) // 128 * args.qat_epochs
    qat = lt.prepare_qat(
        model,
        example_inputs=example,
        calib=[torch.from_numpy(calib[i : i + 64]) for i in range(0, 512, 64)],
        freeze_bn_after=steps // 2,
    )
    t_qat = train(qat, xtr, ytr, args.qat_epochs, 2e-4, 128, 1)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path, pte = Path(tmp) / "qat.onnx", Path(tmp) / "qat.pte"
        t = time.perf_counter()
        res = lt.export_onnx(qat, onnx_path, example)
        t_onnx = time.perf_counter() - t
        et = lowbit.export_executorch(qat, example[0], pte, input_names=["x"])
        acc_onnx = ort_accuracy(res.model, xte, yte)
        pred = ExecutorchSession(pte).run(None, {"x": xte})[0].argmax(1)
        acc_pte = float(np.mean(pred == yte) * 100)
        sizes = (onnx_path.stat().st_size, pte.stat().st_size)
    acc_fq = torch_accuracy(qat, xte, yte)
    cmd = (
        f"PYTHONPATH=src:examples python bench/executorch_qat.py --epochs {args.epochs} "
        f"--qat-epochs {args.qat_epochs} --train {args.train}"
    )
    lines = [
        f"Command: `{cmd}` ({args.threads} thread(s); float {args.epochs} epoch(s) ({t_float:.0f} s), QAT "
        f"{args.qat_epochs} epoch(s) ({t_qat:.0f} s) on {len(xtr)} training images; {len(xte)} test images).",
        "",
        "| QAT W8A8 model | runtime | test accuracy | vs ONNX | file size | export time |",
        "|---|---|---|---|---|---|",
        f"| fake-quant module | PyTorch | {acc_fq:.2f}% | {acc_fq - acc_onnx:+.2f} | | |",
        f"| `lowbit.torch.export_onnx` | ONNX Runtime (kernels) | {acc_onnx:.2f}% | +0.00 | {sizes[0] / 1024:.0f} KiB "
        f"| {t_onnx:.1f} s |",
        f"| `lowbit.export_executorch` | ExecuTorch (XNNPACK) | {acc_pte:.2f}% | {acc_pte - acc_onnx:+.2f} "
        f"| {sizes[1] / 1024:.0f} KiB | {et.seconds:.1f} s |",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
