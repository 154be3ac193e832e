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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from litert_compare import litert_block, litert_markdown, write_litert  # bench/ is sys.path[0]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh interpreter, so its peak RSS is its own)
# --------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _rss_now_kib() -> int:
    return _status_kib("VmRSS")


def _peak_rss_kib() -> int:
    """This process's peak RSS since exec (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork+exec, so a child would report at least the parent's RSS at the time it was spawned."""
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _crop_chunks(n: int, split: str, seed: int, chunk: int):
    """Photo crops generated on the fly, `chunk` at a time (same crops as _zoo.photo_crops(n, ...))."""
    import numpy as np
    from PIL import Image

    from lowbit import _zoo

    plan = _zoo._crop_plan(n, split, seed)
    mean = np.asarray(_zoo.IMAGENET_MEAN, np.float32)
    std = np.asarray(_zoo.IMAGENET_STD, np.float32)
    for i in range(0, n, chunk):
        out = np.empty((min(chunk, n - i), 224, 224, 3), np.uint8)
        for j, (name, top, left, side, flip) in enumerate(plan[i : i + chunk]):
            patch = _zoo.load_photo(name)[top : top + side, left : left + side]
            if flip:
                patch = patch[:, ::-1]
            out[j] = np.asarray(Image.fromarray(np.ascontiguousarray(patch)).resize((224, 224), Image.Resampling.BILINEAR))
        x = (out.astype(np.float32) / np.float32(255.0) - mean) / std
        yield np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def worker(job: dict) -> dict:
    kind = job["kind"]
    if kind == "build":
        return _build(job)
    if kind == "emulate":
        return _emulate(job)
    import numpy as np

    if kind == "lowbit":
        import lowbit

        base = _rss_now_kib()
        if job.get("calib_npy"):
            calib = job["calib_npy"]  # lowbit memory-maps .npy files and reads them batch by batch
        else:
            calib = _crop_chunks(job["n"], "calib", job.get("seed", 0), chunk=8)
        recipe = lowbit.Recipe(calibration_samples=job["n"])
        t = time.perf_counter()
        res = lowbit.quantize(job["model"], job["out"], calib=calib, recipe=recipe, progress=False)
        wall = time.perf_counter() - t
        extra = {"timings": res.timings, "samples": res.plan.calibration_samples}
    elif kind == "ort":
        import onnxruntime.quantization as oq
        from onnxruntime.quantization.shape_inference import quant_pre_process

        base = _rss_now_kib()
        t = time.perf_counter()
        src = job["model"]
        pre_s = 0.0
        if job.get("pre"):
            quant_pre_process(job["model"], job["pre"])
            src = job["pre"]
            pre_s = time.perf_counter() - t
        if job.get("calib_npy"):
            arr = np.load(job["calib_npy"], mmap_mode="r")[: job["n"]]
            items = (np.array(arr[i : i + 1]) for i in range(len(arr)))
        else:
            items = (c[i : i + 1] for c in _crop_chunks(job["n"], "calib", job.get("seed", 0), chunk=8) for i in range(len(c)))
        count = {"n": 0}

        class Reader(oq.CalibrationDataReader):
            def get_next(self):
                x = next(items, None)
                if x is None:
                    return None
                count["n"] += 1
                return {"input": x}

        oq.quantize_static(
            src, job["out"], Reader(),
            quant_format=oq.QuantFormat.QDQ, activation_type=oq.QuantType.QUInt8, weight_type=oq.QuantType.QInt8,
            per_channel=True, reduce_range=False, calibrate_method=oq.CalibrationMethod.MinMax,
        )
        wall = time.perf_counter() - t
        extra = {"pre_process_s": pre_s, "samples": count["n"]}
    else:
        raise ValueError(kind)
    peak = _peak_rss_kib()
    return {"wall_s": wall, "rss_base_kib": base, "rss_peak_kib": peak, **extra}


def _build(job: dict) -> dict:
    """Float models + calibration/eval crops (needs torch; kept out of the measuring process)."""
    import numpy as np

    sys.path.insert(0, str(HERE))
    from models import mobilenet_v2_onnx

    from lowbit import _zoo

    work = Path(job["work"])
    calib = _zoo.photo_crops(job["n_calib"], "calib", seed=0)
    np.save(work / "calib.npy", calib)
    np.save(work / "eval.npy", _zoo.photo_crops(job["n_eval"], "eval", seed=0))
    eff = work / "efficientnet_lite0.onnx"
    if not eff.exists():
        art = ROOT / "artifacts" / "efficientnet_lite0.onnx"
        if art.exists():
            shutil.copyfile(art, eff)
        else:
            _zoo.efficientnet_lite0_onnx(eff)
    _, params = mobilenet_v2_onnx(work / f"mobilenet_v2_bn{job['n_calib']}.onnx", calib)
    import onnx

    eff_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(eff)).graph.initializer if t.data_type == 1)
    return {"mnv2_params": params, "eff_params": eff_params}


def _emulate(job: dict) -> dict:
    """One quantized model under the emulated non-VNNI AVX2 kernels: fidelity against the float logits on the
    first n eval crops (one crop per run), and saturation_report summed over the first n_sat crops."""
    import numpy as np
    import onnx

    from lowbit.evaluate.metrics import fidelity
    from lowbit.runtimes.emulate import run_emulated, saturation_report

    model = onnx.load(job["model"])  # loaded once; run_emulated re-plans per call (a few % of a run)
    evalx = np.load(job["eval_npy"], mmap_mode="r")
    ref = np.load(job["ref_npy"])[: job["n"]]
    t = time.perf_counter()
    out = np.concatenate([run_emulated(model, {"input": np.array(evalx[i : i + 1])}, saturate=True)[0]
                          for i in range(job["n"])])
    run_s = time.perf_counter() - t
    t = time.perf_counter()
    rep = saturation_report(model, ({"input": np.array(evalx[i : i + 1])} for i in range(job["n_sat"])))
    sat_s = time.perf_counter() - t
    tot = {k: int(sum(v[k] for v in rep.values())) for k in ("pairs_total", "pairs_saturated", "outputs_affected")}
    worst = sorted(((v["pairs_saturated"], k) for k, v in rep.items() if v["pairs_saturated"]), reverse=True)[:3]
    return {"n": job["n"], "fid": fidelity(ref, out.reshape(len(ref), -1)), "n_sat": job["n_sat"], "saturation": tot,
            "int_ops": len(rep), "ops_saturating": sum(1 for v in rep.values() if v["pairs_saturated"]),
            "worst_ops": [[k, c] for c, k in worst], "run_s": run_s, "report_s": sat_s, "rss_peak_kib": _peak_rss_kib()}


def run_worker(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(job)],
                       capture_output=True, text=True, env=env)
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
    model = next((l.split(":", 1)[1].strip() for l in txt.splitlines() if l.startswith("model name")), platform.processor())
    flags = set()
    for l in txt.splitlines():
        if l.startswith("flags"):
            flags = set(l.split(":", 1)[1].split())
            break
    keep = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "avx512_bf16") if f in flags]
    return {"model": model, "cpus": os.cpu_count(), "flags": " ".join(keep) or "(none)"}


def fidelity_block(float_path, qpath, evalx):
    from lowbit.evaluate.metrics import fidelity
    from lowbit.runtimes.ort import run_all, session

    bs = 32
    batches = [{"input": evalx[i : i + bs]} for i in range(0, len(evalx), bs)]
    ref = run_all(session(str(float_path), "kernels"), batches)[0]
    kern = run_all(session(str(qpath), "kernels"), batches)[0]
    sim = run_all(session(str(qpath), "simulate"), batches)[0]
    return ref, {"kernels": fidelity(ref, kern), "simulate": fidelity(ref, sim), "kern_vs_sim": fidelity(sim, kern)}


def latency_block(paths: dict, x1, threads: int, runs: int, warmup: int):
    """Two halves with the sessions created in opposite orders: on this machine the order of session creation
    alone shifted the ratio of two identical-kernel models by ~2.5% (memory placement), so each half
    cancels the other's bias."""
    from lowbit.evaluate.latency import interleaved_latency, paired_ratio
    from lowbit.runtimes.ort import session

    times: dict = {k: [] for k in paths}
    for order in (list(paths), list(reversed(paths))):
        sessions = {k: session(str(paths[k]), "kernels", threads=threads) for k in order}
        half = interleaved_latency(sessions, {"input": x1}, runs=runs // 2, warmup=warmup)
        for k, v in half.items():
            times[k].extend(v)
        del sessions
    return {
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "lowbit/float": paired_ratio(times, "lowbit", "float"),
        "lowbit/ort": paired_ratio(times, "lowbit", "ort"),
        "ort/float": paired_ratio(times, "ort", "float"),
    }


def litert_only(args, cfg: dict, work: Path, out_md: Path, log) -> int:
    """Only the LiteRT part: reuses the workdir's crops and float model, re-quantizes with the current lowbit."""
    import numpy as np

    eff = work / "efficientnet_lite0.onnx"
    evalx_path = work / "eval.npy"
    if not (eff.exists() and evalx_path.exists() and (work / "calib.npy").exists()
            and len(np.load(evalx_path, mmap_mode="r")) == cfg["n_eval"]):
        run_worker({"kind": "build", "work": str(work), "n_calib": cfg["n_calib"], "n_eval": cfg["n_eval"]})
        log("built models and crops")
    lq = work / "efficientnet_lite0.lowbit.onnx"
    run_worker({"kind": "lowbit", "model": str(eff), "out": str(lq), "calib_npy": str(work / "calib.npy"),
                "n": cfg["n_calib"]})
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
    ap.add_argument("--no-emulate", action="store_true",
                    help="skip EfficientNet-Lite0 under emulated AVX2-without-VNNI kernels (slow: ~1 s per crop and model)")
    ap.add_argument("--litert-only", action="store_true",
                    help="measure only EfficientNet-Lite0 in LiteRT vs ONNX Runtime and rewrite only that table")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    q = args.quick
    cfg = dict(
        n_calib=16 if q else 64, n_eval=64 if q else 256, runs=20 if q else 300, warmup=3 if q else 10,
        mem_lowbit=(10, 50) if q else (10, 100, 1000), mem_ort=(10, 20) if q else (10, 100),
        emulate=not args.no_emulate, n_emulate=16 if q else 256, n_sat=8,
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
    info = {"cpu": cpu_info(), "versions": {
        "lowbit": lowbit.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
        "numpy": np.__version__, "python": sys.version.split()[0]}, "cfg": cfg, "quick": q}
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
        r["quant_lowbit"] = run_worker({"kind": "lowbit", "model": str(fp), "out": str(lq),
                                        "calib_npy": str(calib_npy), "n": cfg["n_calib"]})
        log(label, "lowbit quantize", r["quant_lowbit"])
        r["quant_ort"] = run_worker({"kind": "ort", "model": str(fp), "pre": str(work / f"{stem}.pre.onnx"),
                                     "out": str(oqp), "calib_npy": str(calib_npy), "n": cfg["n_calib"]})
        log(label, "ORT quantize_static", r["quant_ort"])
        ref, r["fid_lowbit"] = fidelity_block(fp, lq, evalx)
        np.save(work / f"{stem}.float_logits.npy", ref)
        _, r["fid_ort"] = fidelity_block(fp, oqp, evalx)
        top = np.sort(ref, axis=1)[:, -2:]
        r["float_top1"] = {"distinct_classes": int(len(np.unique(ref.argmax(1)))),
                           "median_margin": float(np.median(top[:, 1] - top[:, 0])),
                           "most_common_share": float(np.bincount(ref.argmax(1)).max() / len(ref))}
        log(label, "fidelity lowbit", r["fid_lowbit"]["kernels"], "ort", r["fid_ort"]["kernels"])
        r["sizes"] = {"float": fp.stat().st_size, "lowbit": lq.stat().st_size, "ort": oqp.stat().st_size}
        r["latency"] = {}
        for th in (1, 2):
            r["latency"][th] = latency_block({"float": fp, "lowbit": lq, "ort": oqp}, evalx[:1], th, cfg["runs"], cfg["warmup"])
            log(label, f"latency {th} thread(s)", r["latency"][th])

    eff = models["EfficientNet-Lite0"]
    results["EfficientNet-Lite0"]["litert"] = litert_block(
        eff, work / f"{eff.stem}.lowbit.onnx", work, evalx, results["EfficientNet-Lite0"]["fid_lowbit"]["kernels"],
        cfg["runs"], cfg["warmup"], log)
    if cfg["emulate"]:
        # Fresh subprocesses, after the latency runs, so neither timing nor memory elsewhere sees the emulator.
        emu = results["EfficientNet-Lite0"]["emulated"] = {}
        for qn in ("lowbit", "ort"):
            emu[qn] = run_worker({"kind": "emulate", "model": str(work / f"{eff.stem}.{qn}.onnx"),
                                  "eval_npy": str(work / "eval.npy"), "ref_npy": str(work / f"{eff.stem}.float_logits.npy"),
                                  "n": cfg["n_emulate"], "n_sat": min(cfg["n_sat"], cfg["n_emulate"])})
            log(f"EfficientNet-Lite0 {qn} emulated AVX2 without VNNI", emu[qn])
    mem = {"lowbit": {}, "ort": {}}
    for n in cfg["mem_lowbit"]:
        mem["lowbit"][n] = run_worker({"kind": "lowbit", "model": str(eff), "out": str(work / f"mem_lowbit_{n}.onnx"), "n": n})
        log(f"calib memory lowbit n={n}", mem["lowbit"][n])
    pre = work / "efficientnet_lite0.pre.onnx"
    for n in cfg["mem_ort"]:
        mem["ort"][n] = run_worker({"kind": "ort", "model": str(pre), "out": str(work / f"mem_ort_{n}.onnx"), "n": n})
        log(f"calib memory ORT n={n}", mem["ort"][n])
    info["total_s"] = time.perf_counter() - t_all
    (work / ("results.quick.json" if q else "results.json")).write_text(json.dumps(
        {"info": info, "results": results, "mem": mem}, indent=1, default=str))
    write_markdown(out_md, info, results, mem, cfg)
    log(f"wrote {out_md}")
    return 0


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _mib(kib: float) -> str:
    return f"{kib / 1024:.0f}"


def write_markdown(path: Path, info, results, mem, cfg) -> None:
    L = []
    c = info["cpu"]
    v = info["versions"]
    L.append(f"Generated by `.venv/bin/python bench/run.py{' --quick' if info['quick'] else ''}` "
             f"in {info['total_s'] / 60:.1f} min.\n")
    L.append(f"- CPU: {c['model']}, {c['cpus']} logical CPUs (shared with other work); relevant flags: `{c['flags']}`")
    L.append(f"- lowbit {v['lowbit']}, onnxruntime {v['onnxruntime']}, onnx {v['onnx']}, numpy {v['numpy']}, python {v['python']}")
    L.append(f"- calibration: the same {cfg['n_calib']} photo crops (`_zoo.photo_crops(n, 'calib', 0)`, saved as one .npy) "
             f"for both quantizers; evaluation: {cfg['n_eval']} crops of disjoint photos (`'eval'`), batch 32")
    L.append("- lowbit: default `Recipe()` (u8 asymmetric activations, s8 symmetric per-channel weights, minmax, "
             "overflow guard on). ORT: `quant_pre_process` then `quantize_static` (QDQ, QUInt8 activations, "
             "QInt8 per-channel weights, MinMax, reduce_range=False), fed one sample at a time")
    b = info["build"]
    L.append(f"- parameters: EfficientNet-Lite0 {b['eff_params'] / 1e6:.2f} M; MobileNetV2-style (width 0.75) "
             f"{b['mnv2_params'] / 1e6:.2f} M\n")

    L.append("### Fidelity vs the float model\n")
    L.append("`kernels`: ORT default optimizations (Q/DQ fused into integer kernels); `simulate`: ORT_DISABLE_ALL "
             "(float ops between Q/DQ). `kern vs sim`: top-1 agreement of the two runs of the same quantized model.\n")
    L.append("| model | quantizer | top-1 kernels | top-1 simulate | cosine kernels | cosine simulate | SQNR dB kernels | SQNR dB simulate | kern vs sim top-1 |")
    L.append("|---|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        for qn, key in (("lowbit", "fid_lowbit"), ("ORT quantize_static", "fid_ort")):
            f = r[key]
            L.append(f"| {label} | {qn} | {f['kernels']['top1_agreement']:.4f} | {f['simulate']['top1_agreement']:.4f} | "
                     f"{f['kernels']['cosine']:.4f} | {f['simulate']['cosine']:.4f} | {f['kernels']['sqnr_db']:.1f} | "
                     f"{f['simulate']['sqnr_db']:.1f} | {f['kern_vs_sim']['top1_agreement']:.4f} |")
    L.append("")
    for label, r in results.items():
        t = r["float_top1"]
        L.append(f"- {label}: float top-1 over the eval crops spans {t['distinct_classes']} classes "
                 f"(most common class {t['most_common_share']:.0%} of crops), median top-1 margin {t['median_margin']:.2f} logits")
    L.append("")

    emu = results.get("EfficientNet-Lite0", {}).get("emulated")
    if emu:
        el, eo = emu["lowbit"], emu["ort"]
        same = "the same" if el["n"] == cfg["n_eval"] else f"the first {el['n']} of the"
        L.append("### Emulated AVX2 without VNNI (x86 without dot-product instructions)\n")
        L.append("This CPU has VNNI, so ORT's u8 x s8 kernels accumulate in int32 and never saturate. On x86 CPUs "
                 "with AVX2 but without VNNI they add neighbouring pairs of products into int16 with saturation "
                 "(`vpmaddubsw`). EfficientNet-Lite0 run under that arithmetic with `lowbit.runtimes.emulate."
                 f"run_emulated(..., saturate=True)`, one crop at a time, over {same} {cfg['n_eval']} eval crops; "
                 "compared with the float model's logits. Saturated pairs: `saturation_report` summed over all "
                 f"integer Conv/Gemm/MatMul ops on the first {el['n_sat']} crops ('outputs affected': output "
                 "elements that differ from int32 accumulation).\n")
        L.append("| EfficientNet-Lite0 | lowbit | ORT quantize_static |")
        L.append("|---|---|---|")
        L.append(f"| top-1 agreement with float ({el['n']} crops) | {el['fid']['top1_agreement']:.4f} | {eo['fid']['top1_agreement']:.4f} |")
        L.append(f"| cosine with float | {el['fid']['cosine']:.4f} | {eo['fid']['cosine']:.4f} |")
        L.append(f"| SQNR dB | {el['fid']['sqnr_db']:.1f} | {eo['fid']['sqnr_db']:.1f} |")
        sl, so = el["saturation"], eo["saturation"]
        L.append(f"| saturated pairs on {el['n_sat']} crops | {sl['pairs_saturated']:,} of {sl['pairs_total']:,} | "
                 f"{so['pairs_saturated']:,} of {so['pairs_total']:,} |")
        L.append(f"| outputs affected on {el['n_sat']} crops | {sl['outputs_affected']:,} | {so['outputs_affected']:,} |")
        L.append(f"| integer ops with any saturated pair | {el['ops_saturating']} of {el['int_ops']} | "
                 f"{eo['ops_saturating']} of {eo['int_ops']} |")
        if el["n"] == cfg["n_eval"]:
            fl, fo = results["EfficientNet-Lite0"]["fid_lowbit"], results["EfficientNet-Lite0"]["fid_ort"]
            L.append(f"| for reference: top-1, this CPU's ORT kernels | {fl['kernels']['top1_agreement']:.4f} | {fo['kernels']['top1_agreement']:.4f} |")
            L.append(f"| for reference: top-1, float simulation | {fl['simulate']['top1_agreement']:.4f} | {fo['simulate']['top1_agreement']:.4f} |")
        L.append("")

    L.append(f"### Latency, batch 1 (interleaved, {cfg['runs']} runs after {cfg['warmup']} warm-up, medians in ms)\n")
    L.append("Ratios are medians of per-round ratios (`paired_ratio`); < 1 means lowbit is faster.\n")
    L.append("| model | threads | float | lowbit | ORT | lowbit/float | lowbit/ORT | ORT/float |")
    L.append("|---|---|---|---|---|---|---|---|")
    for label, r in results.items():
        for th, lat in r["latency"].items():
            m = lat["median_ms"]
            L.append(f"| {label} | {th} | {m['float']:.2f} | {m['lowbit']:.2f} | {m['ort']:.2f} | "
                     f"{lat['lowbit/float']:.3f} | {lat['lowbit/ort']:.3f} | {lat['ort/float']:.3f} |")
    L.append("")

    lr = results.get("EfficientNet-Lite0", {}).get("litert")
    if lr:
        L += litert_markdown(lr, cfg, cfg["n_eval"])
        L.append("")

    L.append("### File size and quantization cost\n")
    L.append("Each quantizer ran in a fresh subprocess. Wall time is the quantize call (ORT: `quant_pre_process` + "
             "`quantize_static`, pre-processing share in brackets). Peak RSS is the subprocess's VmHWM (peak since exec; "
             "`ru_maxrss` is not used: Linux carries it over from the parent across fork+exec); 'after imports' is its RSS just before quantizing.\n")
    L.append("| model | quantizer | file KiB | size / float | wall s | peak RSS MiB | RSS after imports MiB |")
    L.append("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        s = r["sizes"]
        L.append(f"| {label} | float | {s['float'] / 1024:.0f} | 1.000 | | | |")
        ql, qo = r["quant_lowbit"], r["quant_ort"]
        L.append(f"| {label} | lowbit | {s['lowbit'] / 1024:.0f} | {s['lowbit'] / s['float']:.3f} | {ql['wall_s']:.1f} | "
                 f"{_mib(ql['rss_peak_kib'])} | {_mib(ql['rss_base_kib'])} |")
        L.append(f"| {label} | ORT | {s['ort'] / 1024:.0f} | {s['ort'] / s['float']:.3f} | {qo['wall_s']:.1f} "
                 f"({qo['pre_process_s']:.1f}) | {_mib(qo['rss_peak_kib'])} | {_mib(qo['rss_base_kib'])} |")
    L.append("")

    L.append("### Calibration peak memory vs number of samples (EfficientNet-Lite0)\n")
    L.append("Fresh subprocess per row; samples are photo crops generated on the fly in chunks of 8 "
             "(lowbit: a generator passed as `calib`, batch size 8 from the recipe; ORT: a CalibrationDataReader "
             "yielding one sample at a time), so the input data is never all in RAM. ORT quantizes the "
             "`quant_pre_process`ed model, without pre-processing time in its row.\n")
    L.append("| quantizer | samples | peak RSS MiB | above after-imports RSS MiB | wall s |")
    L.append("|---|---|---|---|---|")
    for qn in ("lowbit", "ort"):
        for n, m in mem[qn].items():
            L.append(f"| {'lowbit' if qn == 'lowbit' else 'ORT'} | {m['samples']} | {_mib(m['rss_peak_kib'])} | "
                     f"{_mib(m['rss_peak_kib'] - m['rss_base_kib'])} | {m['wall_s']:.1f} |")
    for qn in ("lowbit", "ort"):
        ns = sorted(mem[qn])
        name = "lowbit" if qn == "lowbit" else "ORT"
        big = mem[qn][ns[-1]]
        for n in ns[:-1]:
            a = mem[qn][n]
            L.append(f"\n{name}: peak RSS with {ns[-1]} samples / with {n} = "
                     f"**{big['rss_peak_kib'] / a['rss_peak_kib']:.3f}** (above after-imports RSS: "
                     f"{(big['rss_peak_kib'] - big['rss_base_kib']) / max(1, a['rss_peak_kib'] - a['rss_base_kib']):.3f})")
    L.append("")
    body = "\n".join(L)

    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        new = old[: old.index(BEGIN) + len(BEGIN)] + "\n" + body + "\n" + old[old.index(END):]
    else:
        new = f"# lowbit vs onnxruntime quantize_static\n\n{BEGIN}\n{body}\n{END}\n"
    path.write_text(new)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
