"""A third-party model end to end: the captcha reader of the `captcha-whisperer` wheel (MIT), quantized with the CLI.

The model is someone else's export (a residual CNN with BatchNorm written as Mul/Add, an unrolled bidirectional
LSTM sharing its weights across 20 time steps, CTC logits laid out time-first [T, batch, C]). This script fetches
the wheel with pip (`make corpus` does the same), renders captchas of the model's alphabet the way captcha
generators draw them (calibration and evaluation images from different seeds), and runs

    lowbit quantize captcha_crnn.onnx --calib calib.npy -o captcha_crnn.int8.onnx
    lowbit eval captcha_crnn.int8.onnx --data eval.npy --reference captcha_crnn.onnx

Usage (from the repository root): `make captcha`, or
    PYTHONPATH=src:examples .venv/bin/python examples/captcha.py [--calib 64] [--eval 200] [--out artifacts/captcha]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowbit_zoo.corpus.signals import captcha_images  # noqa: E402
from lowbit_zoo.corpus.wheels import model_file  # noqa: E402


def lowbit(*args: str) -> None:
    cmd = [sys.executable, "-m", "lowbit.cli.main", *args]
    print("$ lowbit " + shlex.join(args), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calib", type=int, default=64, help="calibration captchas")
    ap.add_argument("--eval", type=int, default=200, help="held-out captchas")
    ap.add_argument("--out", default="artifacts/captcha")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = model_file("captcha-whisperer", "captcha_crnn.onnx")
    for name, n, seed in (("calib", args.calib, 1), ("eval", args.eval, 2)):
        np.save(out / f"{name}.npy", np.concatenate([f["image"] for f in captcha_images(n, seed)]))
    quantized = out / "captcha_crnn.int8.onnx"
    lowbit("quantize", str(model), "--calib", str(out / "calib.npy"), "-o", str(quantized), "--quiet")
    lowbit("eval", str(quantized), "--data", str(out / "eval.npy"), "--reference", str(model), "--quiet")


if __name__ == "__main__":
    main()
