"""AdaRound (`Scheme.adaround`, `--adaround`) against round-to-nearest, on real models.

- Fashion-MNIST (examples/qat_fashion_mnist.py's SmallMobileNet, trained 6 epochs, cached in
  artifacts/fashion/): accuracy on the 10k test images in ONNX Runtime, W4A8 and W8A8, round-to-nearest vs AdaRound
  learned on the quantized model's inputs (the paper's asymmetric reconstruction) and on the float model's inputs;
- EfficientNet-Lite0: W8A8 (lowbit's default) vs W8A8 + AdaRound, top-1 agreement with float on held-out photo
  crops (integer kernels and float simulation), calibrated on 64 crops.
Each row gives the quantize time (AdaRound's share included). The results replace this script's section of the
output file (other sections stay).

Usage: python bench/adaround.py [--only fashion lite0] [--eval 256] [--out bench/RESULTS_RECOVER.md]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "bench"))

import lowbit  # noqa: E402
import lowbit.adaround as ada  # noqa: E402
import qat_fashion_mnist as fm  # noqa: E402
from corpus import run, session  # noqa: E402
from ort_baseline import cpu_model  # noqa: E402

ART = ROOT / "artifacts"
HEADING = "## AdaRound (`--adaround`): learned rounding vs round-to-nearest"


def fashion_model(epochs: int = 6, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """The example's float model, trained once and cached (about 3-7 minutes on 1 thread)."""
    path = ART / "fashion" / f"float_e{epochs}_s{seed}.pt"
    torch.manual_seed(seed)  # before the model is built, as the example does
    model = fm.SmallMobileNet()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, 0.0
    xtr, ytr = fm.load("train", fm.DATA)
    secs = fm.train(model, xtr, ytr, epochs, 2e-3, 128, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, secs


def quantize(model, scheme: lowbit.Scheme, inputs: str = "quantized", **kw) -> tuple[lowbit.QuantizeResult, float]:
    ada.INPUTS = inputs
    t = time.perf_counter()
    res = lowbit.quantize(model, recipe=lowbit.Recipe(default=scheme), progress=True, **kw)
    return res, time.perf_counter() - t


def fashion_rows() -> list[str]:
    torch.set_num_threads(1)
    model, _ = fashion_model()
    xtr, _ = fm.load("train", fm.DATA)
    xte, yte = fm.load("test", fm.DATA)
    calib = xtr[np.random.default_rng(1).choice(len(xtr), 512, replace=False)]  # as the example calibrates
    example = (torch.from_numpy(xte[:1]),)
    acc_float = fm.torch_accuracy(model, xte, yte)
    rows = [f"| float32 | | {acc_float:.2f}% | +0.00 | | |"]
    cases = [
        ("W4A8", "round-to-nearest", lowbit.Scheme(weights="int4"), "quantized"),
        ("W4A8", "AdaRound, quantized inputs", lowbit.Scheme(weights="int4", adaround=True), "quantized"),
        ("W4A8", "AdaRound, float inputs", lowbit.Scheme(weights="int4", adaround=True), "float"),
        ("W8A8", "round-to-nearest", lowbit.Scheme(), "quantized"),
        ("W8A8", "AdaRound, quantized inputs", lowbit.Scheme(adaround=True), "quantized"),
    ]
    for width, how, scheme, inputs in cases:
        res, secs = quantize(model, scheme, inputs, example_inputs=example, calib=calib)
        acc = fm.ort_accuracy(res.model, xte, yte)
        kept = sum(bool(e.get("kept_nearest")) for e in res.plan.adaround.values())
        flipped = [e["flipped"] for e in res.plan.adaround.values()]
        note = f"{len(flipped)} layers, {kept} kept nearest, {100 * np.mean(flipped):.1f}% flipped" if flipped else ""
        rows.append(f"| {width} | {how} | {acc:.2f}% | {acc - acc_float:+.2f} | {secs:.0f} s | {note} |")
        print(rows[-1], flush=True)
    return rows


def lite0_rows(n_eval: int) -> list[str]:
    from lowbit_zoo.corpus.registry import _images

    model = ART / "efficientnet_lite0.onnx"
    make = _images(224)
    calib, held = make(model, 64, 0, "calib"), make(model, n_eval, 0, "eval")
    name = session(str(model)).get_outputs()[0].name
    ref = np.concatenate(run(session(str(model)), held)[name])
    rows = []
    for how, scheme in (("default (round-to-nearest)", lowbit.Scheme()), ("AdaRound", lowbit.Scheme(adaround=True))):
        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "q.onnx"
            res, secs = quantize(str(model), scheme, calib=calib, output=out)
            cells = []
            for simulate in (False, True):
                got = np.concatenate(run(session(str(out), simulate=simulate), held)[name])
                agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
                r, g = ref.reshape(len(held), -1), got.reshape(len(held), -1)
                cos = float(np.mean((r * g).sum(1) / np.linalg.norm(r, axis=1) / np.linalg.norm(g, axis=1)))
                cells.append(f"{100 * agree:.1f}% / {cos:.4f}")
        kept = sum(bool(e.get("kept_nearest")) for e in res.plan.adaround.values())
        extra = f"{len(res.plan.adaround)} layers, {kept} kept nearest" if res.plan.adaround else ""
        rows.append(f"| {how} | {cells[0]} | {cells[1]} | {secs:.0f} s | {extra} |")
        print(rows[-1], flush=True)
    return rows


def section(fashion: list[str], lite0: list[str], n_eval: int) -> str:
    cmd = "python " + shlex.join(["bench/adaround.py", *sys.argv[1:]])
    lines = [
        HEADING,
        "",
        f"Command: `{cmd}`. Machine: {cpu_model()}, {len(os.sched_getaffinity(0))} cores shared with other jobs "
        f"(times are wall-clock, AdaRound learns on 1 thread), ONNX Runtime {__import__('onnxruntime').__version__}, "
        f"torch {torch.__version__}. AdaRound: {ada.ITERATIONS} Adam steps per layer (lr {ada.LEARNING_RATE}, "
        f"batches of {ada.BATCH_ROWS} rows, at most {ada.BATCH_FLOATS} input values, out of up to {ada.ROWS} "
        f"sampled output positions), lambda {ada.LAMBDA}, "
        f"beta {ada.BETA[0]:g} -> {ada.BETA[1]:g} after {ada.WARMUP:.0%} warm-up, pre-activation output.",
        "",
    ]
    if fashion:
        lines += [
            "### Fashion-MNIST (10000 test images, calibrated on 512 training images)",
            "",
            "SmallMobileNet of `examples/qat_fashion_mnist.py`, float trained 6 epochs (seed 0); quantized accuracy "
            "in ONNX Runtime. W4A8: per-channel symmetric INT4 weights, uint8 activations. `flipped`: weights "
            "rounded the other way than nearest.",
            "",
            "| weights | rounding | accuracy | vs float | quantize time | AdaRound |",
            "|---|---|---|---|---|---|",
            *fashion,
            "",
        ]
    if lite0:
        lines += [
            f"### EfficientNet-Lite0, W8A8 ({n_eval} held-out photo crops, calibrated on 64)",
            "",
            "Each cell: top-1 agreement with float / mean cosine of the logits.",
            "",
            "| rounding | integer kernels | float simulation | quantize time | AdaRound |",
            "|---|---|---|---|---|",
            *lite0,
            "",
        ]
    return "\n".join(lines)


def write_section(path: Path, text: str) -> None:
    """Replace this script's section of `path` (from its heading to the next `## ` heading), or append it."""
    old = path.read_text() if path.exists() else ""
    start = old.find(HEADING)
    if start < 0:
        path.write_text(old.rstrip("\n") + ("\n\n" if old else "") + text)
        return
    end = old.find("\n## ", start + len(HEADING))
    path.write_text(old[:start] + text + (old[end + 1 :] if end >= 0 else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=["fashion", "lite0"], default=["fashion", "lite0"])
    ap.add_argument("--eval", type=int, default=256, help="EfficientNet-Lite0 held-out crops")
    ap.add_argument("--out", type=Path, help="write the section here (replacing an earlier one)")
    ap.add_argument("--iterations", type=int, default=ada.ITERATIONS, help="Adam steps per layer")
    args = ap.parse_args()
    ada.ITERATIONS = args.iterations
    fashion = fashion_rows() if "fashion" in args.only else []
    lite0 = lite0_rows(args.eval) if "lite0" in args.only else []
    text = section(fashion, lite0, args.eval)
    print(text)
    if args.out:
        write_section(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
