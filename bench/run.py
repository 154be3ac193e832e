"""lowbit vs onnxruntime.quantization.quantize_static on EfficientNet-Lite0 and a MobileNetV2-style CNN.

One command measures, for both models and both quantizers given the same calibration crops:
  * top-1 agreement with the float model and output cosine / SQNR on eval crops, each quantized model
    run with ORT's integer kernels (default optimizations) and as float simulation (ORT_DISABLE_ALL);
  * EfficientNet-Lite0 only: the same under emulated AVX2-without-VNNI kernels (u8 x s8 pairs saturating
    to int16, `lowbit.runtimes.emulate`), one crop at a time, plus saturated-pair counts (skip: --no-emulate);
  * latency at 1 and 2 threads, batch 1: float, lowbit, ORT-quantized, measured interleaved;
    medians and paired median ratios lowbit/float and lowbit/ORT;
  * file sizes; quantization wall time and peak RSS (each quantizer in a fresh subprocess);
  * calibration peak RSS with few vs many calibration samples, fed from a generator (fresh subprocesses);
  * EfficientNet-Lite0 exported to .tflite (float32 and lowbit's int8) and run in LiteRT (XNNPACK): agreement
    with the ONNX models, and latency LiteRT vs ONNX Runtime, all four measured interleaved.

Usage: .venv/bin/python bench/run.py [--quick] [--no-emulate] [--litert-only] [--workdir DIR] [--out bench/RESULTS.md]

The tables are written between the result markers of the output Markdown file (text outside the
markers is kept); --quick writes to WORKDIR/RESULTS.quick.md unless --out is given. --litert-only measures
just the LiteRT part (re-quantizing EfficientNet-Lite0, reusing the workdir's crops) and rewrites only its
table, between the LiteRT markers inside the results.
Workers: bench/run.py --worker JSON (internal).

Modules: prep.py (float models, photo crops), memory.py (quantization wall time and peak RSS, in workers),
accuracy.py (fidelity, emulated AVX2 kernels), latency.py (interleaved latency), litert_compare.py (LiteRT),
report.py (Markdown); this file runs them and holds the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ is sys.path[0]; these modules import lowbit and numpy lazily, inside their functions.
from accuracy import emulate, fidelity_block
from latency import latency_block
from litert_compare import litert_block, litert_markdown, write_litert
from memory import quantize
from prep import build
from report import BEGIN, END, write_markdown

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# lowbit_zoo (EfficientNet-Lite0, photo crops) lives in examples/, outside the lowbit package.
sys.path.insert(1, str(ROOT / "examples"))


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh interpreter, so its peak RSS is its own)
# --------------------------------------------------------------------------------------------


def worker(job: dict) -> dict:
    kind = job["kind"]
    if kind == "build":
        return build(job)
    if kind == "emulate":
        return emulate(job)
    return quantize(job)  # "lowbit" or "ort"


def run_worker(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
    )
    if p.returncode != 0:
        raise RuntimeError(f"worker {job['kind']} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t
    return out


# --------------------------------------------------------------------------------------------
# Measurements in the parent process (no torch imported here)
# --------------------------------------------------------------------------------------------


def cpu_info() -> dict:
    txt = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = txt.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = set()
    for ln in lines:
        if ln.startswith("flags"):
            flags = set(ln.split(":", 1)[1].split())
            break
    keep = [
        f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16") if f in flags
    ]
    return {"model": model, "cpus": os.cpu_count(), "flags": " ".join(keep) or "(none)"}


def litert_only(args, cfg: dict, work: Path, out_md: Path, log) -> int:
    """Only the LiteRT part: reuses the workdir's crops and float model, re-quantizes with the current lowbit."""
    import numpy as np

    eff = work / "efficientnet_lite0.onnx"
    evalx_path = work / "eval.npy"
    if not (
        eff.exists()
        and evalx_path.exists()
        and (work / "calib.npy").exists()
        and len(np.load(evalx_path, mmap_mode="r")) == cfg["n_eval"]
    ):
        run_worker({"kind": "build", "work": str(work), "n_calib": cfg["n_calib"], "n_eval": cfg["n_eval"]})
        log("built models and crops")
    lq = work / "efficientnet_lite0.lowbit.onnx"
    run_worker(
        {"kind": "lowbit", "model": str(eff), "out": str(lq), "calib_npy": str(work / "calib.npy"), "n": cfg["n_calib"]}
    )
    log("lowbit quantize")
    evalx = np.load(evalx_path)
    _, fid = fidelity_block(eff, lq, evalx)
    lr = litert_block(eff, lq, work, evalx, fid["kernels"], cfg["runs"], cfg["warmup"], log)
    (work / ("litert.quick.json" if args.quick else "litert.json")).write_text(json.dumps(lr, indent=1, default=str))
    write_litert(out_md, litert_markdown(lr, cfg, len(evalx)), BEGIN, END)
    log(f"wrote the LiteRT section of {out_md}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes for a smoke test (a few minutes)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--no-emulate",
        action="store_true",
        help="skip EfficientNet-Lite0 under emulated AVX2-without-VNNI kernels (slow: ~1 s per crop and model)",
    )
    ap.add_argument(
        "--litert-only",
        action="store_true",
        help="measure only EfficientNet-Lite0 in LiteRT vs ONNX Runtime and rewrite only that table",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    q = args.quick
    cfg = dict(
        n_calib=16 if q else 64,
        n_eval=64 if q else 256,
        runs=20 if q else 300,
        warmup=3 if q else 10,
        mem_lowbit=(10, 50) if q else (10, 100, 1000),
        mem_ort=(10, 20) if q else (10, 100),
        emulate=not args.no_emulate,
        n_emulate=16 if q else 256,
        n_sat=8,
    )
    cfg["n_emulate"] = min(cfg["n_emulate"], cfg["n_eval"])
    work = args.workdir or Path(tempfile.gettempdir()) / ("lowbit_bench_quick" if q else "lowbit_bench")
    work.mkdir(parents=True, exist_ok=True)
    out_md = args.out or (work / "RESULTS.quick.md" if q else HERE / "RESULTS.md")
    sys.path.insert(0, str(ROOT / "src"))
    import numpy as np
    import onnx
    import onnxruntime as ort

    import lowbit

    t_all = time.perf_counter()
    log = lambda *a: print(f"[{time.perf_counter() - t_all:7.1f}s]", *a, flush=True)  # noqa: E731
    info = {
        "cpu": cpu_info(),
        "versions": {
            "lowbit": lowbit.__version__,
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "python": sys.version.split()[0],
        },
        "cfg": cfg,
        "quick": q,
    }
    log(f"workdir {work}; {info['cpu']}")
    if args.litert_only:
        return litert_only(args, cfg, work, out_md, log)
    info["build"] = run_worker({"kind": "build", "work": str(work), "n_calib": cfg["n_calib"], "n_eval": cfg["n_eval"]})
    log("built models and crops", info["build"])
    calib_npy = work / "calib.npy"
    evalx = np.load(work / "eval.npy")
    models = {
        "EfficientNet-Lite0": work / "efficientnet_lite0.onnx",
        "MobileNetV2-style (random init, BN re-estimated)": work / f"mobilenet_v2_bn{cfg['n_calib']}.onnx",
    }
    results = {}
    for label, fp in models.items():
        stem = fp.stem
        r = results[label] = {}
        lq = work / f"{stem}.lowbit.onnx"
        oqp = work / f"{stem}.ort.onnx"
        r["quant_lowbit"] = run_worker(
            {"kind": "lowbit", "model": str(fp), "out": str(lq), "calib_npy": str(calib_npy), "n": cfg["n_calib"]}
        )
        log(label, "lowbit quantize", r["quant_lowbit"])
        r["quant_ort"] = run_worker(
            {
                "kind": "ort",
                "model": str(fp),
                "pre": str(work / f"{stem}.pre.onnx"),
                "out": str(oqp),
                "calib_npy": str(calib_npy),
                "n": cfg["n_calib"],
            }
        )
        log(label, "ORT quantize_static", r["quant_ort"])
        ref, r["fid_lowbit"] = fidelity_block(fp, lq, evalx)
        np.save(work / f"{stem}.float_logits.npy", ref)
        _, r["fid_ort"] = fidelity_block(fp, oqp, evalx)
        top = np.sort(ref, axis=1)[:, -2:]
        r["float_top1"] = {
            "distinct_classes": int(len(np.unique(ref.argmax(1)))),
            "median_margin": float(np.median(top[:, 1] - top[:, 0])),
            "most_common_share": float(np.bincount(ref.argmax(1)).max() / len(ref)),
        }
        log(label, "fidelity lowbit", r["fid_lowbit"]["kernels"], "ort", r["fid_ort"]["kernels"])
        r["sizes"] = {"float": fp.stat().st_size, "lowbit": lq.stat().st_size, "ort": oqp.stat().st_size}
        r["latency"] = {}
        for th in (1, 2):
            r["latency"][th] = latency_block(
                {"float": fp, "lowbit": lq, "ort": oqp}, evalx[:1], th, cfg["runs"], cfg["warmup"]
            )
            log(label, f"latency {th} thread(s)", r["latency"][th])

    eff = models["EfficientNet-Lite0"]
    results["EfficientNet-Lite0"]["litert"] = litert_block(
        eff,
        work / f"{eff.stem}.lowbit.onnx",
        work,
        evalx,
        results["EfficientNet-Lite0"]["fid_lowbit"]["kernels"],
        cfg["runs"],
        cfg["warmup"],
        log,
    )
    if cfg["emulate"]:
        # Fresh subprocesses, after the latency runs, so neither timing nor memory elsewhere sees the emulator.
        emu = results["EfficientNet-Lite0"]["emulated"] = {}
        for qn in ("lowbit", "ort"):
            emu[qn] = run_worker(
                {
                    "kind": "emulate",
                    "model": str(work / f"{eff.stem}.{qn}.onnx"),
                    "eval_npy": str(work / "eval.npy"),
                    "ref_npy": str(work / f"{eff.stem}.float_logits.npy"),
                    "n": cfg["n_emulate"],
                    "n_sat": min(cfg["n_sat"], cfg["n_emulate"]),
                }
            )
            log(f"EfficientNet-Lite0 {qn} emulated AVX2 without VNNI", emu[qn])
    mem = {"lowbit": {}, "ort": {}}
    for n in cfg["mem_lowbit"]:
        mem["lowbit"][n] = run_worker(
            {"kind": "lowbit", "model": str(eff), "out": str(work / f"mem_lowbit_{n}.onnx"), "n": n}
        )
        log(f"calib memory lowbit n={n}", mem["lowbit"][n])
    pre = work / "efficientnet_lite0.pre.onnx"
    for n in cfg["mem_ort"]:
        mem["ort"][n] = run_worker({"kind": "ort", "model": str(pre), "out": str(work / f"mem_ort_{n}.onnx"), "n": n})
        log(f"calib memory ORT n={n}", mem["ort"][n])
    info["total_s"] = time.perf_counter() - t_all
    (work / ("results.quick.json" if q else "results.json")).write_text(
        json.dumps({"info": info, "results": results, "mem": mem}, indent=1, default=str)
    )
    write_markdown(out_md, info, results, mem, cfg)
    log(f"wrote {out_md}")
    return 0


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
