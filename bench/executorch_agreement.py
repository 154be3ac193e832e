"""Top-1 agreement and cosine of `.pte` programs in bench/executorch_runtimes.py's workdir against the float and
lowbit int8 EfficientNet-Lite0 ONNX models, on the same 200 held-out crops (`--crops N`: the first N held-out
crops instead; no latency: quick to re-run), and each
crop on which a `.pte` and the int8 ONNX model disagree, with both models' top-2 margins (a near-tie flips on
the smallest difference in arithmetic; a wide margin means the two compute different numbers).

Usage: PYTHONPATH=src:examples python bench/executorch_agreement.py [--crops N] WORKDIR NAME.pte [NAME.pte ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def margin(logits: np.ndarray) -> float:
    top = np.sort(logits)[-2:]
    return float(top[1] - top[0])


def main(argv: list[str]) -> int:
    from lowbit.evaluate.metrics import fidelity, top1_agreement
    from lowbit.runtimes.executorch import ExecutorchSession
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import photo_crops

    n = 200
    if argv[:1] == ["--crops"]:
        n, argv = int(argv[1]), argv[2:]
    work = Path(argv[0])
    crops = photo_crops(n, "eval")
    batches = [{"input": crops[i : i + 25]} for i in range(0, n, 25)]
    print(f"{n} held-out crops")
    f = run_all(session(str(work / "effnet.onnx")), batches)[0]
    q = run_all(session(str(work / "effnet.int8.onnx")), batches)[0]
    print(f"int8 ONNX: vs float {top1_agreement(f, q):.3f}, cosine {fidelity(f, q)['cosine']:.4f}")
    for name in argv[1:]:
        o = ExecutorchSession(work / name).run(None, {"input": crops})[0]
        print(
            f"{name}: vs int8 ONNX {top1_agreement(q, o):.3f}, vs float {top1_agreement(f, o):.3f}, "
            f"cosine vs float {fidelity(f, o)['cosine']:.4f}, max |pte - int8 ONNX| {np.abs(o - q).max():.2e} "
            f"(logits up to {np.abs(q).max():.1f}; float vs int8 ONNX {np.abs(f - q).max():.2f})"
        )
        for i in np.flatnonzero(q.argmax(1) != o.argmax(1)):
            print(
                f"  crop {i}: ONNX top-1 {q[i].argmax()} margin {margin(q[i]):.4f}, .pte top-1 {o[i].argmax()} "
                f"margin {margin(o[i]):.4f}, max |difference| {np.abs(o[i] - q[i]).max():.4f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
