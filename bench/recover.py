"""Accuracy-recovery passes on and off, on the real models where each applies.

Cross-layer equalization (`Recipe.equalize`, `--equalize`): every corpus model with at least one eligible Conv/Gemm
pair, and EfficientNet-Lite0, with per-channel weights (lowbit's default) and per-tensor weights (`--per-tensor`,
where CLE is meant to matter), each with the entry's task metric vs float on held-out samples (integer kernels).
SmoothQuant (`Recipe.smooth_quant`, `--smooth-quant`): MiniLM static int8, mean and min cosine of the sentence
embedding vs float, at a few alphas.

Usage: python bench/recover.py [--only NAME ...] [--sentences N] [--out bench/RESULTS_RECOVER.md]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lowbit  # noqa: E402
from corpus import run, session  # noqa: E402
from lowbit.passes import prepare  # noqa: E402
from lowbit.passes.equalize import find_pairs  # noqa: E402
from lowbit.pipeline import load  # noqa: E402
from lowbit_zoo.corpus.registry import ENTRIES, ROOT, Entry, Output  # noqa: E402
from ort_baseline import cpu_model  # noqa: E402

ART = Path(__file__).resolve().parents[1] / "artifacts"
CLE_MODELS = [
    "captcha_crnn",
    "mobilenet_v3_small_op17",
    "mobilenet_v3_large_op17",
    "seizure_modelA",
    "efficientnet_lite0",
]


def _lite0() -> Entry:
    from lowbit_zoo.corpus.registry import _images

    return Entry(
        "efficientnet_lite0",
        "EfficientNet-Lite0 (ReLU6 everywhere)",
        lambda root: ART / "efficientnet_lite0.onnx",
        _images(224),
        (Output("logits", "class scores"),),
        n_calib=64,
        n_eval=128,
    )


def pairs(model: Path) -> int:
    m = load(str(model)).model
    prepare(m)
    return len(find_pairs(m))


def mean_cosine(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Mean over samples of the cosine between float and quantized outputs (less coarse than top-1 agreement)."""
    cos = []
    for r, g in zip(ref, got):
        r, g = r.reshape(-1).astype(np.float64), g.reshape(-1).astype(np.float64)
        cos.append(float(r @ g / max(np.linalg.norm(r) * np.linalg.norm(g), 1e-30)))
    return float(np.mean(cos))


def cle_rows(names: list[str], tmp: Path, n_eval: int | None = None) -> list[str]:
    entries = {e.name: e for e in ENTRIES}
    entries["efficientnet_lite0"] = _lite0()
    rows = []
    for name in names:
        entry = entries[name]
        model = entry.get(ROOT)
        calib, held = entry.calib(model), entry.eval(model, n_eval)
        primary = entry.outputs[0]
        ref = run(session(str(model)), held)
        out_name = primary.name if primary.name in ref else next(iter(ref))
        found = pairs(model)
        cells = []
        for per_channel in (True, False):
            for eq in (False, True):
                recipe = lowbit.Recipe(default=lowbit.Scheme(per_channel=per_channel), equalize=eq)
                out = tmp / f"{name}_{per_channel}_{eq}.onnx"
                lowbit.quantize(
                    str(model), out, calib=calib, recipe=recipe, progress=False, batch_axes=entry.batch_axes
                )
                got = run(session(str(out)), held)
                task = primary.metric(ref[out_name], got[out_name])
                cells.append(f"{task:.4f} / {mean_cosine(ref[out_name], got[out_name]):.4f}")
                print(name, "per-channel" if per_channel else "per-tensor", "CLE" if eq else "-", cells[-1], flush=True)
        rows.append(f"| {name} | {found} | {primary.metric_name} ({len(held)}) | " + " | ".join(cells) + " |")
    return rows


def smooth_rows(n: int, tmp: Path) -> list[str]:
    import onnxruntime as ort

    from lowbit_zoo.zoo import minilm_tokenize, text_sentences

    model = ART / "minilm" / "minilm.onnx"
    calib = tmp / "minilm.calib.npz"
    np.savez(calib, **minilm_tokenize(text_sentences(64, "calib")))
    sentences = text_sentences(n, "eval")

    def embed(path: Path) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        parts = [sess.run(None, minilm_tokenize(sentences[i : i + 32]))[0] for i in range(0, n, 32)]
        return np.concatenate(parts)

    ref = embed(model)
    rows = []
    for alpha in (None, 0.5, 0.6, 0.7, 0.8):
        out = tmp / f"minilm_{alpha}.onnx"
        t = time.perf_counter()
        res = lowbit.quantize(model, out, calib=calib, recipe=lowbit.Recipe(smooth_quant=alpha), progress=False)
        secs = time.perf_counter() - t
        e = embed(out)
        cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        label = "off" if alpha is None else f"alpha {alpha}"
        rows.append(f"| {label} | {len(res.plan.smooth_scales)} | {cos.mean():.4f} | {cos.min():.4f} | {secs:.0f} s |")
        print("minilm", label, rows[-1], flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--only", nargs="+", help="CLE models to run (default: all of CLE_MODELS); 'minilm' for SmoothQuant"
    )
    ap.add_argument("--eval", type=int, help="held-out samples per CLE model (default: the corpus entry's own)")
    ap.add_argument("--sentences", type=int, default=256, help="MiniLM evaluation sentences")
    ap.add_argument("--out", type=Path, help="write the results as markdown here")
    args = ap.parse_args()
    chosen = args.only or [*CLE_MODELS, "minilm"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cle = cle_rows([n for n in chosen if n != "minilm"], tmp, args.eval)
        sq = smooth_rows(args.sentences, tmp) if "minilm" in chosen else []
    text = report(cle, sq, args.sentences)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def report(cle: list[str], sq: list[str], sentences: int) -> str:
    cmd = "python " + shlex.join(["bench/recover.py", *sys.argv[1:]])
    lines = [
        "## Accuracy recovery: cross-layer equalization and SmoothQuant, on and off",
        "",
        f"Command: `{cmd}`. Machine: {cpu_model()}, {len(__import__('os').sched_getaffinity(0))} cores, ONNX Runtime "
        f"{__import__('onnxruntime').__version__}, integer kernels. Static int8, uint8 activations, minmax.",
        "",
    ]
    if cle:
        lines += [
            "### Cross-layer equalization (`--equalize`)",
            "",
            "Each cell: task metric / mean cosine of that output, vs float, on held-out samples (the corpus "
            "entry's own metric; EfficientNet-Lite0: top-1 agreement on photo crops, calibrated on 64). "
            "Pairs: Conv/Gemm pairs the pass rescales (joined directly or through Relu/LeakyRelu/PRelu/MaxPool/"
            "AveragePool; not Relu6/Clip/HardSwish).",
            "",
            "| model | pairs | metric (samples) | per-channel | per-channel + CLE | per-tensor | per-tensor + CLE |",
            "|---|---|---|---|---|---|---|",
            *cle,
            "",
        ]
    if sq:
        lines += [
            "### SmoothQuant (`--smooth-quant ALPHA`) on MiniLM static int8",
            "",
            f"Cosine of the sentence embedding vs float over {sentences} held-out sentences, calibrated on 64. "
            "Input side: activations whose producer absorbs 1/s exactly (LayerNorm, via a twin when the residual also "
            "reads it, and GELU's final `* 0.5`), i.e. Q/K/V and the FFN's two MatMuls (18). Output side: MatMul "
            "outputs that flow only into a residual sum, with a channel over 2x the median (on MiniLM the 6 FFN and "
            "6 attention outputs, 12), divided in the weights and multiplied back by a float Mul. `activations "
            "smoothed` counts both.",
            "",
            "| SmoothQuant | activations smoothed | mean cosine | min cosine | quantize time |",
            "|---|---|---|---|---|",
            *sq,
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
