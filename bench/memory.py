"""Quantization cost for bench/run.py: wall time and memory of one quantizer run (lowbit or ONNX Runtime's
quantize_static), in a fresh worker process so that its peak RSS is its own.

Imports stay inside the functions: the RSS after imports is measured just before quantizing.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

from prep import crop_chunks


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def rss_now_kib() -> int:
    return _status_kib("VmRSS")


def peak_rss_kib() -> int:
    """This process's peak RSS since exec (VmHWM). Not getrusage's ru_maxrss: Linux carries that across
    fork+exec, so a child would report at least the parent's RSS at the time it was spawned."""
    return _status_kib("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def quantize(job: dict) -> dict:
    """Quantize job["model"] to job["out"] with job["kind"] ("lowbit" or "ort") on job["n"] calibration samples,
    from job["calib_npy"] or photo crops generated on the fly; wall time, RSS after imports, peak RSS."""
    import numpy as np

    kind = job["kind"]
    if kind == "lowbit":
        import lowbit

        base = rss_now_kib()
        if job.get("calib_npy"):
            calib = job["calib_npy"]  # lowbit memory-maps .npy files and reads them batch by batch
        else:
            calib = crop_chunks(job["n"], "calib", job.get("seed", 0), chunk=8)
        recipe = lowbit.Recipe(calibration_samples=job["n"])
        t = time.perf_counter()
        res = lowbit.quantize(job["model"], job["out"], calib=calib, recipe=recipe, progress=False)
        wall = time.perf_counter() - t
        extra = {"timings": res.timings, "samples": res.plan.calibration_samples}
    elif kind == "ort":
        import onnxruntime.quantization as oq
        from onnxruntime.quantization.shape_inference import quant_pre_process

        base = rss_now_kib()
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
            items = (
                c[i : i + 1] for c in crop_chunks(job["n"], "calib", job.get("seed", 0), chunk=8) for i in range(len(c))
            )
        count = {"n": 0}

        class Reader(oq.CalibrationDataReader):
            def get_next(self):
                x = next(items, None)
                if x is None:
                    return None
                count["n"] += 1
                return {"input": x}

        oq.quantize_static(
            src,
            job["out"],
            Reader(),
            quant_format=oq.QuantFormat.QDQ,
            activation_type=oq.QuantType.QUInt8,
            weight_type=oq.QuantType.QInt8,
            per_channel=True,
            reduce_range=False,
            calibrate_method=oq.CalibrationMethod.MinMax,
        )
        wall = time.perf_counter() - t
        extra = {"pre_process_s": pre_s, "samples": count["n"]}
    else:
        raise ValueError(kind)
    peak = peak_rss_kib()
    return {"wall_s": wall, "rss_base_kib": base, "rss_peak_kib": peak, **extra}
