"""Calibration throughput with Ray workers vs one process, EfficientNet-Lite0, and the bytes compared.

Each run is a fresh process timing `lowbit.quantize` only (the model export and the crops are made before). With
workers, the time includes starting and stopping a local Ray instance, as a user's run would; "calibrate" is the
pipeline's calibration stage alone. The quantized model's sha256 must be the same for every worker count.

Usage (from the repository root):
    PYTHONPATH=src:examples .venv/bin/python bench/shard.py [--n 512] [--workers 1 2] [--reps 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def worker(work: Path, workers: int, n: int) -> dict:
    import lowbit
    from lowbit import quantize

    recipe = lowbit.Recipe(calibration_samples=n)
    t0 = time.perf_counter()
    res = quantize(
        str(work / "effnet_lite0.onnx"), calib=str(work / "calib.npy"), recipe=recipe, progress=False, workers=workers
    )
    return {
        "workers": workers,
        "wall_s": time.perf_counter() - t0,
        "calibrate_s": res.timings["calibrate"],
        "model_sha256": hashlib.sha256(res.model.SerializeToString()).hexdigest(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="calibration crops")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workdir", default="/tmp/lowbit_shard")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir)
    if args.worker:
        print(json.dumps(worker(work, args.worker, args.n)))
        return
    from lowbit_zoo import zoo

    work.mkdir(parents=True, exist_ok=True)
    zoo.efficientnet_lite0_onnx(work / "effnet_lite0.onnx")
    np.save(work / "calib.npy", zoo.photo_crops(args.n, "calib", 0))
    runs = []
    for rep in range(args.reps):
        for w in args.workers:
            cmd = [sys.executable, __file__, "--worker", str(w), "--n", str(args.n), "--workdir", str(work)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            runs.append(r)
            print(
                f"rep {rep + 1} workers {w}: wall {r['wall_s']:.1f} s, calibrate {r['calibrate_s']:.1f} s, "
                f"model sha256 {r['model_sha256'][:16]}",
                flush=True,
            )
    print(f"same bytes for every worker count: {len({r['model_sha256'] for r in runs}) == 1}")


if __name__ == "__main__":
    main()
