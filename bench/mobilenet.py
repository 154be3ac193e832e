"""MobileNetV3 Small/Large (opset 11 with decomposed hard-swish, opset 17): float vs lowbit vs ORT quantize_static.

Per model: latency ratio vs float at 1 thread (ONNX Runtime CPU, default optimizations; sessions timed interleaved
in one process, paired per-run ratios, median), top-1 agreement with float on held-out photo crops, and what the
performance lint still finds in lowbit's model. Also the lookup-table alternative for HardSwish/HardSigmoid
(`--lut`: Cast + Gather of a 256-entry table) so the choice in ops/activation.py stays measured.

Usage: python bench/mobilenet.py [--workdir DIR] [--runs N] [--eval N] [--out bench/RESULTS_MOBILENET.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # lowbit_zoo
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ort_baseline's CPU helpers

N_CALIB = 64
MODELS = [("small", 11), ("small", 17), ("large", 11), ("large", 17)]


def ort_static(src: Path, out: Path, calib: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"input": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self._it, None)

    import onnx
    from onnx import version_converter

    proto = onnx.load(str(src))
    if proto.opset_import[0].version < 13:  # per-channel QDQ needs opset 13: quantize_static writes invalid models
        proto = version_converter.convert_version(proto, 13)
        src = out.with_suffix(".opset13.onnx")
        onnx.save(proto, str(src))
    quantize_static(
        str(src),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )


def lut_variant(src: Path, out: Path) -> None:
    """lowbit's model with every 8-bit DQ -> HardSwish/HardSigmoid -> Q replaced by Cast(int32) + Gather of a
    256-entry table of the op's quantized outputs (indexed by the raw byte: Gather wraps negative int8 indices)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(src))
    g = proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    prod = {o: n for n in g.node for o in n.output}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    drop, add = [], []
    for n in list(g.node):
        d, qs = prod.get(n.input[0]), readers.get(n.output[0], [])
        if n.op_type not in ("HardSwish", "HardSigmoid") or d is None or d.op_type != "DequantizeLinear":
            continue
        if len(qs) != 1 or qs[0].op_type != "QuantizeLinear":
            continue
        si, zi, so, zo = (inits[t] for t in (d.input[1], d.input[2], qs[0].input[1], qs[0].input[2]))
        x = (np.arange(256).astype(np.uint8).view(zi.dtype).astype(np.float32) - np.float32(zi)) * np.float32(si)
        gate = np.clip(x / np.float32(6) + np.float32(0.5), 0, 1)
        y = x * gate if n.op_type == "HardSwish" else gate
        lim = np.iinfo(zo.dtype)
        table = np.clip(np.rint(y / np.float32(so)) + zo.astype(np.int32), lim.min, lim.max).astype(zo.dtype)
        g.initializer.append(numpy_helper.from_array(table, n.name + "_table"))
        cast = helper.make_node("Cast", [d.input[0]], [n.name + "_index"], to=TensorProto.INT32, name=n.name + "_i")
        gather = helper.make_node("Gather", [n.name + "_table", n.name + "_index"], [qs[0].output[0]], name=n.name)
        drop += [n, qs[0]] + ([d] if len(readers[d.output[0]]) == 1 else [])
        add.append((n, [cast, gather]))
    for n, new in add:
        at = list(g.node).index(n)
        for j, m in enumerate(new):
            g.node.insert(at + j, m)
    for n in drop:
        g.node.remove(n)
    onnx.save(proto, str(out))


def measure(paths: dict[str, Path], x1: np.ndarray, evalx: np.ndarray, runs: int) -> dict[str, dict[str, float]]:
    from lowbit.evaluate.latency import interleaved_latency, paired_ratio
    from lowbit.runtimes.ort import session

    times: dict[str, list[float]] = {k: [] for k in paths}
    for order in (list(paths), list(reversed(paths))):  # session creation order shifts timings: cancel it
        sessions = {k: session(str(paths[k]), "kernels", threads=1) for k in order}
        for k, v in interleaved_latency(sessions, {"input": x1}, runs=runs // 2, warmup=5).items():
            times[k].extend(v)
    sessions = {k: session(str(p), "kernels", threads=1) for k, p in paths.items()}
    top1 = {
        k: np.concatenate([s.run(None, {"input": evalx[i : i + 16]})[0].argmax(1) for i in range(0, len(evalx), 16)])
        for k, s in sessions.items()
    }
    return {
        k: {
            "ratio": paired_ratio(times, k, "float"),
            "ms": 1e3 * statistics.median(times[k]),
            "agree": float(np.mean(top1[k] == top1["float"])),
        }
        for k in paths
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/lowbit-bench-mobilenet")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--lut", action="store_true", help="also time the lookup-table form")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS_MOBILENET.md"))
    args = ap.parse_args()

    import lowbit
    from lowbit.evaluate.lint import lint
    from lowbit_zoo.mobilenet import mobilenet_v3_onnx
    from lowbit_zoo.zoo import photo_crops
    from ort_baseline import cpu_flags, cpu_model

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    calib = photo_crops(N_CALIB, "calib", seed=1)
    evalx = photo_crops(args.eval, "eval")
    x1 = evalx[:1]
    rows, notes = [], []
    for variant, opset in MODELS:
        name = f"mnv3_{variant}_{opset}"
        src = mobilenet_v3_onnx(work / f"{name}.onnx", variant, opset)
        paths = {"float": src, "lowbit": work / f"{name}.lowbit.onnx", "ort": work / f"{name}.ort.onnx"}
        feeds = [calib[i : i + 1] for i in range(len(calib))]
        t = time.perf_counter()
        lowbit.quantize(src, paths["lowbit"], calib=feeds, progress=False)
        print(f"{name}: lowbit quantize {time.perf_counter() - t:.1f} s", flush=True)
        paths["lowbit ort-target"] = work / f"{name}.lowbit-ort.onnx"
        lowbit.quantize(
            src, paths["lowbit ort-target"], calib=feeds, recipe=lowbit.Recipe(target="onnxruntime"), progress=False
        )
        ort_static(src, paths["ort"], calib)
        if args.lut:
            paths["lowbit+lut"] = work / f"{name}.lut.onnx"
            lut_variant(paths["lowbit"], paths["lowbit+lut"])
        r = measure(paths, x1, evalx, args.runs)
        for k in ("lowbit", "lowbit ort-target"):
            kinds = [f"{f['kind']} x{len(f['nodes'])}" for f in lint(paths[k])]
            notes.append(f"- {name} {k} lint: {', '.join(kinds) or 'nothing'}")
        for k in paths:
            if k != "float":
                rows.append(
                    f"| {name} | {k} | {r[k]['ratio']:.3f} | {r[k]['ms']:.2f} | {r['float']['ms']:.2f} | "
                    f"{r[k]['agree']:.3f} |"
                )
        print("\n".join(rows[-(len(paths) - 1) :]), flush=True)
    cmd = "PYTHONPATH=src:examples python bench/mobilenet.py " + " ".join(sys.argv[1:])
    text = "\n".join(
        [
            "# MobileNetV3: float vs lowbit vs ONNX Runtime quantize_static",
            "",
            f"Command: `{cmd}`  ",
            f"CPU: {cpu_model()} ({cpu_flags()}); ONNX Runtime CPU, 1 thread, batch 1, default optimizations.  ",
            f"Latency: {args.runs} interleaved runs per model, ratio = median of paired per-run ratios vs float.  ",
            f"Agreement: top-1 vs float on {args.eval} held-out photo crops (`photo_crops(n, 'eval')`); "
            f"calibration {N_CALIB} crops of the calibration photos. Weights are a seeded random init with BatchNorm "
            "statistics re-estimated on photos (no pretrained MobileNetV3 installs offline), so agreement measures "
            "quantization noise against a network whose logits are less decisive than a trained one's.",
            "",
            '`lowbit` is the default (portable) target; `lowbit ort-target` is `Recipe(target="onnxruntime")` '
            "(HardSwish/HardSigmoid as requantization + QLinearMul, ops/activation.py); `lowbit+lut` is the default "
            "model with each HardSwish/HardSigmoid as Cast + Gather of a 256-entry table (the rejected alternative). "
            "ORT quantize_static: QDQ, u8 activations, s8 per-channel weights, MinMax; opset-11 models are first "
            "upgraded to opset 13 with onnx's version converter (per-channel QDQ needs 13; without it quantize_static "
            "writes a model ONNX Runtime rejects).",
            "",
            "| model | quantizer | latency / float | ms | float ms | top-1 agreement |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            *notes,
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
