"""Benchmark ONNX and .tflite models side by side: latency, peak memory, time per op type and an energy ESTIMATE.

Several models are timed interleaved (round-robin, alternating order each round) so that a noisy machine
slows them alike, and their sessions are created in opposite orders in the two halves of the runs: session
creation order alone shifted the latency ratio of two identical-kernel models by ~2.5% on our 2-core machine.
`.tflite` files run in LiteRT (XNNPACK) in the same loop; time per op type and the energy estimate read ONNX
graphs, so they are None for them. `.ort` files (ORT format) run in ONNX Runtime like .onnx ones; their time per
op type comes from ORT's profiler, but the energy estimate reads an ONNX graph, so it is None for them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from ..data import InputSpec
from ..errors import LowbitError
from ..graph.io import load_proto
from ..passes.opset import check_runnable
from ..runtimes.executorch import ExecutorchSession, is_pte
from ..runtimes.litert import LiteRTSession, is_tflite
from ..runtimes.ort import cpu_has_vnni, is_ort_format, ort_format_input_specs, session, short_error
from . import energy
from .latency import interleaved_latency, paired_ratio

PROFILE_RUNS = 20  # enough to average kernel times; profiling slows every run, so keep it short


class _Fed:
    """A session bound to its own feeds, so models with different inputs share one interleaved loop."""

    def __init__(self, sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> None:
        self.sess, self.feeds = sess, feeds

    def run(self, outputs: Any, _feeds: Any) -> Any:
        return self.sess.run(outputs, self.feeds)


class _FedLite:
    """A LiteRT model bound to its inputs already in the file's layout and number type: only the interpreter
    is timed, not the NCHW->NHWC transpose or quantization lowbit adds to feed it NCHW float data."""

    def __init__(self, sess: LiteRTSession | ExecutorchSession, feeds: dict[str, np.ndarray]) -> None:
        self.sess, self.native = sess, sess.prepare(feeds)

    def run(self, _outputs: Any, _feeds: Any) -> Any:
        return self.sess.invoke(self.native)


def bound_session(path: str, feeds: dict[str, np.ndarray], threads: int) -> _Fed | _FedLite:
    """`path` (.onnx in ORT, .tflite in LiteRT) bound to `feeds`: `.run(None, None)` runs it once."""
    if is_tflite(path):
        return _FedLite(LiteRTSession(path, threads=threads), feeds)
    if is_pte(path):
        return _FedLite(ExecutorchSession(path, threads=threads), feeds)
    return _Fed(session(path, "kernels", threads=threads), feeds)


def runtime_name(path: str) -> str:
    """Which runtime bench and eval use for a model file (XNNPACK named when LiteRT reports its delegate)."""
    if is_pte(path):
        return "executorch (XNNPACK)"
    if not is_tflite(path):
        return "onnxruntime"
    return "litert (XNNPACK)" if LiteRTSession(path, threads=1).delegate_partitions() else "litert"


def benchmark(
    models: Sequence[str | Path],
    threads: Iterable[int] = (1,),
    runs: int = 100,
    warmup: int = 10,
    batch: int = 1,
    data: Any = None,
    profile: bool = True,
    progress: bool = True,
    batch_axes: dict[str, int | None] | None = None,
) -> dict[str, Any]:
    """Measure `models` (.onnx in ONNX Runtime, .tflite in LiteRT) interleaved; returns a JSON-able dict
    (see docs/energy.md for the energy model). LiteRT models get "op_time_ms" and "energy" None."""
    model_paths = [str(m) for m in models]
    if not model_paths:
        raise LowbitError("no model to benchmark; pass one or more .onnx or .tflite files")
    threads = check_threads(threads)
    for label, value, low in (("runs", runs, 1), ("warmup", warmup, 0), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise LowbitError(f"{label} must be an integer >= {low}, got {value!r}")
    keys = _unique_keys(model_paths)
    protos: dict[str, onnx.ModelProto | LiteRTSession | ExecutorchSession | list[InputSpec]] = {}
    for key, path in zip(keys, model_paths):
        if is_tflite(path):
            protos[key] = LiteRTSession(path, threads=1)  # one-line errors for missing or corrupt files
            continue
        if is_pte(path):
            protos[key] = ExecutorchSession(path)
            continue
        if is_ort_format(path):
            protos[key] = ort_format_input_specs(path)  # no ONNX graph: its inputs, from ONNX Runtime
            continue
        loaded = protos[key] = load_proto(path)
        check_runnable(loaded, path)  # an unknown custom op: one line now, not a traceback in the timing loop
    paths = dict(zip(keys, model_paths))
    feeds = _feeds(protos, batch, data, batch_axes)
    for key in keys:  # one run each, so a model that fails on these inputs is one line, not a timing traceback
        _runs_once(key, paths[key], feeds[key], data is None)

    steps = 2 * len(threads) + len(keys) * (2 if profile else 1)
    bar = tqdm(total=steps, desc="bench", unit="step", disable=None if progress else True)
    result: dict[str, Any] = {"machine": machine(), "models": {}, "ratios": {}}
    times_by_threads = {}
    for t in threads:
        times_by_threads[t] = _latency(paths, feeds, t, runs, warmup, bar)
    for key in keys:
        proto = protos[key]
        lite = isinstance(proto, (LiteRTSession, ExecutorchSession))
        entry: dict[str, Any] = {
            "runtime": runtime_name(paths[key]),
            "size_bytes": os.path.getsize(paths[key]),
            "latency_ms": {},
        }
        for t, times in times_by_threads.items():
            ms = 1e3 * np.asarray(times[key])
            p50, p90, p99 = np.percentile(ms, [50, 90, 99])
            entry["latency_ms"][str(t)] = {
                "p50": float(p50),
                "p90": float(p90),
                "p99": float(p99),
                "mean": float(ms.mean()),
            }
        bar.set_description(f"memory {Path(paths[key]).name}")
        entry["peak_memory_mb"] = peak_memory_mb(paths[key], feeds[key], threads[0])
        bar.update()
        if profile:
            bar.set_description(f"profile {Path(paths[key]).name}")
            entry["op_time_ms"] = (
                None if lite else op_times(paths[key], feeds[key], threads[0], min(runs, PROFILE_RUNS))
            )
            bar.update()
        entry["energy"] = (
            energy.estimate(proto, _batch_of(feeds[key], batch)) if isinstance(proto, onnx.ModelProto) else None
        )
        result["models"][key] = entry
    bar.close()
    first = keys[0]
    for t, times in times_by_threads.items():
        result["ratios"][str(t)] = {k: paired_ratio(times, k, first) for k in keys}
    return result


def check_threads(threads: Iterable[Any]) -> list[int]:
    """Thread counts as positive ints, in order, each once; strings are accepted (from the CLI)."""
    out: list[int] = []
    for t in threads:
        try:
            n = int(t) if not isinstance(t, bool) and str(t).strip().isdigit() else -1
        except ValueError:
            n = -1
        if n < 1:
            raise LowbitError(f"bad thread count {t!r}; --threads takes positive integers, e.g. --threads 1 2")
        if n in out:
            raise LowbitError(f"thread count {n} is listed twice in --threads; list each count once")
        out.append(n)
    if not out:
        raise LowbitError("no thread counts given; use e.g. --threads 1 2")
    return out


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "vnni": cpu_has_vnni(), "cores": os.cpu_count()}


def _unique_keys(models: list[str]) -> list[str]:
    # The same file twice is a legitimate A/A check of the noise; keep both entries apart.
    seen: dict[str, int] = defaultdict(int)
    keys = []
    for m in models:
        seen[m] += 1
        keys.append(m if seen[m] == 1 else f"{m}#{seen[m]}")
    return keys


def _feeds(
    protos: dict[str, onnx.ModelProto | LiteRTSession | ExecutorchSession | list[InputSpec]],
    batch: int,
    data: Any,
    batch_axes: dict[str, int | None] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    from ..data import input_specs, open_data

    by_specs: dict[tuple, dict[str, np.ndarray]] = {}  # models with the same inputs get the same arrays
    out = {}
    for key, proto in protos.items():
        if isinstance(proto, list):
            specs = proto
        else:
            specs = proto.input_specs() if isinstance(proto, (LiteRTSession, ExecutorchSession)) else input_specs(proto)
        # The batch axis's name does not matter ('N' in ONNX, None in LiteRT): same data for both.
        specs = [
            s if not s.shape or isinstance(s.shape[0], int) else dataclasses.replace(s, shape=(None, *s.shape[1:]))
            for s in specs
        ]
        sig = tuple((s.name, str(s.dtype), s.shape) for s in specs)
        if sig not in by_specs:
            if data is None:
                by_specs[sig] = random_inputs(specs, batch)
            else:
                source = open_data(
                    data, specs, batch_size=batch, limit=batch, what="benchmark data", batch_axes=batch_axes
                )
                first = next(iter(source), None)
                if first is None:
                    raise LowbitError(
                        f"no sample in the benchmark data fits {key}'s fixed batch size; give more samples"
                    )
                by_specs[sig] = first
        out[key] = by_specs[sig]
    return out


def _runs_once(key: str, path: str, feeds: dict[str, np.ndarray], random: bool) -> None:
    try:
        bound_session(path, feeds, 1).run(None, None)
    except LowbitError:
        raise
    except Exception as e:  # ONNX Runtime's (or LiteRT's) own exception types
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        fix = (
            "random inputs set every symbolic size to 1; pass --data with real samples"
            if random
            else "check that the data fits the model's inputs"
        )
        raise LowbitError(f"{key} fails on the benchmark inputs ({shapes}): {short_error(e)}; {fix}") from None


def random_inputs(specs: list, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the model's shapes (dynamic dims: batch for the first, 1 elsewhere) and dtypes."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in specs:
        shape = tuple(d if isinstance(d, int) else (batch if i == 0 else 1) for i, d in enumerate(s.shape))
        if s.dtype == np.bool_:
            feeds[s.name] = rng.random(shape) < 0.5
        elif np.issubdtype(s.dtype, np.integer):
            # Small values: integer inputs are often indices (tokens, classes) into small tables.
            feeds[s.name] = rng.integers(0, 2, shape).astype(s.dtype)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(s.dtype)
    return feeds


def _batch_of(feeds: dict[str, np.ndarray], default: int) -> int:
    first = next(iter(feeds.values()), None)
    return int(first.shape[0]) if first is not None and first.ndim else default


def interleaved_times(
    paths: dict[str, str], feeds: dict[str, np.ndarray], threads: int = 1, runs: int = 100, warmup: int = 10
) -> dict[str, list[float]]:
    """Seconds per run of each model on the same feeds, timed as :func:`benchmark` times them (for paired ratios)."""
    with tqdm(total=2, disable=True) as bar:
        return _latency(paths, {k: feeds for k in paths}, threads, runs, warmup, bar)


def _latency(
    paths: dict[str, str], feeds: dict, threads: int, runs: int, warmup: int, bar: tqdm
) -> dict[str, list[float]]:
    """Seconds per run; the halves create sessions in opposite orders to cancel creation-order bias."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    halves = ((runs + 1) // 2, runs // 2)
    for order, n in zip((list(paths), list(reversed(paths))), halves):
        bar.set_description(f"latency, {threads} thread{'s' if threads > 1 else ''}")
        if n:
            sessions = {k: bound_session(paths[k], feeds[k], threads) for k in order}
            half = interleaved_latency(sessions, {}, runs=n, warmup=warmup)
            for k, v in half.items():
                times[k].extend(v)
            del sessions
        bar.update()
    return times


def op_times(path: str, feeds: dict[str, np.ndarray], threads: int, runs: int) -> dict[str, float]:
    """Milliseconds per run spent in each op type (ORT profiler, kernel time), slowest first."""
    tmp = tempfile.mkdtemp(prefix="lowbit-profile-")
    try:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 1):
            sess.run(None, feeds)
        profile_file = sess.end_profiling()
        with open(profile_file) as f:
            events = json.load(f)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # The first run is a warm-up (buffer allocation, first-touch): drop its kernels.
    model_runs = sorted(
        (e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"]
    )
    start = model_runs[0]["ts"] + model_runs[0]["dur"] if len(model_runs) > 1 else -1
    counted = max(len(model_runs) - 1, 1)
    total: dict[str, float] = defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time") and e["ts"] >= start:
            total[e.get("args", {}).get("op_name", "?")] += e["dur"] / 1e3
    return {op: ms / counted for op, ms in sorted(total.items(), key=lambda kv: -kv[1])}


def peak_memory_mb(path: str, feeds: dict[str, np.ndarray], threads: int) -> float | None:
    """Peak resident memory added by creating and running a session, measured in a fresh process (Linux)."""
    if not Path("/proc/self/status").exists():
        return None
    with tempfile.TemporaryDirectory(prefix="lowbit-mem-") as tmp:
        feeds_file = os.path.join(tmp, "feeds.npz")
        # Any: numpy's savez stub has allow_pickle: bool among the keywords the arrays are passed as
        arrays: dict[str, Any] = feeds
        np.savez(feeds_file, **arrays)
        code = "import sys; from lowbit.evaluate.bench import _peak_worker; _peak_worker(*sys.argv[1:])"
        proc = subprocess.run(
            [sys.executable, "-c", code, path, feeds_file, str(threads)], capture_output=True, text=True
        )
    if proc.returncode != 0:
        raise LowbitError(f"peak-memory run of {path} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_worker(path: str, feeds_file: str, threads: str) -> None:
    """Runs in the child: VmHWM after session + runs, minus VmRSS before (ru_maxrss would carry the parent's)."""
    with np.load(feeds_file) as z:
        feeds = {k: z[k] for k in z.files}
    if is_tflite(path):
        # Import LiteRT and the metadata reader now, so their code does not count as the model's memory.
        import ai_edge_litert.interpreter  # noqa: F401

        from ..export.tflite import writer  # noqa: F401
    try:
        # Reset the high-water mark so import-time transients do not count (Linux >= 4.0).
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _status_kb("VmRSS")
    sess = bound_session(path, feeds, int(threads))
    for _ in range(3):
        sess.run(None, None)
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_mb": max(peak - before, 0) / 1024}))
