"""Every calibration method on EfficientNet-Lite0: top-1 agreement with float and output cosine on 256 held-out
photo crops (ONNX Runtime's integer kernels and the float simulation of the same QDQ model), and the time each
quantization took (calibration, decide: the layer_error methods' measurement runs in decide), and its CPU seconds
(`time.process_time`, this process: all threads). `layer_error_fast` is the default.

Calibration: 64 crops (`photo_crops(64, "calib")`), as bench/run.py; evaluation: `photo_crops(256, "eval")`.

Usage: PYTHONPATH=src:examples python bench/calibration_methods.py [--methods minmax layer_error ...] [--empirical-bias]
`--empirical-bias` adds, after each method's row, the same method with `empirical_bias_correction` (its own seconds in
the last column).
Prints a Markdown table (paste it into bench/RESULTS_CORPUS.md's dated section).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

METHODS = ["layer_error_fast", "minmax", "percentile", "entropy", "mse", "layer_error"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--empirical-bias", action="store_true", help="also each method with empirical bias correction")
    ap.add_argument("--model", default=str(Path(__file__).resolve().parents[1] / "artifacts/efficientnet_lite0.onnx"))
    args = ap.parse_args()

    import lowbit
    from lowbit.evaluate.metrics import fidelity
    from lowbit.recipe import Recipe, Scheme
    from lowbit.runtimes.ort import cpu_has_vnni, run_all, session
    from lowbit_zoo.zoo import photo_crops

    calib, held = photo_crops(64, "calib"), photo_crops(256, "eval")
    batches = [{"input": held[i : i + 32]} for i in range(0, len(held), 32)]
    ref = run_all(session(args.model, "kernels"), batches)[0]
    print(f"EfficientNet-Lite0, 64 calibration crops, 256 eval crops; VNNI: {cpu_has_vnni()}\n")
    print(
        "| method | top-1 kernels | top-1 simulation | cosine kernels | SQNR dB | quantize s | CPU s | calibrate s "
        "| decide s | bias correction s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    runs = [(m, e) for m in args.methods for e in ([False, True] if args.empirical_bias else [False])]
    for method, empirical in runs:
        recipe = Recipe(default=Scheme(calibration=method), empirical_bias_correction=empirical)
        t, cpu = time.perf_counter(), time.process_time()
        result = lowbit.quantize(args.model, calib=calib, recipe=recipe, progress=False)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        kern = fidelity(ref, run_all(session(result.model, "kernels"), batches)[0])
        sim = fidelity(ref, run_all(session(result.model, "simulate"), batches)[0])
        label = method + (" + empirical bias" if empirical else "")
        print(
            f"| {label} | {kern['top1_agreement']:.1%} | {sim['top1_agreement']:.1%} | {kern['cosine']:.4f} | "
            f"{kern['sqnr_db']:.1f} | {seconds:.0f} | {cpu:.1f} | {result.timings['calibrate']:.0f} | "
            f"{result.timings['decide']:.0f} | {result.timings.get('bias_correction', 0.0):.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
