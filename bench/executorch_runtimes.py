"""EfficientNet-Lite0 on every phone runtime lowbit writes for: ONNX Runtime (.onnx), ORT format (.ort), LiteRT
(.tflite) and ExecuTorch (.pte, XNNPACK), side by side: top-1 agreement, cosine, size, latency ratio vs the same
runtime's float model, export time. ExecuTorch twice: `lowbit.export_executorch` (the numbers of lowbit's default
int8 ONNX model of the module, in PT2E) and ExecuTorch's own XNNPACKQuantizer flow (HistogramObserver
activations, per-channel weights), on the same module and the same 128 calibration crops; both evaluated on 200
held-out crops.

Usage: PYTHONPATH=src:examples python bench/executorch_runtimes.py [--workdir DIR] [--runs N] [--out FILE.md]
Exports are cached in the workdir (delete it to re-measure export times); an export time measured by an earlier
run in the workdir is marked with * in the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

CALIB, EVAL = 128, 200


def default_flow(module, example, calib, out: Path) -> None:
    """ExecuTorch's documented PT2E flow with its XNNPACKQuantizer defaults (per-channel symmetric weights)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        captured = torch.export.export(module, example, strict=False).module()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(captured, quantizer)
        for i in range(len(calib)):
            prepared(torch.from_numpy(calib[i : i + 1]))
        converted = convert_pt2e(prepared)
        ep = torch.export.export(converted, example, strict=False)
        data = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    out.write_bytes(bytes(data))


FRESH: set[str] = set()  # the exports timed by this run


def timed(done: dict, key: str, path: Path, make, *args) -> None:
    """`make(*args)` writes `path` (skipped when it exists); its wall time goes in done[key]."""
    if not path.exists():
        t = time.perf_counter()
        make(*args)
        done[key] = time.perf_counter() - t
        FRESH.add(key)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/tmp/lowbit-bench-executorch")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--out", default="bench/RESULTS_EXECUTORCH.md")
    args = ap.parse_args()
    import numpy as np
    import torch

    import lowbit
    from lowbit.evaluate.bench import bound_session
    from lowbit.evaluate.latency import interleaved_latency, paired_ratio
    from lowbit.evaluate.metrics import fidelity, top1_agreement
    from lowbit.runtimes.executorch import ExecutorchSession
    from lowbit.runtimes.litert import LiteRTSession
    from lowbit.runtimes.ort import run_all, session
    from lowbit_zoo.zoo import _efficientnet_lite0_torch, efficientnet_lite0_onnx, photo_crops

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    times_path = work / "export_seconds.json"
    export_s: dict = json.loads(times_path.read_text()) if times_path.exists() else {}
    calib, crops = photo_crops(CALIB, "calib"), photo_crops(EVAL, "eval")
    module, example = _efficientnet_lite0_torch(), (torch.zeros(1, 3, 224, 224),)
    f = work / "effnet.onnx"
    q = work / "effnet.int8.onnx"
    files = {
        "ORT float": f,
        "ORT lowbit int8": q,
        "ORT format float": work / "effnet.ort",
        "ORT format lowbit int8": work / "effnet.int8.ort",
        "LiteRT float": work / "effnet.tflite",
        "LiteRT lowbit int8": work / "effnet.int8.tflite",
        "ExecuTorch float": work / "effnet.pte",
        "ExecuTorch lowbit int8": work / "effnet.lowbit.pte",
        "ExecuTorch XNNPACKQuantizer int8": work / "effnet.default.pte",
    }
    names = {"input_names": ["input"], "output_names": ["logits"]}
    timed(export_s, "ORT float", f, efficientnet_lite0_onnx, f)
    timed(export_s, "ORT lowbit int8", q, lambda: lowbit.quantize(f, q, calib=calib, progress=False))
    for src, key in ((f, "ORT format float"), (q, "ORT format lowbit int8")):
        timed(export_s, key, files[key], lowbit.export_ort, src, files[key])
    for src, key in ((f, "LiteRT float"), (q, "LiteRT lowbit int8")):
        timed(export_s, key, files[key], lowbit.export_tflite, src, files[key])
    et = lowbit.export_executorch
    timed(
        export_s,
        "ExecuTorch float",
        files["ExecuTorch float"],
        lambda p: et(module, example, p, **names),
        files["ExecuTorch float"],
    )
    times_path.write_text(json.dumps(export_s, indent=1))
    key = "ExecuTorch lowbit int8"
    timed(export_s, key, files[key], lambda p: et(module, example, p, calib=calib, **names), files[key])
    times_path.write_text(json.dumps(export_s, indent=1))
    key = "ExecuTorch XNNPACKQuantizer int8"
    timed(export_s, key, files[key], default_flow, module, example, calib, files[key])
    times_path.write_text(json.dumps(export_s, indent=1))

    batches = [{"input": crops[i : i + 25]} for i in range(0, EVAL, 25)]
    outs = {}
    for key, path in files.items():
        if path.suffix == ".tflite":
            sess = LiteRTSession(path, threads=1)
            outs[key] = np.concatenate([sess.run(None, b)[0] for b in batches])
        elif path.suffix == ".pte":
            outs[key] = ExecutorchSession(path).run(None, {"input": crops})[0]
        else:
            outs[key] = run_all(session(str(path)), batches)[0]
    ref, lb = outs["ORT float"], outs["ORT lowbit int8"]
    feeds = {"input": crops[:1]}
    sessions = {k: bound_session(str(p), feeds, 1) for k, p in files.items()}
    lat = interleaved_latency(sessions, feeds, runs=args.runs, warmup=5)
    float_of = {k: next(f for f in files if f.startswith(k.rsplit(" ", 2)[0]) and f.endswith("float")) for k in files}
    float_of.update({"ExecuTorch XNNPACKQuantizer int8": "ExecuTorch float"})
    rows = []
    for key, path in files.items():
        fid = fidelity(ref, outs[key])
        rows.append(
            f"| {key} | {path.name} | {100 * top1_agreement(ref, outs[key]):.1f}% | "
            f"{100 * top1_agreement(lb, outs[key]):.1f}% | {fid['cosine']:.4f} | {path.stat().st_size / 1e6:.2f} MB | "
            f"{1e3 * float(np.median(lat[key])):.2f} ms | {paired_ratio(lat, key, float_of[key]):.2f}x | "
            + (f"{export_s[key]:.0f} s{'' if key in FRESH else '*'} |" if key in export_s else "(cached) |")
        )
    head = [
        "## EfficientNet-Lite0 on four runtimes: ORT, ORT format, LiteRT, ExecuTorch",
        "",
        f"Command: `PYTHONPATH=src:examples python bench/executorch_runtimes.py --runs {args.runs}` "
        f"({platform.machine()}, "
        f"1 thread, batch 1, {CALIB} calibration crops, {EVAL} held-out eval crops; machine shared with other jobs).",
        "",
        "| runtime / model | file | top-1 vs float ONNX | top-1 vs lowbit int8 ONNX | cosine vs float | size "
        "| p50 latency | ratio vs the runtime's float | export time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    Path(args.out).write_text("\n".join(head + rows) + "\n")
    print("\n".join(head + rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
