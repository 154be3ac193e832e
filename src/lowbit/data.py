"""Calibration and evaluation data: files, image folders or iterables, streamed as validated batches.

Every source is turned into a stream of "chunks" (one file, one image, one item of an iterable),
each checked against the model's inputs and then cut and re-glued into batches of a fixed size,
so at most one batch of samples is materialised at a time.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from lowbit.errors import LowbitError

from .arrays import load_arrays, read_headers, release
from .data_checks import (
    as_batch,
    batch_axes_for,
    check_arrays,
    clean_batch,
    clean_constant,
    concat_batches,
    front,
    front_spec,
    item_arrays,
    same_dynamic_dims,
)
from .images import IMAGE_SUFFIXES, ImagePreprocess, image_input, load_image

ARRAY_SUFFIXES = (".npy", ".npz")
_ACCEPTED = "a .npy/.npz file, or a folder of .npy/.npz files or of .jpg/.jpeg/.png/.bmp images"

Batch = dict[str, np.ndarray]
# Input name -> the axis its samples are stacked on, or None: constant across samples (one value, no batch axis).
BatchAxes = Mapping[str, int | None]


@dataclass(frozen=True)
class InputSpec:
    """One model input; ints in `shape` are fixed dims, str/None are dynamic (dim 0 is the batch)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


def input_specs(model: str | os.PathLike | onnx.ModelProto) -> list[InputSpec]:
    """Read the graph inputs of an ONNX model, skipping inputs that are really initializers."""
    from .graph.io import load_proto

    if not isinstance(model, onnx.ModelProto):
        from .runtimes.ort import is_ort_format, ort_format_input_specs

        if is_ort_format(model):
            return ort_format_input_specs(model)
    # Only the inputs are read: no weights, no checker (whoever runs the model loads and checks all of it).
    proto = model if isinstance(model, onnx.ModelProto) else load_proto(model, check=False, external_data=False)
    graph = proto.graph
    weights = {t.name for t in graph.initializer} | {t.values.name for t in graph.sparse_initializer}
    specs = []
    for inp in graph.input:
        if inp.name in weights:
            continue
        if not inp.type.HasField("tensor_type"):
            raise LowbitError(f"model input '{inp.name}' is not a tensor; only tensor inputs are supported")
        tt = inp.type.tensor_type
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        except (KeyError, TypeError, ValueError):
            raise LowbitError(f"model input '{inp.name}' has unsupported element type {tt.elem_type}") from None
        if not tt.HasField("shape"):
            raise LowbitError(f"model input '{inp.name}' has no shape; re-export the model with input shapes declared")
        # dim_value 0 is how some exporters spell "unknown", so treat it as dynamic.
        shape = tuple(
            d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None) for d in tt.shape.dim
        )
        specs.append(InputSpec(inp.name, dtype, shape))
    return specs


class DataSource:
    """Iterates batches: dict input-name -> np.ndarray with a leading batch dim.

    `num_samples` is the number of samples the iteration will yield, or None when it can't be known
    up front (general iterables). A source built on an iterator or generator can be iterated once;
    a second iteration raises LowbitError. Sources built on paths, lists or tuples can be re-iterated.
    """

    def __init__(
        self,
        chunks: Callable[[], Iterator[tuple[str, Mapping[str, Any]]]],
        specs: list[InputSpec],
        batch_size: int,
        fixed_batch: bool,
        limit: int | None,
        num_samples: int | None,
        one_shot: bool,
        inputs: list[InputSpec] | None = None,
        axes: dict[str, int | None] | None = None,
    ) -> None:
        self.specs = specs  # the inputs with a batch axis, batch-first (as `front_spec` turns them)
        self.inputs = inputs if inputs is not None else specs  # every model input, as the model declares it
        self.axes = axes if axes is not None else {sp.name: 0 for sp in specs}
        self.batch_size = batch_size
        self.num_samples = num_samples
        self._chunks = chunks
        self._fixed_batch = fixed_batch
        self._limit = limit
        self._one_shot = one_shot
        self._used = False

    def __iter__(self) -> Iterator[Batch]:
        if self._one_shot and self._used:
            raise LowbitError(
                "this data source wraps a one-shot iterator that was already consumed; "
                "pass a list or a path to iterate again"
            )
        self._used = True
        return self._batches()

    def count(self, batch: Batch) -> int:
        """How many samples a batch this source yielded holds (its batch axis need not be the first)."""
        for sp in self.specs:
            axis = self.axes[sp.name]
            assert axis is not None  # self.specs are the inputs with a batch axis
            return int(batch[sp.name].shape[axis])
        return 1  # every input is constant across samples: one sample per batch

    def _out(self, batch: Batch, consts: Batch) -> Batch:
        """A batch as the model takes it: each batch axis back in its place, constant inputs beside."""
        out = {k: np.moveaxis(v, 0, self.axes[k] or 0) for k, v in batch.items()}
        return {sp.name: out[sp.name] if sp.name in out else consts[sp.name] for sp in self.inputs}

    def _batches(self) -> Iterator[Batch]:
        pending: list[Batch] = []
        have = 0
        left = self._limit if self._limit is not None else float("inf")
        consts: Batch = {}
        for where, raw in self._chunks():
            arrays, now = front(where, raw, self.inputs, self.axes)
            now = {k: clean_constant(where, sp, now[k]) for sp in self.inputs if (k := sp.name) in now}
            n = check_arrays(where, arrays, self.specs)[0] if self.specs else 1
            full = {s.name: as_batch(arrays[s.name], s) for s in self.specs}
            moved = bool(pending) and any(not np.array_equal(now[k], consts[k]) for k in now)
            changed = moved or any(full[k].shape[1:] != pending[0][k].shape[1:] for k in full if pending)
            if changed and not self._fixed_batch:
                # A constant input changed value, or a dynamic dimension changed size (audio clips of several
                # lengths): the samples so far form a batch of their own. A fixed batch size must be filled, so
                # there `concat` (or the check below) says what to fix.
                yield self._out(concat_batches(pending), consts)
                pending, have = [], 0
            if pending and moved:
                raise LowbitError(
                    f"a constant input changes value in {where} within one batch, but the model's batch size is "
                    f"fixed at {self.batch_size}; give it one value for all samples, or re-export with a dynamic batch"
                )
            consts = now
            start = 0
            while start < n and left > 0:
                # Slice only what fits in the current batch, so a memory-mapped file is read piecewise.
                stop = int(min(n, start + self.batch_size - have, start + left))
                pending.append({s.name: clean_batch(where, s, start, full[s.name][start:stop]) for s in self.specs})
                for s in self.specs:  # copied: a mapped file's pages of these samples need not stay in memory
                    release(full[s.name][start:stop])
                have += stop - start
                left -= stop - start
                start = stop
                if have == self.batch_size:
                    yield self._out(concat_batches(pending), consts)
                    pending, have = [], 0
            if left <= 0:
                break  # before fetching another chunk: a generator is not read past the limit
        if pending:
            if self._fixed_batch:
                warnings.warn(
                    f"dropping the last {have} samples: the model's batch size is fixed at {self.batch_size}",
                    stacklevel=2,
                )
            else:
                yield self._out(concat_batches(pending), consts)


def open_data(
    source: str | os.PathLike | Iterable[Any],
    specs: list[InputSpec],
    batch_size: int = 8,
    preprocess: ImagePreprocess | None = None,
    limit: int | None = None,
    *,
    what: str = "calibration data",
    batch_axes: BatchAxes | None = None,
) -> DataSource:
    """Open `source` (path to .npy/.npz, folder of arrays or images, or an iterable) as a DataSource.

    `what` only changes the wording of "not found" errors (e.g. "evaluation data").
    A bare ndarray or dict is taken as one item, not iterated row by row.
    `batch_axes`: input name -> the axis its samples are stacked on (recurrent state [2, B, 64]: 1), or None for an
    input constant across samples (a sample rate; 0-d inputs are constant without saying). Others: axis 0.
    """
    inputs = list(specs)
    if not inputs:
        raise LowbitError("the model has no inputs to feed data to")
    axes = batch_axes_for(inputs, batch_axes)
    specs = [front_spec(s, axis) for s in inputs if (axis := axes[s.name]) is not None]
    for label, value in (("batch_size", batch_size), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LowbitError(f"{label} must be a positive integer, got {value!r}")
    fixed = [s.shape[0] for s in specs if isinstance(s.shape[0], int)]
    if len(set(fixed)) > 1:
        raise LowbitError(f"model inputs disagree on the fixed batch size ({sorted(set(fixed))}); re-export the model")
    batch = fixed[0] if fixed else batch_size if specs else 1
    single = not specs  # nothing has a batch axis: one sample per batch

    def finish(chunks, total: int | None, one_shot: bool = False) -> DataSource:
        if total is not None:
            total = min(total, limit) if limit is not None else total
            if fixed:
                total -= total % batch
        return DataSource(chunks, specs, batch, bool(fixed) or single, limit, total, one_shot, inputs, axes)

    def count(where: str, arrays: Mapping[str, Any]) -> int:
        return check_arrays(where, front(where, arrays, inputs, axes)[0], specs)[0] if specs else 1

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise LowbitError(f"{what} not found: {path}; expected {_ACCEPTED}")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
            arrays = [p for p in files if p.suffix.lower() in ARRAY_SUFFIXES]
            images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
            if arrays and images:
                raise LowbitError(f"{path} mixes array files and images; keep one kind of data per folder")
            if images:
                pre = preprocess if preprocess is not None else ImagePreprocess()
                name = image_input(inputs, pre)
                return finish(lambda: ((str(p), {name: load_image(p, pre)}) for p in images), len(images))
            if not arrays:
                raise LowbitError(
                    f"no usable data files in {path}; expected .npy/.npz files or .jpg/.jpeg/.png/.bmp images"
                )
        elif not path.is_file():
            # A FIFO, socket or device would block or stream forever; only regular files are read.
            raise LowbitError(f"{what} {path} is not a regular file (a pipe, socket or device); save it as {_ACCEPTED}")
        elif path.suffix.lower() in ARRAY_SUFFIXES:
            arrays = [path]
        else:
            raise LowbitError(f"unsupported data file {path}; expected {_ACCEPTED}")
        # Headers only: catches shape/dtype/name mistakes before any long run starts, and counts samples.
        headers = {p: read_headers(p, inputs) for p in arrays}
        total = sum(count(str(p), h) for p, h in headers.items())
        if fixed and batch > 1:  # else batches split where the shape changes (`DataSource._batches`)
            same_dynamic_dims({p: front(str(p), h, inputs, axes)[0] for p, h in headers.items()}, specs)
        return finish(lambda: ((str(p), load_arrays(p, inputs, limit, axes)) for p in arrays), total)

    if isinstance(source, (np.ndarray, Mapping)):
        source = [source]
    if not isinstance(source, Iterable):
        raise LowbitError(f"cannot read data from a {type(source).__name__}; pass a path or an iterable of arrays")

    def items() -> Iterator[tuple[str, Mapping[str, Any]]]:
        for i, item in enumerate(source):
            yield item_arrays(i, item, inputs)

    if isinstance(source, (list, tuple)):
        # Shapes are known without reading data, so count (and validate) up front.
        total = sum(count(where, arrays) for where, arrays in items())
        return finish(items, total)
    return finish(items, None, one_shot=iter(source) is source)
