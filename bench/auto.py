"""`lowbit auto` on EfficientNet-Lite0 with a 1-point budget, against NNCF's `quantize_with_accuracy_control`.

Data (real photographs, lowbit_zoo): calibration = 128 crops of the calibration photos (seed 0); the search's
evaluation data = 128 other crops of the same photos (seed 1); held-out = 256 crops of the evaluation photos,
which neither tool sees. Both tools get the same calibration and search data and the same budget: top-1 agreement
with float may drop by at most 1 point on the search data (NNCF: max_drop=0.01, absolute, with a validation
function computing that agreement with ONNX Runtime's integer kernels). Then every model is measured on the
held-out crops (kernels and simulation) and timed paired against float at 1 thread, in one run.

Usage: python bench/auto.py [--calib 128] [--search 128] [--heldout 256] [--skip-nncf] [--rounds 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import lowbit  # noqa: E402
from lowbit.evaluate.bench import machine  # noqa: E402
from lowbit.evaluate.latency import interleaved_latency, paired_ratio  # noqa: E402
from lowbit.evaluate.metrics import fidelity  # noqa: E402
from lowbit.runtimes.ort import run_all, session  # noqa: E402
from lowbit_zoo.zoo import efficientnet_lite0_onnx, photo_crops  # noqa: E402

# Outside the repository: the float model is exported here too, so runs never share files with other checkouts.
ART = Path(tempfile.gettempdir()) / "lowbit-bench-auto"


def float_compute(model: onnx.ModelProto) -> int:
    """Conv/Gemm/MatMul nodes whose data input (input 0) is not the DequantizeLinear of an activation: the layers
    left float (MatMulNBits, int4 weight-only, is not counted)."""
    consts = {i.name for i in model.graph.initializer}
    dq_of_act = {
        o for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in consts for o in n.output
    }
    return sum(1 for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul") and n.input[0] not in dq_of_act)


def nncf_accuracy_control(float_path: Path, calib: np.ndarray, search: np.ndarray, refs: np.ndarray):
    import nncf

    def validate(model: onnx.ModelProto, items) -> tuple[float, list[float]]:
        sess = session(model, "kernels")
        per = [float(sess.run(None, {"input": x})[0].argmax() == label) for x, label in items]
        return float(np.mean(per)), per

    calib_ds = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))], lambda x: {"input": x})
    val_ds = nncf.Dataset([(search[i : i + 1], int(refs[i])) for i in range(len(search))])
    return nncf.quantize_with_accuracy_control(
        onnx.load(str(float_path)),
        calib_ds,
        val_ds,
        validate,
        max_drop=0.01,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calib),
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--search", type=int, default=128)
    ap.add_argument("--heldout", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--skip-nncf", action="store_true")
    args = ap.parse_args()
    ART.mkdir(parents=True, exist_ok=True)
    float_path = efficientnet_lite0_onnx(ART / "efficientnet_lite0.onnx")
    calib = photo_crops(args.calib, "calib")
    search = photo_crops(args.search, "calib", seed=1)
    heldout = photo_crops(args.heldout, "eval")
    models: dict[str, onnx.ModelProto] = {}
    took: dict[str, float] = {}

    t = time.perf_counter()
    models["lowbit int8 (default)"] = lowbit.quantize(str(float_path), calib=calib, progress=False).model
    took["lowbit int8 (default)"] = time.perf_counter() - t
    t = time.perf_counter()
    result = lowbit.auto_quantize(str(float_path), calib, search, ART / "lite0.auto.onnx", max_drop=1.0)
    took["lowbit auto, 1 point"] = time.perf_counter() - t
    models["lowbit auto, 1 point"] = result.model
    if not args.skip_nncf:
        refs = run_all(session(str(float_path)), [{"input": search}])[0].argmax(1)
        t = time.perf_counter()
        models["NNCF accuracy control, 1 point"] = nncf_accuracy_control(float_path, calib, search, refs)
        took["NNCF accuracy control, 1 point"] = time.perf_counter() - t

    batches = [{"input": heldout[i : i + 32]} for i in range(0, len(heldout), 32)]
    sbatches = [{"input": search[i : i + 32]} for i in range(0, len(search), 32)]
    ref = run_all(session(str(float_path)), batches)[0]
    sref = run_all(session(str(float_path)), sbatches)[0]
    sessions = {"float": session(str(float_path), threads=1)}
    rows = []
    for name, m in models.items():
        onnx.save(m, str(ART / (name.split(",")[0].replace(" ", "_") + ".onnx")))
        kern = fidelity(ref, run_all(session(m, "kernels"), batches)[0])
        sim = fidelity(ref, run_all(session(m, "simulate"), batches)[0])
        skern = fidelity(sref, run_all(session(m, "kernels"), sbatches)[0])
        rows.append(
            {
                "tool": name,
                "search_top1": skern["top1_agreement"],
                "heldout_top1_kernels": kern["top1_agreement"],
                "heldout_top1_simulation": sim["top1_agreement"],
                "heldout_cosine": kern["cosine"],
                "mb": m.ByteSize() / 1e6,
                "seconds": took[name],
                "float_nodes": float_compute(m),
            }
        )
        sessions[name] = session(m, threads=1)
    times = interleaved_latency(sessions, {"input": heldout[:1]}, runs=args.rounds, warmup=3)
    for row in rows:
        row["latency_ratio"] = paired_ratio(times, row["tool"], "float")
        row["ms"] = 1e3 * float(np.median(times[row["tool"]]))
    float_ms = 1e3 * float(np.median(times["float"]))
    out = {
        "rows": rows,
        "float_ms": float_ms,
        "cpu": machine()["cpu"],
        "auto": {"front": result.front, "points": result.points, "seconds": result.seconds},
        "auto_precisions": result.counts(),
    }
    (ART / "results.json").write_text(json.dumps(out, indent=1))
    print(f"CPU {out['cpu']}; float {float_ms:.2f} ms/crop at 1 thread; {args.rounds} paired rounds\n")
    print(
        "| tool | top-1 agreement, search data (kernels) | held-out, kernels | held-out, simulation | "
        "latency vs float (1 thread) | size MB | Conv/Gemm left float | time |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['tool']} | {r['search_top1']:.1%} | {r['heldout_top1_kernels']:.1%} | "
            f"{r['heldout_top1_simulation']:.1%} | {r['latency_ratio']:.3f}x ({r['ms']:.2f} ms) | {r['mb']:.2f} | "
            f"{r['float_nodes']} | {r['seconds']:.0f} s |"
        )
    print("\nauto's explored front:")
    for p in result.front:
        print(
            f"  step {p['step']}: {p['score']:.2f} points, {p['latency_ratio']:.3f}x, {p['size_bytes'] / 1e6:.2f} MB, "
            f"{p['precisions']}"
        )
    print(f"auto took {result.seconds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
