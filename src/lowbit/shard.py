"""Calibration and evaluation sharded over Ray workers (`pip install lowbit[ray]`; `--workers N`, `--ray-address ADDR`).

What goes to workers: the float model's bytes once (Ray's object store), and each worker's share of the data as
a path plus a range of chunk indices; every worker opens the data itself, so samples never travel through the
driver. Each worker returns its histograms (merging them is exact in any order: `observe/histogram.py`) and one
set of channel observers per chunk, which the driver folds in chunk order, as a single process does
(`calibrate.observe`). So the statistics, and the quantized model, are bit-identical to a single-process run.

Evaluation (`evaluate(..., workers=N)`, `lowbit eval --workers N`) is shared the same way: each worker runs its
chunks and returns its outputs, which the driver joins in data order before measuring.

A worker that dies is retried once by Ray (its share is recomputed from scratch: the work is deterministic); a
second failure ends the run with one line, before anything is written.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from tqdm import tqdm

from .calibrate import (
    Statistics,
    calibration_session,
    chunk_batches,
    fetched_names,
    fold_chunk,
    observe,
)
from .data import BatchAxes, ImagePreprocess, InputSpec, open_data
from .errors import LowbitError
from .observe import ChannelMinMax, Histogram

# Set by tests only, so that the retry and the failure paths run for real: the first share's worker process
# kills itself once (the env value is a marker file recording that it did; the retry then proceeds), or always.
_KILL_ONCE_ENV = "LOWBIT_TEST_KILL_SHARD_ONCE"
_KILL_ALWAYS_ENV = "LOWBIT_TEST_KILL_SHARD_ALWAYS"


def check_workers(workers: int, calib: Any, ray_address: str | None) -> None:
    """Refuse, before any work, what sharding cannot do."""
    check_ray(workers, None)
    if (workers == 1 and ray_address is None) or calib is None:
        return  # no calibration to share (a plan's ranges are reused, or the mode needs no data)
    if not isinstance(calib, (str, os.PathLike)):
        raise LowbitError(
            "with workers, each one reads its share of the data itself, so the data must be a path (a .npy/.npz "
            "file or a folder): save it to disk, or drop --workers/--ray-address (workers=, ray_address=)"
        )
    check_ray(workers, ray_address)


def check_ray(workers: int, ray_address: str | None) -> None:
    """`workers` is a positive integer, and Ray is installed when it will be used."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LowbitError(f"workers must be a positive integer, got {workers!r}")
    if workers == 1 and ray_address is None:
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        raise LowbitError("--workers/--ray-address need Ray: pip install 'lowbit[ray]' (or run without them)") from None


def _shard(
    model_bytes: bytes,
    tensors: list[str],
    channel_axes: dict[str, int],
    calib: str,
    specs: list[InputSpec],
    batch_size: int,
    preprocess: ImagePreprocess | None,
    limit: int | None,
    chunk: int,
    first: int,
    stop: int,
    index: int,
    batch_axes: BatchAxes | None,
    bins: int | None = None,
) -> tuple[dict[str, Histogram], list[tuple[int, dict[str, ChannelMinMax]]], int]:
    """One worker's share: the chunks first .. stop-1. Runs in a Ray worker process."""
    marker = os.environ.get(_KILL_ONCE_ENV)
    if index == 0 and (os.environ.get(_KILL_ALWAYS_ENV) or (marker and not Path(marker).exists())):
        if marker:
            Path(marker).write_text("killed")
        os._exit(1)
    model = ir.from_proto(onnx.load_from_string(model_bytes))
    names = fetched_names(model, tensors, channel_axes)
    session = calibration_session(model, names, threads=1)
    source = open_data(calib, specs, batch_size=batch_size, preprocess=preprocess, limit=limit, batch_axes=batch_axes)
    chunks: list[tuple[int, dict[str, ChannelMinMax]]] = []
    inputs = {v.name for v in model.graph.inputs if v.name}
    histograms, samples = observe(
        session,
        inputs,
        names,
        set(tensors),
        channel_axes,
        source,
        chunk,
        lambda c, obs: chunks.append((c, obs)),
        select=lambda c: first <= c < stop,
        count=source.count,
        bins=bins,
    )
    return histograms, chunks, samples


def _shares(num_samples: int | None, batch_size: int, workers: int, what: str) -> tuple[int, list[tuple[int, int]]]:
    """(batches per chunk, each share's chunk range [first, stop)), shares in data order."""
    if num_samples is None:  # paths always know their size; kept as a guard for future sources
        raise LowbitError(f"sharded {what} needs data whose size is known up front (a file or a folder)")
    chunk = chunk_batches(num_samples, batch_size)
    num_chunks = -(-num_samples // (batch_size * chunk))
    shares = min(workers, max(num_chunks, 1))
    return chunk, [(i * num_chunks // shares, (i + 1) * num_chunks // shares) for i in range(shares)]


def _run(
    fn: Callable[..., Any],
    shared: Any,
    calls: list[tuple[Any, ...]],
    workers: int,
    ray_address: str | None,
    what: str,
    on_result: Callable[[Any], None],
) -> list[Any]:
    """fn(shared, *call) for every call as Ray tasks (retried once); results in call order. `shared` goes into
    Ray's object store once. A local Ray instance is started (and stopped) unless one runs or an address is given."""
    import ray

    # Ray's driver prints the raylet's notices ("(raylet) A worker died ...", "Task failed ... will be retried")
    # to stdout from a thread of its own, even with log_to_driver=False; lowbit says what matters in one line
    # (below). The switch is the one Ray's own debugger uses to quiet the driver; the notices stay in Ray's logs.
    ray_worker: Any = getattr(getattr(ray, "_private", None), "worker", None)
    shown = getattr(ray_worker, "_worker_logs_enabled", None)
    if shown is not None:
        ray_worker._worker_logs_enabled = False
    started_here = not ray.is_initialized()
    if started_here:
        kw: dict[str, Any] = {"address": ray_address} if ray_address else {"num_cpus": workers}
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, **kw)
    try:
        remote: Any = ray.remote  # Ray's type stubs cannot express a task with arguments
        task = remote(max_retries=1, num_cpus=1)(fn)
        shared_ref = ray.put(shared)
        refs = [task.remote(shared_ref, *call) for call in calls]
        results: list[Any] = [None] * len(refs)
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[index[ref]] = ray.get(ref)
                on_result(results[index[ref]])
        return results
    except ray.exceptions.RayError as e:
        first_line = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise LowbitError(
            f"a {what} worker failed twice ({type(e).__name__}: {first_line}); nothing was written: "
            "check the workers' memory and the data, or run without --workers"
        ) from None
    finally:
        if started_here:
            ray.shutdown()  # stops the thread that prints the notices, before they are shown again
        if shown is not None:
            ray_worker._worker_logs_enabled = shown


def calibrate_sharded(
    model: ir.Model,
    tensors: set[str],
    channel_axes: dict[str, int],
    calib: str | os.PathLike,
    specs: list[InputSpec],
    batch_size: int,
    preprocess: ImagePreprocess | None,
    limit: int | None,
    workers: int,
    ray_address: str | None = None,
    progress: bool = True,
    batch_axes: BatchAxes | None = None,
    bins: int | None = None,
) -> Statistics:
    """The same statistics as `calibrate.calibrate` over `open_data(calib, ...)`, computed by `workers` Ray tasks
    (`bins`: see `calibrate.observe`)."""
    source = open_data(calib, specs, batch_size=batch_size, preprocess=preprocess, limit=limit, batch_axes=batch_axes)
    chunk, bounds = _shares(source.num_samples, source.batch_size, workers, "calibration")
    common = (sorted(tensors), channel_axes, str(calib), specs, batch_size, preprocess, limit, chunk)
    calls = [(*common, first, stop, i, batch_axes, bins) for i, (first, stop) in enumerate(bounds)]
    bar = tqdm(
        total=source.num_samples,
        desc=f"calibrating ({len(bounds)} workers)",
        unit="sample",
        disable=None if progress else True,
        leave=False,
    )
    try:
        model_bytes = ir.to_proto(model).SerializeToString()
        results = _run(_shard, model_bytes, calls, workers, ray_address, "calibration", lambda r: bar.update(r[2]))
    finally:
        bar.close()
    stats = Statistics()
    for histograms, chunks, samples in results:  # shares in data order
        for name, h in histograms.items():
            stats.histograms[name] = stats.histograms[name].merge(h) if name in stats.histograms else h
        for _, obs in chunks:
            fold_chunk(stats.channels, obs)
        stats.samples += samples
    if stats.samples == 0:
        raise LowbitError("calibration data yielded no samples; point --calib at a non-empty source")
    return stats


def _eval_shard(job: tuple[Any, ...], chunk: int, first: int, stop: int) -> tuple[dict, dict, int]:
    """One worker's share of `evaluate`: outputs of the batches in chunks first .. stop-1."""
    from .evaluate.evaluate import collect, open_sessions

    model, mode, reference, data, specs, batch_size, preprocess, limit, keep, axes = job
    sess, ref_sess = open_sessions(model, mode, reference)
    source = open_data(data, specs, batch_size=batch_size, preprocess=preprocess, limit=limit, batch_axes=axes)
    return collect(sess, ref_sess, source, keep, select=lambda c: first <= c < stop, chunk=chunk)


def evaluate_sharded(
    job: tuple[Any, ...], workers: int, ray_address: str | None, bar: Any
) -> tuple[dict[str, list], dict[str, list], int]:
    """`evaluate.collect` over Ray workers: `job` = (model, mode, reference, data, specs, batch_size, preprocess,
    limit, keep, batch_axes); every output batch comes back and is joined in data order, so the metrics are the same
    numbers."""
    model, mode, reference, data, specs, batch_size, preprocess, limit, keep, axes = job
    check_workers(workers, data, ray_address)
    source = open_data(data, specs, batch_size=batch_size, preprocess=preprocess, limit=limit, batch_axes=axes)
    chunk, bounds = _shares(source.num_samples, source.batch_size, workers, "evaluation")
    calls = [(chunk, first, stop) for first, stop in bounds]
    results = _run(_eval_shard, job, calls, workers, ray_address, "evaluation", lambda r: bar.update(r[2]))
    outs: dict[str, list] = {n: [] for n in keep}
    refs: dict[str, list] = {n: [] for n in results[0][1]} if results else {}
    seen = 0
    for o, r, n in results:
        for name in outs:
            outs[name] += o[name]
        for name in refs:
            refs[name] += r[name]
        seen += n
    return outs, refs, seen


def _alone_shard(job: tuple[Any, ...], layers: list[Any]) -> tuple[list[dict[str, Any]], int]:
    """One worker's share of diagnose's "layers alone": each layer's final-output fidelity, and the trials run."""
    from .evaluate.layerwise import Trials

    float_bytes, plan, batches, refs, names, kinds = job
    trials = Trials(onnx.load_from_string(float_bytes), plan, batches, refs, names, kinds)
    return [trials.alone(x) for x in layers], trials.runs


def alone_sharded(
    trials: Any,
    layers: list[Any],
    kinds: Any,
    workers: int,
    ray_address: str | None,
    on_done: Callable[[int], None],
) -> list[dict[str, Any]]:
    """`[trials.alone(x) for x in layers]` (diagnose's per-layer evaluation, `evaluate/layerwise.py`) as Ray tasks:
    the float model, plan, data and float outputs go to the object store once, each worker re-applies the plan
    with one layer quantized for its contiguous share of `layers` and returns the measurements, in layer order.
    `trials.runs` counts the workers' runs as if they were its own; `on_done(n)` after each share."""
    job = (trials.float_model.SerializeToString(), trials.plan, trials.batches, trials.refs, trials.names, kinds)
    shares = min(workers, len(layers))
    calls = [(layers[i * len(layers) // shares : (i + 1) * len(layers) // shares],) for i in range(shares)]
    results = _run(_alone_shard, job, calls, workers, ray_address, "diagnose", lambda r: on_done(len(r[0])))
    trials.runs += sum(runs for _, runs in results)
    return [f for found, _ in results for f in found]


__all__ = ["alone_sharded", "calibrate_sharded", "check_ray", "check_workers", "evaluate_sharded"]
