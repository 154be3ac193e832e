"""The LiteRT table: every corpus model, EfficientNet-Lite0 and MiniLM (fixed length) as lowbit's int8 .tflite.

For each model: lowbit's default static int8 ONNX (`lowbit.quantize`, calibrated on the entry's calib samples),
then `lowbit.export_tflite` of the float model (float32) and of the int8 model (the default: full-integer, float
I/O at the edges), input sizes fixed to the eval samples'. On the held-out samples, in LiteRT with XNNPACK at 1
thread: the entry's task metric and the lowest cosine over float outputs of the int8 .tflite against lowbit's int8
ONNX (ONNX Runtime's integer kernels) and against the float ONNX model; the int8 ONNX against float for
reference; the float .tflite against the float ONNX (the exporter alone). Sizes of both .tflite files, and the
int8 / float .tflite latency (1 thread, interleaved pairs alternating in order, median of per-pair ratios). Each
int8 file is also run once through LiteRT's `get_signature_runner("serving_default")` and must give what
`invoke()` gives. A model that fails to export is a row with its one-line error; it is then exported with
`allow_float_fallback=True` so its numbers are still measured (said in the row).

Usage: PYTHONPATH=src:examples python bench/litert_corpus.py [--only NAME ...] [--out bench/RESULTS_LITERT.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from corpus import cpu_name, float_outputs, one_line, run, session  # noqa: E402
from lowbit_zoo.corpus.metrics import cosine  # noqa: E402
from lowbit_zoo.corpus.registry import ENTRIES, ROOT, Output  # noqa: E402

Feeds = list[dict[str, np.ndarray]]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
MINILM_LENGTH = 64  # fixed sequence length of the MiniLM .tflite (sentences padded to it)
LATENCY_BUDGET_S = 3.0
FLOAT_OUTPUTS = False  # --float-outputs: export with float_outputs=True (the classifier's last layer float)


@dataclass
class Job:
    name: str
    model: Path
    calib: Feeds
    eval: Feeds
    outputs: tuple[Output, ...]
    batch_axes: dict | None = None


def _classifier(name: str, model: Callable[[np.ndarray], Path]) -> Job:
    """An image classifier on photo crops: 64 to calibrate, 128 held out; `model` gets the calibration crops."""
    from lowbit_zoo.zoo import photo_crops

    calib, evl = photo_crops(64, "calib"), photo_crops(128, "eval")
    return Job(
        name,
        model(calib),
        [{"input": c[None]} for c in calib],
        [{"input": c[None]} for c in evl],
        (Output("logits", "class scores"),),
    )


def corpus_jobs(only: set[str]) -> list[Job | tuple[str, str]]:
    jobs: list[Job | tuple[str, str]] = []
    for e in ENTRIES:
        if only and e.name not in only:
            continue
        try:
            model = e.get(ROOT)
            jobs.append(Job(e.name, model, e.calib(model), e.eval(model), e.outputs, e.batch_axes))
        except Exception as err:  # a model that cannot be fetched/built is a row, not a crash
            jobs.append((e.name, one_line(err)))
    if not only or "efficientnet_lite0" in only:
        jobs.append(_classifier("efficientnet_lite0", lambda _: ARTIFACTS / "efficientnet_lite0.onnx"))
    if not only or "mobilenet_v2" in only:
        from models import mobilenet_v2_onnx

        # random weights with BatchNorm re-estimated on the calibration crops, as bench/RESULTS.md's row
        jobs.append(
            _classifier(
                "mobilenet_v2", lambda c: mobilenet_v2_onnx(ARTIFACTS / "bench" / "mobilenet_v2_bn64.onnx", c)[0]
            )
        )
    if not only or "minilm" in only:
        from lowbit_zoo.zoo import minilm_tokenize, text_sentences

        def feeds(split: str, n: int) -> Feeds:
            enc = minilm_tokenize(text_sentences(n, split), max_length=MINILM_LENGTH)  # type: ignore[arg-type]
            pad = MINILM_LENGTH - enc["input_ids"].shape[1]
            enc = {k: np.pad(v, ((0, 0), (0, pad))) for k, v in enc.items()}
            return [{k: v[i : i + 1] for k, v in enc.items()} for i in range(n)]

        jobs.append(
            Job(
                f"minilm_L{MINILM_LENGTH}",
                ARTIFACTS / "minilm" / "minilm.onnx",
                feeds("calib", 32),
                feeds("eval", 64),
                (Output("sentence_embedding", "embedding"),),
            )
        )
    return jobs


def shape_groups(feeds: Feeds) -> list[tuple[dict[str, tuple[int, ...]], list[int]]]:
    """The eval samples grouped by input sizes, largest group first: a .tflite has fixed sizes, so a model fed
    sequences of several lengths (a decoder's growing prefix) is exported once per group."""
    groups: dict[tuple, list[int]] = {}
    for i, feed in enumerate(feeds):
        # a scalar input (a VAD's sample rate) is part of the key: the export fixes it (`values`)
        key = tuple((k, v.shape) if v.ndim else (k, ("value", v.item())) for k, v in feed.items())
        groups.setdefault(key, []).append(i)
    ordered = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    return [({k: v for k, v in key if not (v and v[0] == "value")}, idx) for key, idx in ordered]


def run_litert(path: Path, feeds: Feeds, names: list[str], threads: int = 1) -> dict[str, list[np.ndarray]]:
    from lowbit.runtimes.litert import LiteRTSession

    sess = LiteRTSession(path, threads=threads)
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        for n, v in zip(names, sess.run(None, feed)):
            outs[n].append(v)
    return outs


def signature_matches(path: Path, feed: dict[str, np.ndarray]) -> bool:
    """`serving_default` through LiteRT's signature runner gives exactly what invoke() gives (raw tensors)."""
    from ai_edge_litert.interpreter import Interpreter

    from lowbit.runtimes.litert import LiteRTSession

    sess = LiteRTSession(path, threads=1)
    native = sess.prepare(feed)
    raw = sess.invoke(native)
    runner = Interpreter(model_path=str(path), num_threads=1).get_signature_runner("serving_default")
    names = [d["name"] for d in sess._inputs]
    got = runner(**dict(zip(names, native)))
    out_names = [d["name"] for d in sess._outputs]
    return sorted(got) == sorted(out_names) and all(np.array_equal(got[n], r) for n, r in zip(out_names, raw))


def aeq_accepts(float_path: Path, int8_path: Path, feed: dict[str, np.ndarray]) -> str:
    """ai-edge-quantizer's validator runs both files through their `serving_default` signature on one sample and
    compares the outputs by name: "yes", or its one-line error. (It refused files with no SignatureDef.)"""
    from ai_edge_quantizer import model_validator

    from lowbit.runtimes.litert import LiteRTSession

    sess = LiteRTSession(int8_path, threads=1)
    native = sess.prepare(feed)
    floats = [np.asarray(v, np.float32) if np.issubdtype(v.dtype, np.floating) else v for v in native]
    data = {"serving_default": [{d["name"]: v for d, v in zip(sess._inputs, floats)}]}
    try:
        result = model_validator.compare_model(
            float_path.read_bytes(), int8_path.read_bytes(), data, validate_output_tensors_only=True
        )
        outs = result.get_signature_comparison_result("serving_default").output_tensors
        names = [d["name"] for d in sess._outputs]
        return "yes" if sorted(outs) == sorted(names) else f"outputs {sorted(outs)} vs {sorted(names)}"
    except Exception as e:  # noqa: BLE001 - recorded in the row
        return one_line(e)


def latency(float_path: Path, int8_path: Path, feed: dict[str, np.ndarray]) -> dict:
    """int8 / float .tflite, 1 thread, interleaved pairs (order alternating), median of per-pair ratios."""
    from lowbit.runtimes.litert import LiteRTSession

    f, q = LiteRTSession(float_path, threads=1), LiteRTSession(int8_path, threads=1)
    nf, nq = f.prepare(feed), q.prepare(feed)
    for _ in range(3):
        f.invoke(nf), q.invoke(nq)
    ratios, tf, tq = [], [], []
    start = time.perf_counter()
    while len(ratios) < 60 and (len(ratios) < 6 or time.perf_counter() - start < LATENCY_BUDGET_S):
        pair = [(f, nf, tf), (q, nq, tq)]
        for s, x, acc in pair if len(ratios) % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            s.invoke(x)
            acc.append(time.perf_counter() - t0)
        ratios.append(tq[-1] / tf[-1])
    return {"ratio": statistics.median(ratios), "float_ms": 1e3 * statistics.median(tf),
            "int8_ms": 1e3 * statistics.median(tq), "pairs": len(ratios)}  # fmt: skip


def measure(job: Job, work: Path) -> dict:
    import lowbit
    from lowbit.errors import LowbitError
    from lowbit.export.tflite import export_tflite

    row: dict = {"name": job.name, "metric": job.outputs[0].metric_name, "samples": f"{len(job.calib)}/{len(job.eval)}"}
    primary = job.outputs[0]
    names = float_outputs(job.model)
    import onnx

    all_names = [o.name for o in onnx.load(str(job.model), load_external_data=False).graph.output]
    try:
        q = work / f"{job.name}.int8.onnx"
        lowbit.quantize(str(job.model), q, calib=job.calib, progress=False, batch_axes=job.batch_axes)
        groups = shape_groups(job.eval)
        row["shapes"] = len(groups)
        lite_f: dict[str, list] = {n: [None] * len(job.eval) for n in all_names}
        lite_q: dict[str, list] = {n: [None] * len(job.eval) for n in all_names}
        for k, (shapes, idx) in enumerate(groups):
            ft, qt = work / f"{job.name}.{k}.float.tflite", work / f"{job.name}.{k}.int8.tflite"
            # a scalar input every sample of the group gives the same value (a VAD's sample rate) is fixed to it
            values = {n: v for n, v in job.eval[idx[0]].items() if np.ndim(v) == 0
                      and all(np.array_equal(job.eval[i][n], v) for i in idx)}  # fmt: skip
            if values:
                row.setdefault("values", []).append({n: v.item() for n, v in values.items()})
            export_tflite(job.model, ft, shapes=shapes, values=values)
            try:
                res = export_tflite(q, qt, shapes=shapes, float_outputs=FLOAT_OUTPUTS, values=values)
            except LowbitError as e:
                row["export_error"] = str(e)
                res = export_tflite(q, qt, shapes=shapes, allow_float_fallback=True, float_outputs=FLOAT_OUTPUTS,
                                    values=values)  # fmt: skip
            feeds = [{n: v for n, v in job.eval[i].items() if n not in values} for i in idx]
            for path, outs in ((ft, lite_f), (qt, lite_q)):
                got = run_litert(path, feeds, all_names)
                for n in all_names:
                    for i, v in zip(idx, got[n]):
                        outs[n][i] = v
            if k == 0:  # the largest group's files: ops, sizes, signature, latency
                row["float_nodes"], row["fallbacks"], row["transposes"] = res.float_nodes, res.fallbacks, res.transposes
                row["ops"] = res.ops
                row["size"] = {"float": ft.stat().st_size, "int8": qt.stat().st_size}
                row["signature"] = signature_matches(qt, feeds[0])
                row["aeq"] = aeq_accepts(ft, qt, feeds[0])
                row["latency"] = latency(ft, qt, feeds[0])
                grids = output_grids(qt)
            ft.unlink(), qt.unlink()
        ref = run(session(str(job.model)), job.eval)
        q_onnx = run(session(str(q)), job.eval)
        p = primary.name
        row["vs_onnx_int8"] = {"task": primary.metric(q_onnx[p], lite_q[p]), "cos": min_cos(q_onnx, lite_q, names)}
        row["vs_float"] = {"task": primary.metric(ref[p], lite_q[p]), "cos": min_cos(ref, lite_q, names)}
        row["onnx_int8_vs_float"] = {"task": primary.metric(ref[p], q_onnx[p]), "cos": min_cos(ref, q_onnx, names)}
        row["float_tflite_vs_onnx"] = min_cos(ref, lite_f, names)
        if row["vs_onnx_int8"]["cos"] < 0.999:  # how far ONNX Runtime's kernels are from its own reference QDQ run
            reference = run(session(str(q), simulate=True), job.eval)
            row["ort_kernels_vs_reference"] = min_cos(q_onnx, reference, names)
            row["tflite_vs_reference"] = min_cos(reference, lite_q, names)
        if primary.kind == "class scores":
            row["ties"] = tied_flips(q_onnx[p], lite_q[p])
        if grids and not FLOAT_OUTPUTS:  # the int8 ONNX's float outputs rounded onto the .tflite's output grid
            g = on_grid(q_onnx, grids)
            row["vs_onnx_int8_grid"] = {"task": primary.metric(g[p], lite_q[p]), "cos": min_cos(g, lite_q, names)}
    except Exception as e:  # recorded, never fatal: the table says which stage failed and why
        row["error"] = one_line(e)
        if "--trace" in sys.argv:
            import traceback

            traceback.print_exc()
    print(job.name, {k: v for k, v in row.items() if k not in ("ops",)}, flush=True)
    return row


def output_grids(path: Path) -> dict[str, tuple[float, int, int, int]]:
    """Output name -> (scale, zero point, min, max) of the int8 tensor a float output is dequantized from: the grid
    a full-integer file's logits live on (the int8 ONNX keeps its last layer float)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=1)
    details = {d["index"]: d for d in it.get_tensor_details()}
    outs = {d["index"]: d["name"] for d in it.get_output_details()}
    grids = {}
    for op in it._get_ops_details():
        if op["op_name"] == "DEQUANTIZE" and op["outputs"][0] in outs:
            d = details[op["inputs"][0]]
            if d["dtype"] in (np.int8, np.uint8) and len(d["quantization_parameters"]["scales"]) == 1:
                info = np.iinfo(d["dtype"])
                grids[outs[op["outputs"][0]]] = (*d["quantization"], int(info.min), int(info.max))
    return grids


def on_grid(outs: dict, grids: dict) -> dict:
    """Each output that has a grid, rounded onto it (as an int8 last layer would give it); the rest as they are."""
    res = {}
    for n, vs in outs.items():
        if n not in grids:
            res[n] = vs
            continue
        s, z, lo, hi = grids[n]
        step = np.float32(s)
        res[n] = [((np.clip(np.rint(v / step) + z, lo, hi) - z) * step).astype(np.float32) for v in vs]
    return res


def tied_flips(onnx_int8: list[np.ndarray], lite: list[np.ndarray]) -> tuple[int, int, int]:
    """(top-1 flips vs the int8 ONNX, of them those where the .tflite's int8 output ties the ONNX answer with its
    own: a full-integer output holds logits on a 1/255-of-range grid, the int8 ONNX keeps its last layer float;
    rows compared). A tie-aware agreement counts a tied flip as agreeing: the .tflite's output cannot tell those
    classes apart, and argmax picks the lower index."""
    flips = ties = rows = 0
    for a, b in zip(onnx_int8, lite):
        for ra, rb in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])):
            rows += 1
            if ra.argmax() != rb.argmax():
                flips += 1
                ties += int(rb[ra.argmax()] == rb.max())
    return flips, ties, rows


def min_cos(ref: dict, got: dict, names: list[str]) -> float:
    return min(cosine(ref[n], got[n]) for n in names)


def verdict(row: dict) -> str:
    if "error" in row:
        return row["error"]
    notes = []
    if "export_error" in row:
        notes.append(f"export without fallback fails: {row['export_error'].split('; pass')[0]}; measured with it")
    if row.get("values"):
        given = "; ".join(", ".join(f"--value {n}={v}" for n, v in vals.items()) for vals in row["values"])
        notes.append(f"exported once per scalar input value ({given}): an If on it keeps the branch it takes")
    if row.get("shapes", 1) > max(1, len(row.get("values", []))):
        notes.append(f"exported once per input size ({row['shapes']} sizes among the eval samples)")
    if row["float_nodes"]:
        first = ", ".join(n.split(" (")[0] for n in row["float_nodes"][:3])
        more = f" and {len(row['float_nodes']) - 3} more" if len(row["float_nodes"]) > 3 else ""
        notes.append(f"left float by the quantizer: {first}{more}")
    if row.get("ties", (0, 0, 0))[0]:
        flips, ties, rows = row["ties"]
        notes.append(
            f"{flips} top-1 flips vs the int8 ONNX, {ties} of them exact ties in the int8 output "
            f"(tie-aware agreement {1 - (flips - ties) / rows:.4f})"
        )
    if "ort_kernels_vs_reference" in row:
        notes.append(
            f"ONNX Runtime's int8 kernels vs its reference QDQ run (no fusions): cos "
            f"{row['ort_kernels_vs_reference']:.4f}; the .tflite vs that reference: {row['tflite_vs_reference']:.4f}"
        )
    v = row["vs_onnx_int8"]
    if "vs_onnx_int8_grid" in row:
        v = row["vs_onnx_int8_grid"]
        notes.append(f"vs the int8 ONNX on the .tflite's int8 output grid: task {v['task']:.4f}, cos {v['cos']:.5f}")
    if v["task"] < 0.99 or v["cos"] < 0.999:
        notes.append("below 99% / 0.999 vs the int8 ONNX")
    if not row["signature"]:
        notes.append("signature runner differs")
    if row.get("aeq", "yes") != "yes":
        notes.append(f"ai-edge-quantizer: {row['aeq']}")
    return "; ".join(notes) or "ok"


def write(rows: list[dict], path: Path, argv: list[str], seconds: float, load: tuple[float, float]) -> None:
    import importlib.metadata

    import onnxruntime as ort

    import lowbit

    lines = [
        "# lowbit's int8 .tflite in LiteRT: the real-world corpus, EfficientNet-Lite0 and MiniLM",
        "",
        f"Command: `{shlex.join(['PYTHONPATH=src:examples', 'python', 'bench/litert_corpus.py', *argv])}`",
        f"CPU: {cpu_name()}; 1 thread; run took {seconds:.0f} s. Versions: lowbit {lowbit.__version__}, "
        f"ai-edge-litert {importlib.metadata.version('ai-edge-litert')} (XNNPACK), onnxruntime {ort.__version__}, "
        f"Python {platform.python_version()}. Load average (1 min) at start / end: {load[0]:.1f} / {load[1]:.1f} "
        f"on {os.cpu_count()} cores: latency ratios are paired, but a loaded machine still makes them noisy.",
        "",
        "Each model: lowbit's default static int8 ONNX, exported with `lowbit export --to tflite` defaults",
        "(full-integer: float input/output with one QUANTIZE/DEQUANTIZE at the edges, int8 inside, the classifier",
        "too, from the plan's output ranges), inputs fixed to the eval samples' sizes; run in LiteRT with XNNPACK at",
        "1 thread on the held-out samples. task = the entry's task metric (first output listed in the corpus",
        "registry: top-1 / top-class agreement, IoU of the thresholded map, CTC exact string, or cosine), cos = the",
        "lowest cosine over float outputs. *vs int8 ONNX*: the .tflite against lowbit's int8 ONNX in ONNX Runtime",
        "(integer kernels); *vs float*: the .tflite against the float ONNX model; *ONNX int8 vs float*: the",
        "quantizer's own result, for reference. *float .tflite*: `export_tflite` of the float model against the",
        "float ONNX (lowest cosine). size: int8 / float .tflite (MB). lat: int8 .tflite / float .tflite latency",
        "(median of interleaved per-pair ratios, < 1 is faster) and the int8 median ms. sig: LiteRT's",
        '`get_signature_runner("serving_default")` gives the same tensors as `invoke()` on the int8 file. aeq:',
        "ai-edge-quantizer 0.10's `model_validator.compare_model` runs the float and the int8 file by that signature",
        "(one sample) and reports every output (yes), or the note gives its error.",
        "Where the int8 file's output is int8 and the int8 ONNX keeps that layer float (a classifier's last Gemm),",
        "the notes also compare with the int8 ONNX's output rounded onto the file's int8 output grid (its scale and",
        "zero point; numpy's argmax takes the lower index of a tie in both): the same integers give 1.0 there, and",
        "the 99% / 0.999 check uses those numbers for such rows.",
        "",
        "| model | samples | task metric | vs int8 ONNX task | cos | vs float task | cos | ONNX int8 vs float "
        "task | float .tflite cos | size MB int8 / float | lat (int8 ms) | sig | aeq | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "vs_onnx_int8" not in r:
            lines.append(f"| {r['name']} | {r.get('samples', '-')} | {r.get('metric', '-')} |" + " - |" * 10
                         + f" {verdict(r)} |")  # fmt: skip
            continue
        a, b, c = r["vs_onnx_int8"], r["vs_float"], r["onnx_int8_vs_float"]
        lat, size = r["latency"], r["size"]
        lines.append(
            f"| {r['name']} | {r['samples']} | {r['metric']} | {a['task']:.4f} | {a['cos']:.5f} | {b['task']:.4f} | "
            f"{b['cos']:.4f} | {c['task']:.4f} | {r['float_tflite_vs_onnx']:.6f} | {size['int8'] / 1e6:.2f} / "
            f"{size['float'] / 1e6:.2f} | {lat['ratio']:.2f}x ({lat['int8_ms']:.2f}) | "
            f"{'yes' if r['signature'] else 'no'} | {'yes' if r.get('aeq') == 'yes' else 'no'} | {verdict(r)} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = "corpus names, efficientnet_lite0, mobilenet_v2, minilm"
    ap.add_argument("--only", nargs="*", default=[], help=f"entries to run ({names})")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "RESULTS_LITERT.md"))
    ap.add_argument("--trace", action="store_true", help="print tracebacks of failures")
    ap.add_argument("--float-outputs", action="store_true", help="export with --float-outputs")
    args = ap.parse_args(argv)
    global FLOAT_OUTPUTS
    FLOAT_OUTPUTS = args.float_outputs
    start, load0 = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lowbit_litert_") as tmp:
        for job in corpus_jobs(set(args.only)):
            if isinstance(job, tuple):
                rows.append({"name": job[0], "error": job[1]})
                continue
            rows.append(measure(job, Path(tmp)))
    write(rows, Path(args.out), argv, time.perf_counter() - start, (load0, os.getloadavg()[0]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
