"""all-MiniLM-L6-v2 with ONNX Runtime's fused attention: lowbit dynamic vs ORT quantize_dynamic.

The export is first rewritten by ONNX Runtime's transformers optimizer (model_type bert, 12 heads, hidden 384),
which fuses each layer's self-attention into one com.microsoft.Attention. lowbit's dynamic mode turns those into
QAttention, as ORT's quantize_dynamic does. Prints mean/min embedding cosine vs the optimized float model and
paired median latency ratios (1 thread, interleaved runs).

    PYTHONPATH=src python bench/minilm_attention.py [--sentences 200] [--runs 200] [--opt-level 1]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # lowbit_zoo: MiniLM and sentences

import numpy as np  # noqa: E402
import onnx  # noqa: E402

import lowbit  # noqa: E402
from lowbit.evaluate.bench import interleaved_times  # noqa: E402
from lowbit.evaluate.latency import paired_ratio  # noqa: E402
from lowbit.recipe import preset  # noqa: E402
from lowbit.runtimes.ort import session  # noqa: E402
from lowbit_zoo.zoo import minilm_onnx, minilm_tokenize, text_sentences  # noqa: E402


def build(d: Path, opt_level: int) -> dict[str, Path]:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    paths = {
        "float": d / "minilm.onnx",
        "float fused": d / "minilm.fused.onnx",
        "lowbit dynamic (fused)": d / "lowbit.fused.onnx",
        "lowbit dynamic (unfused export)": d / "lowbit.onnx",
        "ORT dynamic (fused)": d / "ort.fused.onnx",
        "ORT dynamic per-channel (fused)": d / "ort-pc.fused.onnx",
    }
    minilm_onnx(paths["float"])
    opt = optimize_model(
        str(paths["float"]), model_type="bert", num_heads=12, hidden_size=384, opt_level=opt_level, use_gpu=False
    )
    opt.save_model_to_file(str(paths["float fused"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lowbit.quantize(paths["float fused"], paths["lowbit dynamic (fused)"], recipe=preset("dynamic"), progress=False)
        lowbit.quantize(
            paths["float"], paths["lowbit dynamic (unfused export)"], recipe=preset("dynamic"), progress=False
        )
    for label, pc in (("ORT dynamic (fused)", False), ("ORT dynamic per-channel (fused)", True)):
        # ONNX shape inference cannot type the contrib ops' outputs; ORT's quantizer asks to be told they are float.
        quantize_dynamic(
            paths["float fused"],
            paths[label],
            weight_type=QuantType.QInt8,
            per_channel=pc,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    return paths


def embeddings(path: Path, sentences: list[str], batch: int = 32) -> np.ndarray:
    sess = session(path, "kernels", threads=0)
    return np.concatenate(
        [sess.run(None, minilm_tokenize(sentences[i : i + batch]))[0] for i in range(0, len(sentences), batch)]
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sentences", type=int, default=200)
    ap.add_argument("--runs", type=int, default=200, help="interleaved latency runs at batch 1")
    ap.add_argument("--opt-level", type=int, default=1, choices=(0, 1))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = build(Path(tmp), args.opt_level)
        for label, p in paths.items():
            ops = collections.Counter(n.op_type for n in onnx.load(p).graph.node)
            keep = {
                k: ops[k]
                for k in (
                    "Attention",
                    "QAttention",
                    "MatMul",
                    "MatMulInteger",
                    "DynamicQuantizeMatMul",
                    "EmbedLayerNormalization",
                    "QEmbedLayerNormalization",
                )
                if ops[k]
            }
            print(f"{label}: {p.stat().st_size / 1e6:.1f} MB, {keep}")
        sentences = text_sentences(args.sentences, "eval", 0)
        ref = embeddings(paths["float"], sentences)
        print(f"\ncosine vs float (unfused export) over {len(sentences)} sentences:")
        for label, p in paths.items():
            e = embeddings(p, sentences)
            c = (e * ref).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(ref, axis=1))
            print(f"  {label}: mean {c.mean():.5f}, min {c.min():.5f}")
        one = minilm_tokenize(sentences[:1])
        t = interleaved_times({k: str(v) for k, v in paths.items()}, one, threads=1, runs=args.runs)
        print(
            f"\npaired median latency ratios, batch 1, 1 thread, {args.runs} interleaved runs "
            f"(float fused {1e3 * np.median(t['float fused']):.2f} ms):"
        )
        for ours, theirs in (
            ("lowbit dynamic (fused)", "ORT dynamic (fused)"),
            ("lowbit dynamic (fused)", "ORT dynamic per-channel (fused)"),
            ("lowbit dynamic (fused)", "float fused"),
            ("ORT dynamic (fused)", "float fused"),
            ("lowbit dynamic (fused)", "lowbit dynamic (unfused export)"),
        ):
            print(f"  {ours} / {theirs}: {paired_ratio(t, ours, theirs):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
