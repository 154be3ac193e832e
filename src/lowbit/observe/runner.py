"""Calibration runs of the float session, one sample at a time into arrays reused from batch to batch.

A plain `session.run` on a batch returns every fetched activation as a new block of up to tens of MB, and ONNX
Runtime allocates its own intermediates as well (calibration runs without its arena, for a flat peak); with
calibration's fixed mmap threshold each block is a fresh mapping, page-faulted and zeroed. On EfficientNet-Lite0
(batch 8, 62 tensors, 216 MiB a batch) that was ~100 k page faults a batch, most of calibration's system time.

Here, once a batch has shown that it is safe (`Runner._check`), each later batch of the same input shapes runs one
sample at a time (ONNX Runtime's IOBinding), every output written straight into its sample's slice of a batch-sized
array kept from batch to batch: the activations' pages are touched once per run instead of allocated per batch, and
ONNX Runtime's own intermediates are one sample's, not eight's. (Binding whole-batch outputs instead does not
work: with the NCHWc layout of ORT's full optimizations, the bound run held every blocked intermediate at once,
+180 MiB of peak on EfficientNet-Lite0.)

The observers see the same batches with the same values: a model whose per-sample outputs are not bit-identical
to its batched ones (measured on the first batch, at its first and last sample), whose inputs or outputs are not
batch-first, or whose output shapes depend on the data runs plain batches, as before.
"""

from __future__ import annotations

import ctypes

import numpy as np
import onnxruntime as ort

from ..runtimes.ort import run_batch


def fixed_mmap_threshold() -> None:
    """While calibration runs whole batches: keep glibc from raising its mmap threshold as large blocks are freed.

    Each plain batch fetches ~100 activation tensors of up to tens of MB. With glibc's default dynamic threshold,
    once the first batch's blocks are freed, later ones of that size come from the heap instead of mmap, and the
    heap's fragmentation raised peak memory by ~15% from the second batch on (EfficientNet-Lite0: 528 MiB with
    10 samples, 607 with 100). A fixed threshold (glibc's own default, 128 KiB) returns every large block to the
    system when freed: measured 441 vs 443 MiB for 10 vs 200 samples. Process-wide; does nothing off glibc.
    """
    _mmap_threshold(128 * 1024)


def relax_mmap_threshold() -> None:
    """Once batches run a sample at a time (their outputs live in arrays kept from batch to batch), and when
    calibration ends: blocks below 32 MiB (glibc's own ceiling for its dynamic threshold) come from the heap
    again. With 128 KiB kept, every block above it (ONNX Runtime's intermediates of each sample; the rewrite,
    check, speed check and lint after calibration) was a fresh mmap, page-faulted and zeroed. glibc cannot be put
    back to its dynamic threshold once one is set; 32 MiB is where that dynamic threshold ends up."""
    _mmap_threshold(32 * 1024 * 1024)


def _mmap_threshold(size: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, size)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


QUIET = ort.RunOptions()
QUIET.log_severity_level = 4  # fatal only

Shapes = dict[str, tuple[tuple[int, ...], np.dtype]]


class Runner:
    """Runs `session` for `fetch` on calibration batches; see the module's docstring."""

    def __init__(self, session: ort.InferenceSession, fetch: list[str]) -> None:
        self.session, self.fetch = session, fetch
        self.split: bool | None = None  # None: not yet known (the first batch of more than one sample decides)
        self.shapes: Shapes = {}  # the feeds' shapes split runs are for
        self.outputs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # each bound output's batch shape and dtype
        self.buffers: dict[str, np.ndarray] = {}

    def run(self, feeds: dict[str, np.ndarray], n: int, keep: frozenset[str] = frozenset()) -> list[np.ndarray]:
        """The fetched values for `feeds` (a batch of `n` samples), in fetch order. Arrays named in `keep` are the
        caller's; every other one may be overwritten by the next call."""
        shapes: Shapes = {k: (v.shape, v.dtype) for k, v in feeds.items()}
        if self.split and shapes == self.shapes:
            try:
                self._samples(feeds, n)
            except Exception:  # a data-dependent output shape ("Shape mismatch attempting to re-use buffer")
                self.split, self.buffers = False, {}
            else:
                # A fetched graph input is its feed: no copy of it is made or kept.
                outs = [feeds[name] if name in feeds else self.buffers[name] for name in self.fetch]
                for name in keep & self.buffers.keys():
                    self.buffers[name] = np.empty_like(self.buffers[name])  # handed over: later batches get their own
                return outs
        outs = self._plain(feeds, n)
        if self.split is None and n > 1:
            self.split = self._check(feeds, n, outs)
            self.shapes = shapes
            self.outputs = {k: (v.shape, v.dtype) for k, v in zip(self.fetch, outs) if k not in feeds}
            if self.split:
                relax_mmap_threshold()  # no batch of fresh outputs any more: the heap may serve blocks again
        return outs

    def _plain(self, feeds: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
        names = [k for k in self.fetch if k not in feeds]  # a fetched graph input is its feed, not ORT's copy
        values = dict(zip(names, run_batch(self.session, names, feeds, n, "the float model (calibration data)")))
        return [feeds[k] if k in feeds else values[k] for k in self.fetch]

    def _check(self, feeds: dict[str, np.ndarray], n: int, outs: list[np.ndarray]) -> bool:
        """Whether batches like this one may run a sample at a time: every feed and output batch-first with `n`
        samples, and the first and last samples run alone give exactly the batch's values."""
        if any(v.ndim == 0 or v.shape[0] != n for v in [*feeds.values(), *outs]):
            return False
        if any(v.dtype == object for v in outs):
            return False
        batch = {k: v for k, v in zip(self.fetch, outs) if k not in feeds}
        for i in (0, n - 1):
            alone = {k: np.empty((1, *v.shape[1:]), v.dtype) for k, v in batch.items()}
            try:
                self._sample(feeds, i, alone)
            except Exception:  # not runnable this way: plain batches, as before
                return False
            if not all(np.array_equal(alone[k], v[i : i + 1]) for k, v in batch.items()):
                return False
        return True

    def _samples(self, feeds: dict[str, np.ndarray], n: int) -> None:
        if not self.buffers:
            self.buffers = {k: np.empty(shape, dtype) for k, (shape, dtype) in self.outputs.items()}
        for i in range(n):
            self._sample(feeds, i, {k: b[i : i + 1] for k, b in self.buffers.items()})

    def _sample(self, feeds: dict[str, np.ndarray], i: int, into: dict[str, np.ndarray]) -> None:
        """Run sample `i` of `feeds`, each output named in `into` written into its array there."""
        io = self.session.io_binding()
        alive = [np.ascontiguousarray(v[i : i + 1]) for v in feeds.values()]  # until the run is done
        for name, v in zip(feeds, alive):
            io.bind_cpu_input(name, v)
        for name, out in into.items():
            io.bind_output(name, "cpu", 0, out.dtype, out.shape, out.ctypes.data)
        self.session.run_with_iobinding(io, QUIET)  # a failure falls back to a plain run, which reports it
        # ONNX Runtime may hand over a value rather than write it into the bound array (as it does for a fetched
        # graph input); such a value is copied in.
        for out, value in zip(into.values(), io.get_outputs()):
            if value.data_ptr() != out.ctypes.data:
                out[...] = value.numpy()
