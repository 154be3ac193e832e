"""Top-1 agreement and cosine of `.pte` programs in bench/executorch_runtimes.py's workdir against the float and
lowbit int8 EfficientNet-Lite0 ONNX models, on the same 200 held-out crops (no latency: quick to re-run).

Usage: PYTHONPATH=src:examples python bench/executorch_agreement.py WORKDIR NAME.pte [NAME.pte ...]
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    from lowbit.evaluate.metrics import fidelity, top1_agreement
    from lowbit.runtimes.executorch import ExecutorchSession
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import photo_crops

    work = Path(argv[0])
    crops = photo_crops(200, "eval")
    batches = [{"input": crops[i : i + 25]} for i in range(0, 200, 25)]
    f = run_all(session(str(work / "effnet.onnx")), batches)[0]
    q = run_all(session(str(work / "effnet.int8.onnx")), batches)[0]
    print(f"int8 ONNX: vs float {top1_agreement(f, q):.3f}, cosine {fidelity(f, q)['cosine']:.4f}")
    for name in argv[1:]:
        o = ExecutorchSession(work / name).run(None, {"input": crops})[0]
        print(
            f"{name}: vs int8 ONNX {top1_agreement(q, o):.3f}, vs float {top1_agreement(f, o):.3f}, "
            f"cosine vs float {fidelity(f, o)['cosine']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
