"""Calibration: run the float model one batch at a time and stream every needed tensor into an observer.

Activations of past batches are never kept, so peak memory depends on the batch size, not on how many
samples are used.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from .data import BatchAxes, DataSource, ImagePreprocess, InputSpec, open_data
from .errors import LowbitError
from .graph.external import external_base
from .observe import ChannelMinMax, Histogram
from .observe.runner import Runner, fixed_mmap_threshold, relax_mmap_threshold
from .planner import Layout
from .ranges_by_error import HOLD_BYTES, HOLD_MIN_SAMPLES, held_names, keep_first, measured, samples_wanted
from .recipe import Recipe
from .runtimes.ort import from_proto, with_outputs


@dataclass
class Hold:
    """Float tensors kept for the batches of the first `samples` samples (one dict per batch): the range
    measurement (ranges_by_error.py) then runs the nodes reading them on these values, not the float model again.
    Past HOLD_BYTES held, batches stop being kept once HOLD_MIN_SAMPLES are: a large model measures on fewer
    samples rather than hold gigabytes."""

    names: frozenset[str]
    samples: int
    batches: list[dict[str, np.ndarray]] = field(default_factory=list)
    nbytes: int = 0

    def wants(self, samples: int) -> bool:
        """Whether the batch after `samples` samples is kept."""
        if samples >= self.samples:
            return False
        return samples < HOLD_MIN_SAMPLES or self.nbytes < HOLD_BYTES

    def add(self, kept: dict[str, np.ndarray]) -> None:
        self.batches.append(kept)
        self.nbytes += sum(v.nbytes for v in kept.values())


@dataclass
class Statistics:
    histograms: dict[str, Histogram] = field(default_factory=dict)
    channels: dict[str, ChannelMinMax] = field(default_factory=dict)
    samples: int = 0
    # The first calibration batches, kept only when a range method runs the model again (ranges_by_error.py).
    inputs: list[dict[str, np.ndarray]] = field(default_factory=list)
    # Float tensors of those batches, where calibration could keep them (Hold).
    held: list[dict[str, np.ndarray]] = field(default_factory=list)

    def extremes(self) -> dict[str, tuple[float, float]]:
        """Each observed tensor's (min, max) as seen, before any range selection."""
        return {k: (h.min, h.max) for k, h in self.histograms.items() if h.count}


# Channel sums are folded in chunks of this many batches (or more: at most MAX_CHUNKS chunks when the sample count
# is known). Float sums depend on their order; a fixed chunking makes a sharded run (`shard.py`), whose workers
# return per-chunk sums that are folded in chunk order, add exactly what a single process adds.
CHUNK_BATCHES = 32
MAX_CHUNKS = 512


def chunk_batches(num_samples: int | None, batch_size: int) -> int:
    """Batches per chunk for a source of `num_samples` samples (None: unknown)."""
    if num_samples is None:
        return CHUNK_BATCHES
    return max(CHUNK_BATCHES, -(-num_samples // (batch_size * MAX_CHUNKS)))


# Min-max calibration reads nothing but each tensor's extremes (decide.py, settle.py), so when every scheme of the
# recipe calibrates by min-max, the activation histograms get 2 bins: the same exact min, max and count, merged the
# same way, for a comparison per value instead of binning (observe/histogram.py). The other methods read the bins
# and get the full histogram (Histogram's default). `layer_error_fast` reads full histograms only for the tensors
# it may measure (ranges_by_error.measured) and extremes elsewhere.
EXTREMES_BINS = 2
EXTREMES_METHODS = ("minmax", "layer_error_fast")


def histogram_bins(recipe: Recipe) -> int | None:
    """Bins of the activation histograms `recipe` needs: EXTREMES_BINS, or None for Histogram's default."""
    schemes = [recipe.default] + [r.scheme for r in recipe.rules if r.scheme is not None]
    return EXTREMES_BINS if all(s.calibration in EXTREMES_METHODS for s in schemes) else None


def calibration_session(model: ir.Model, names: list[str], threads: int = 0) -> ort.InferenceSession:
    """A float session that also outputs every tensor in `names`."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4  # fatal only: a failed run raises, and lowbit says it in one line
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    # Between runs (and between ops) ORT's worker threads otherwise busy-wait for work: measured ~1-2.5 s of CPU
    # per 64 EfficientNet-Lite0 samples on 2 cores, for no gain in wall time here. Values computed are the same.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Weights still in the float model's external data stay there: ONNX Runtime maps them from its folder, and
    # only the graph (with the extra outputs) is serialized; a large in-memory model goes through a temporary file.
    return from_proto(with_outputs(ir.to_proto(model), names), opts, external_base(model))


def fetched_names(model: ir.Model, tensors: Iterable[str], channel_axes: dict[str, int]) -> list[str]:
    """The tensors a calibration run fetches: the observed ones that are not constants."""
    initializers = set(model.graph.initializers)
    return sorted(t for t in set(tensors) | set(channel_axes) if t not in initializers)


def observe(
    session: ort.InferenceSession,
    inputs: set[str],
    fetch: list[str],
    tensors: set[str],
    channel_axes: dict[str, int],
    batches: Iterable[dict[str, np.ndarray]],
    chunk: int,
    on_chunk: Callable[[int, dict[str, ChannelMinMax]], None],
    select: Callable[[int], bool] = lambda c: True,
    bar: Any = None,
    count: Callable[[dict[str, np.ndarray]], int] | None = None,
    bins: int | None = None,
    full: frozenset[str] = frozenset(),
    hold: Hold | None = None,
) -> tuple[dict[str, Histogram], int]:
    """Run the batches of the chunks `select` accepts; histograms of every fetched tensor, and each chunk's
    channel observers handed to `on_chunk(index, observers)` in order. Returns (histograms, samples). `count` says
    how many samples a batch holds (a DataSource's `count`: inputs need not be batch-first); default: the first
    input's leading dimension. `bins`: the histograms' max_bins (None: Histogram's default; see EXTREMES_BINS),
    except for the tensors in `full`, which get Histogram's default. `hold`: tensors to keep (see Hold)."""
    few = Histogram if bins is None else lambda: Histogram(bins)
    runner = Runner(session, fetch)
    histograms: dict[str, Histogram] = {}
    channels: dict[str, ChannelMinMax] = {}
    samples = 0
    current = -1
    # Not enumerate(): its result tuple keeps the previous batch alive while the next one is made, on top of the
    # Runner's arrays (a batch of inputs more at the peak: +10 MiB on the YOLO head).
    source, b = iter(batches), -1
    while (batch := next(source, None)) is not None:
        b += 1
        c = b // chunk
        if c != current:
            if channels:
                on_chunk(current, channels)
            channels, current = {}, c
        if not select(c):
            del batch
            continue
        n = count(batch) if count is not None else len(next(iter(batch.values())))
        feeds = {k: v for k, v in batch.items() if k in inputs}
        kept: dict[str, np.ndarray] | None = {} if hold is not None and hold.wants(samples) else None
        outs = runner.run(feeds, n, hold.names if kept is not None and hold is not None else frozenset())
        # Observe and drop one output at a time: only one batch of activations is ever alive (and those held; the
        # Runner's arrays, when it runs samples alone, are that one batch).
        outs.reverse()
        for name in fetch:
            value = outs.pop()
            if kept is not None and hold is not None and name in hold.names:
                kept[name] = value  # the caller's (Runner.run's `keep`); the observers only read it
            if name in tensors:
                _update(histograms, name, value, Histogram if name in full else few)
            if name in channel_axes:
                _update(channels, name, value, partial(ChannelMinMax, axis=channel_axes[name] % value.ndim))
            del value
        if kept is not None and hold is not None:
            hold.add(kept)
        del outs, feeds, batch, kept
        samples += n
        if bar is not None:
            bar.update(n)
    if channels:
        on_chunk(current, channels)
    return histograms, samples


def fold_chunk(total: dict[str, ChannelMinMax], chunk: dict[str, ChannelMinMax]) -> None:
    """Add one chunk's channel observers to the running totals (chunks must come in data order)."""
    for name, obs in chunk.items():
        total[name] = total[name].merge(obs) if name in total else obs


def calibrate(
    model: ir.Model,
    tensors: Iterable[str],
    channel_axes: dict[str, int],
    batches: Iterable[dict[str, np.ndarray]],
    total: int | None = None,
    progress: bool = True,
    threads: int = 0,
    chunk: int = CHUNK_BATCHES,
    count: Callable[[dict[str, np.ndarray]], int] | None = None,
    keep: int = 0,
    bins: int | None = None,
    full: frozenset[str] = frozenset(),
    hold: Hold | None = None,
) -> Statistics:
    """Observe `tensors` (histograms) and per-channel ranges of `channel_axes` over all batches (`count`, `bins`,
    `full`, `hold`: see `observe`); the batches holding the first `keep` samples are kept in `Statistics.inputs`,
    the tensors `hold` names in `Statistics.held`."""
    fixed_mmap_threshold()  # until Runner splits batches, or calibration ends (then relaxed below)
    tensors = set(tensors)
    names = fetched_names(model, tensors | (hold.names if hold else set()), channel_axes)
    session = calibration_session(model, names, threads)
    stats = Statistics()
    bar = tqdm(
        total=total, desc="calibrating", unit="sample", disable=None if progress else True, leave=False
    )  # None: off when not a terminal
    inputs = {v.name for v in model.graph.inputs if v.name}
    if keep:
        batches = keep_first(batches, stats.inputs, keep, count or (lambda b: len(next(iter(b.values())))))
    try:
        stats.histograms, stats.samples = observe(
            session,
            inputs,
            names,
            tensors,
            channel_axes,
            batches,
            chunk,
            lambda _, c: fold_chunk(stats.channels, c),
            bar=bar,
            count=count,
            bins=bins,
            full=full,
            hold=hold,
        )
    finally:
        bar.close()
        relax_mmap_threshold()
    stats.held = hold.batches if hold is not None else []
    if stats.samples == 0:
        raise LowbitError("calibration data yielded no samples; point --calib at a non-empty source")
    return stats


def _update(store: dict, name: str, value: np.ndarray, kind: Callable[[], Any]) -> None:
    if name not in store:
        store[name] = kind()
    try:
        store[name].update(value)
    except LowbitError:
        if value.dtype.kind != "f" or np.isnan(value).any():
            raise LowbitError(
                f"tensor '{name}' is NaN on the calibration data; check the data or the float model"
            ) from None
        # Infinities are a mask's (PyTorch's masked_fill(-inf) before a Softmax, a -inf padding row in a table
        # of attention biases): held as float32's extremes, they are sentinels that keep the ops reading them
        # float (settle.py), as a finfo.min mask is.
        big = np.finfo(np.float32).max
        store[name].update(np.clip(value, -big, big))


def open_calibration(
    calib: Any,
    specs: list[InputSpec],
    recipe: Recipe,
    preprocess: ImagePreprocess | None,
    batch_axes: BatchAxes | None = None,
) -> DataSource:
    """The user's calibration data as the recipe reads it: its batch size and sample count."""
    return open_data(
        calib,
        specs,
        batch_size=recipe.batch_size,
        preprocess=preprocess,
        limit=recipe.calibration_samples,
        batch_axes=batch_axes,
    )


def calibrate_layout(
    model: ir.Model,
    layout: Layout,
    calib: Any,
    specs: list[InputSpec],
    recipe: Recipe,
    preprocess: ImagePreprocess | None,
    progress: bool,
    workers: int = 1,
    ray_address: str | None = None,
    batch_axes: BatchAxes | None = None,
) -> Statistics:
    """The calibrate stage: open the user's data, checked against the model's inputs, and observe what the
    layout needs (constants need no observing). With workers > 1 or a Ray address, Ray tasks share the work
    (`shard.py`) and give bit-identical statistics. `batch_axes`: see `open_data`."""
    source = open_calibration(calib, specs, recipe, preprocess, batch_axes)
    observed = {s for s in layout.sources() if s not in model.graph.initializers}
    keep = samples_wanted(layout)  # ranges chosen by the error they cause run these samples again
    bins = histogram_bins(recipe)
    full = frozenset(measured(model, layout)) if bins is not None else frozenset()
    hold = Hold(frozenset(held_names(model, layout)), keep) if keep else None
    if workers > 1 or ray_address is not None:
        from .shard import calibrate_sharded

        stats = calibrate_sharded(
            model,
            observed,
            layout.channel_stats,
            calib,
            specs,
            recipe.batch_size,
            preprocess,
            recipe.calibration_samples,
            workers,
            ray_address,
            progress,
            batch_axes,
            None if full else bins,  # full histograms everywhere: extremes are the same, so are the bytes
        )
        if keep:  # the workers read the data; the first samples are read again here
            again = open_data(calib, specs, recipe.batch_size, preprocess, keep, batch_axes=batch_axes)
            stats.inputs = [{k: np.array(v) for k, v in b.items()} for b in again]
            if hold is not None and hold.names:  # as one process holds them: the same float session's values
                session = calibration_session(model, sorted(hold.names))
                inputs = {v.name for v in model.graph.inputs if v.name}
                fetch = [o.name for o in session.get_outputs() if o.name in hold.names]
                seen = 0
                for b in stats.inputs:
                    if not hold.wants(seen):
                        break
                    values = session.run(fetch, {k: v for k, v in b.items() if k in inputs})
                    hold.add(dict(zip(fetch, values)))
                    seen += source.count(b)
                stats.held = hold.batches
        return stats
    total = min(x for x in (source.num_samples, recipe.calibration_samples) if x is not None)
    chunk = chunk_batches(source.num_samples, source.batch_size)
    return calibrate(
        model,
        observed,
        layout.channel_stats,
        source,
        total=total,
        progress=progress,
        chunk=chunk,
        count=source.count,
        keep=keep,
        bins=bins,
        full=full,
        hold=hold,
    )
