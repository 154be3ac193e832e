"""The LiteRT part of bench/run.py: EfficientNet-Lite0 as .tflite in LiteRT (XNNPACK) vs the same models in ONNX
Runtime, agreement and interleaved latency, and its table inside bench/RESULTS.md (between the litert markers)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

LITE_BEGIN, LITE_END = "<!-- litert:begin -->", "<!-- litert:end -->"


def litert_block(
    float_path: Path, qpath: Path, work: Path, evalx, lowbit_fid: dict, runs: int, warmup: int, log
) -> dict:
    """Export float and lowbit-int8 EfficientNet-Lite0 to .tflite, compare outputs with the ONNX models on the
    eval crops, and time all four interleaved (LiteRT with XNNPACK vs ONNX Runtime) at 1 and 2 threads."""
    import numpy as np

    from lowbit.evaluate.bench import bound_session
    from lowbit.evaluate.latency import interleaved_latency, paired_ratio
    from lowbit.evaluate.metrics import fidelity
    from lowbit.export.tflite import export_tflite
    from lowbit.runtimes.litert import LiteRTSession
    from lowbit.runtimes.ort import run_all, session

    ft, qt = work / f"{float_path.stem}.float.tflite", work / f"{float_path.stem}.lowbit.tflite"
    t = time.perf_counter()
    export_tflite(float_path, ft)
    export_s = {"float": time.perf_counter() - t}
    t = time.perf_counter()
    res = export_tflite(qpath, qt)
    export_s["int8"] = time.perf_counter() - t
    bs = 32
    batches = [{"input": evalx[i : i + bs]} for i in range(0, len(evalx), bs)]
    ref = run_all(session(str(float_path), "kernels"), batches)[0]
    q_onnx = run_all(session(str(qpath), "kernels"), batches)[0]
    lite = {}
    for k, pth in (("float", ft), ("int8", qt)):
        sess = LiteRTSession(pth, threads=1)
        lite[k] = (np.concatenate([sess.run(None, b)[0] for b in batches]), sess.delegate_partitions())
    f_out, i_out = lite["float"][0], lite["int8"][0]
    # LiteRT's own int8 kernels (no XNNPACK) round requantization differently from XNNPACK and ORT
    builtin = LiteRTSession(qt, threads=1, xnnpack=False)
    b_out = np.concatenate([builtin.run(None, b)[0] for b in batches])
    out = {
        "sizes": {"float": ft.stat().st_size, "int8": qt.stat().st_size},
        "export_s": export_s,
        "int8_ops": res.ops,
        "int8_float_nodes": res.float_nodes,
        "delegate_partitions": {"float": lite["float"][1], "int8": lite["int8"][1]},
        "float_vs_onnx": {
            **fidelity(ref, f_out),
            "max_rel_error": float(np.max(np.abs(f_out - ref)) / np.max(np.abs(ref))),
        },
        "int8_vs_float": fidelity(ref, i_out),
        "int8_vs_onnx_int8": fidelity(q_onnx, i_out),
        "builtin_int8_vs_onnx_int8": fidelity(q_onnx, b_out),
        "builtin_int8_vs_xnnpack_int8": fidelity(i_out, b_out),
        "builtin_int8_vs_float": fidelity(ref, b_out),
        "onnx_int8_vs_float": lowbit_fid,
        "latency": {},
    }
    log("LiteRT fidelity", {k: out[k] for k in ("float_vs_onnx", "int8_vs_float", "int8_vs_onnx_int8")})
    paths = {"ort_float": float_path, "ort_int8": qpath, "litert_float": ft, "litert_int8": qt}
    feeds = {"input": evalx[:1]}
    for th in (1, 2):
        times: dict = {k: [] for k in paths}
        for order in (list(paths), list(reversed(paths))):  # creation order cancels out, as in latency_block
            sessions = {k: bound_session(str(paths[k]), feeds, th) for k in order}
            half = interleaved_latency(sessions, {}, runs=runs // 2, warmup=warmup)
            for k, v in half.items():
                times[k].extend(v)
            del sessions
        out["latency"][th] = {
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "litert/ort float": paired_ratio(times, "litert_float", "ort_float"),
            "litert/ort int8": paired_ratio(times, "litert_int8", "ort_int8"),
            "litert int8/float": paired_ratio(times, "litert_int8", "litert_float"),
            "ort int8/float": paired_ratio(times, "ort_int8", "ort_float"),
        }
        log(f"LiteRT vs ORT latency {th} thread(s)", out["latency"][th])
    return out


def litert_markdown(lr: dict, cfg: dict, n_eval: int) -> list[str]:
    import importlib.metadata

    L = [LITE_BEGIN, "### EfficientNet-Lite0 in LiteRT (.tflite) vs ONNX Runtime\n"]
    L.append(
        f"`lowbit export --to tflite` of the float model and of lowbit's int8 model (float input/output, "
        f"int8 inside), run in LiteRT {importlib.metadata.version('ai-edge-litert')} (CPU interpreter; XNNPACK "
        f"delegate partitions: float {lr['delegate_partitions']['float']}, int8 "
        f"{lr['delegate_partitions']['int8']}) through `lowbit.runtimes.litert`, on the {n_eval} eval crops "
        "(batch 32, NCHW crops transposed to NHWC by the adapter).\n"
    )
    fo, iv, io, ov = lr["float_vs_onnx"], lr["int8_vs_float"], lr["int8_vs_onnx_int8"], lr["onnx_int8_vs_float"]
    L.append("| comparison | top-1 agreement | cosine | SQNR dB | max abs error |")
    L.append("|---|---|---|---|---|")
    L.append(
        f"| float .tflite vs float ONNX (max rel. error {fo['max_rel_error']:.1e}) | {fo['top1_agreement']:.4f} | "
        f"{fo['cosine']:.6f} | {fo['sqnr_db']:.1f} | {fo['max_abs_error']:.2e} |"
    )
    L.append(
        f"| int8 .tflite vs lowbit's int8 ONNX (ORT kernels) | {io['top1_agreement']:.4f} | {io['cosine']:.5f} | "
        f"{io['sqnr_db']:.1f} | {io['max_abs_error']:.3f} |"
    )
    L.append(
        f"| int8 .tflite vs float ONNX | {iv['top1_agreement']:.4f} | {iv['cosine']:.4f} | {iv['sqnr_db']:.1f} | "
        f"{iv['max_abs_error']:.3f} |"
    )
    L.append(
        f"| lowbit's int8 ONNX (ORT kernels) vs float ONNX | {ov['top1_agreement']:.4f} | {ov['cosine']:.4f} | "
        f"{ov['sqnr_db']:.1f} | {ov['max_abs_error']:.3f} |"
    )
    for label, key in (
        ("lowbit's int8 ONNX (ORT kernels)", "builtin_int8_vs_onnx_int8"),
        ("int8 .tflite with XNNPACK", "builtin_int8_vs_xnnpack_int8"),
        ("float ONNX", "builtin_int8_vs_float"),
    ):
        b = lr[key]
        L.append(
            f"| int8 .tflite, LiteRT built-in kernels (no XNNPACK) vs {label} | {b['top1_agreement']:.4f} | "
            f"{b['cosine']:.5f} | {b['sqnr_db']:.1f} | {b['max_abs_error']:.3f} |"
        )
    L.append("")
    s = lr["sizes"]
    L.append(
        f"File sizes: float .tflite {s['float'] / 1024:.0f} KiB, int8 .tflite {s['int8'] / 1024:.0f} KiB. "
        f"Export took {lr['export_s']['float']:.1f} s (float) and {lr['export_s']['int8']:.1f} s (int8).\n"
    )
    L.append(
        f"Latency, batch 1: the four models interleaved in one loop ({cfg['runs']} runs after {cfg['warmup']} "
        "warm-up, sessions created in both orders), medians in ms; ratios are medians of per-round ratios. "
        "LiteRT is timed on inputs already in its NHWC layout (no transpose in the loop).\n"
    )
    L.append(
        "| threads | ORT float | LiteRT float | ORT int8 | LiteRT int8 | LiteRT/ORT float | LiteRT/ORT int8 | "
        "LiteRT int8/float | ORT int8/float |"
    )
    L.append("|---|---|---|---|---|---|---|---|---|")
    for th, lat in lr["latency"].items():
        m = lat["median_ms"]
        L.append(
            f"| {th} | {m['ort_float']:.2f} | {m['litert_float']:.2f} | {m['ort_int8']:.2f} | "
            f"{m['litert_int8']:.2f} | {lat['litert/ort float']:.3f} | {lat['litert/ort int8']:.3f} | "
            f"{lat['litert int8/float']:.3f} | {lat['ort int8/float']:.3f} |"
        )
    L.append(LITE_END)
    return L


def write_litert(path: Path, section: list[str], begin: str, end: str) -> None:
    """Replace the LiteRT table inside the results (or add it before `end`, the results section's closing marker),
    leaving the rest as it is."""
    old = path.read_text() if path.exists() else f"{begin}\n{end}\n"
    body = "\n".join(section)
    if LITE_BEGIN in old and LITE_END in old:
        new = old[: old.index(LITE_BEGIN)] + body + old[old.index(LITE_END) + len(LITE_END) :]
    elif end in old:
        new = old[: old.index(end)] + body + "\n" + old[old.index(end) :]
    else:
        new = old + f"\n{begin}\n{body}\n{end}\n"
    path.write_text(new)
