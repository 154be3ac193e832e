"""Checks on calibration and evaluation data against the model's inputs: names, shapes, dtypes, batch axes,
NaN/Inf, and whether samples can share a batch. Each failure is one line that names the input, the sample and
the fix."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .arrays import Header, pick_keys, shape_text
from .errors import LowbitError

if TYPE_CHECKING:
    from .data import Batch, BatchAxes, InputSpec


def item_arrays(i: int, item: Any, specs: list[InputSpec]) -> tuple[str, dict[str, np.ndarray]]:
    where = f"item {i} of the data iterable"
    if isinstance(item, Mapping):
        return where, {str(k): np.asarray(v) for k, v in item.items()}
    if isinstance(item, np.ndarray) or hasattr(item, "__array__"):
        if len(specs) != 1:
            names = ", ".join(s.name for s in specs)
            raise LowbitError(
                f"{where} is an array but the model has {len(specs)} inputs ({names}); yield dicts keyed by input name"
            )
        return where, {specs[0].name: np.asarray(item)}
    raise LowbitError(f"{where} is a {type(item).__name__}; yield numpy arrays or dicts of input name -> array")


def check_arrays(where: str, arrays: Mapping[str, Any], specs: list[InputSpec]) -> tuple[int, dict[str, str]]:
    """Validate names, shapes and dtypes (metadata only); return the sample count and name -> key."""
    take = pick_keys(where, set(arrays), specs)
    counts = {}
    for s in specs:
        a = arrays[take[s.name]]
        if a.dtype.hasobject:
            # Object arrays can only be loaded by unpickling, which can run arbitrary code.
            raise LowbitError(
                f"input '{s.name}' in {where} holds Python objects (pickled), which lowbit never loads; "
                "use a numeric array"
            )
        shape = tuple(a.shape)
        rank = len(s.shape)
        full = shape if len(shape) == rank else (1, *shape) if len(shape) == rank - 1 else None
        if full is None or any(isinstance(d, int) and d != g for d, g in zip(s.shape[1:], full[1:])):
            raise LowbitError(f"input '{s.name}': expected shape {shape_text(s.shape)}, got {shape} in {where}")
        if a.dtype != s.dtype and not (a.dtype.kind == "f" and s.dtype.kind == "f"):
            raise LowbitError(
                f"input '{s.name}': expected dtype {s.dtype}, got {a.dtype} in {where}; convert the data with .astype"
            )
        counts[s.name] = full[0]
    if len(set(counts.values())) > 1:
        # A first axis of fixed size > 1 (a recurrent state [25]) is often no batch axis at all.
        fixed = [f"{s.name}={s.shape[0]}" for s in specs if isinstance(s.shape[0], int) and s.shape[0] > 1]
        # Spelled out for every input: a graph network's nodes, edges and graph slots ([num_nodes, F],
        # [2, num_edges], [num_graphs]) have no batch axis at all, and a "..." left the user to guess the rest.
        every = " ".join(f"{s.name}=none" for s in specs[:12]) + (" ..." if len(specs) > 12 else "")
        none = (
            f"; inputs whose first axis has a fixed size ({', '.join(fixed[:3])}{', ...' if len(fixed) > 3 else ''}) "
            "may have no batch axis"
            if fixed
            else ""
        ) + f"; if each file is one whole sample (a graph's nodes and edges), --batch-axis {every} takes it whole"
        raise LowbitError(
            f"inputs hold different numbers of samples in {where}: {counts}; give every input the same count, or "
            f"name an input whose batch axis is not the first ({_named_batch_axes(specs)})" + none
        )
    return next(iter(counts.values())), take


def _named_batch_axes(specs: list[InputSpec]) -> str:
    """The --batch-axis a model's own shapes name: a recurrent state [3, 'batch', 512] beside inputs whose first
    axis is 'batch' (VoiceFilter-Lite's h0 and c0) has its batch on axis 1. A generic example when none does."""
    firsts = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
    found = [
        f"{s.name}={k}"
        for s in specs
        if s.shape and s.shape[0] not in firsts
        for k in [next((k for k, d in enumerate(s.shape) if k and d in firsts), 0)]
        if k
    ]
    if not found or len(firsts) != 1:  # first axes named apart (num_nodes, num_edges): no one batch to follow
        return "--batch-axis state=1, batch_axes={'state': 1}"
    return f"their shapes put the batch there: --batch-axis {' '.join(found)}"


def batch_axes_for(specs: list[InputSpec], given: BatchAxes | None) -> dict[str, int | None]:
    """Every input's batch axis: as given, None (constant) for a 0-d input, else 0; names and axes checked."""
    given = dict(given or {})
    names = [s.name for s in specs]
    for name in given:
        if name not in names:
            raise LowbitError(
                f"a batch axis is given for '{name}', which is not a model input (inputs: {', '.join(names)}); "
                "check the name"
            )
    out: dict[str, int | None] = {}
    for s in specs:
        rank = len(s.shape)
        axis = given[s.name] if s.name in given else (0 if rank else None)
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int) or not -rank <= axis < rank):
            raise LowbitError(
                f"batch axis {axis!r} for input '{s.name}' does not fit its rank {rank} (shape {tuple(s.shape)}); "
                f"give an axis from 0 to {rank - 1}, or none for an input constant across samples"
            )
        out[s.name] = None if axis is None else axis % rank
    return out


def front_spec(spec: InputSpec, axis: int) -> InputSpec:
    """The input's spec with its batch axis moved first: how batches are cut and glued inside a DataSource."""
    shape = list(spec.shape)
    return dataclasses.replace(spec, shape=(shape.pop(axis), *shape))


def front(
    where: str, arrays: Mapping[str, Any], inputs: list[InputSpec], axes: Mapping[str, int | None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One chunk's arrays (or headers) keyed by input name, batch axes moved first; and its constant inputs."""
    take = pick_keys(where, set(arrays), inputs)
    batched, consts = {}, {}
    for s in inputs:
        a, axis = arrays[take[s.name]], axes[s.name]
        if axis is None:
            consts[s.name] = a
            check_constant(where, s, a)
        elif axis and len(a.shape) == len(s.shape):  # a whole batch: its samples along `axis`
            shape = list(a.shape)
            moved = (shape.pop(axis), *shape)
            batched[s.name] = Header(moved, a.dtype) if isinstance(a, Header) else np.moveaxis(a, axis, 0)
        else:  # batch-first already, or one sample without its batch axis
            batched[s.name] = a
    return batched, consts


def check_constant(where: str, s: InputSpec, a: Any) -> None:
    shape = tuple(a.shape)
    if len(shape) != len(s.shape) or any(isinstance(d, int) and d != g for d, g in zip(s.shape, shape)):
        raise LowbitError(
            f"input '{s.name}' is constant across samples (no batch axis): expected shape {tuple(s.shape)}, got "
            f"{shape} in {where}; give one value per item or file, or name its batch axis (--batch-axis "
            f"{s.name}=K)"
        )
    if a.dtype != s.dtype and not (a.dtype.kind == "f" and s.dtype.kind == "f"):
        raise LowbitError(
            f"input '{s.name}': expected dtype {s.dtype}, got {a.dtype} in {where}; convert the data with .astype"
        )


def clean_constant(where: str, s: InputSpec, a: np.ndarray) -> np.ndarray:
    out = np.array(a, dtype=s.dtype)
    if out.dtype.kind in "fc" and not np.isfinite(out).all():
        raise LowbitError(f"input '{s.name}' has NaN or Inf values in {where}; fix or drop that sample")
    return out


def as_batch(a: np.ndarray, spec: InputSpec) -> np.ndarray:
    return a[np.newaxis] if a.ndim == len(spec.shape) - 1 else a


def clean_batch(where: str, spec: InputSpec, offset: int, a: np.ndarray) -> np.ndarray:
    # Copy: detaches the batch from memory-mapped files and from the caller's arrays.
    with np.errstate(over="ignore"):  # overflow becomes Inf, reported below with context
        out = np.array(a, dtype=spec.dtype)
    if out.dtype.kind in "fc":
        bad = ~np.isfinite(out).reshape(len(out), -1).all(axis=1)
        if bad.any():
            cast = f" (after casting {a.dtype} to {spec.dtype})" if a.dtype != spec.dtype else ""
            raise LowbitError(
                f"input '{spec.name}' has NaN or Inf values{cast} in sample {offset + int(np.argmax(bad))} of {where}; "
                "fix or drop that sample"
            )
    return out


def concat_batches(pieces: list[Batch]) -> Batch:
    if len(pieces) == 1:
        return pieces[0]
    for name in pieces[0]:
        shapes = sorted({p[name].shape[1:] for p in pieces})
        if len(shapes) > 1:
            raise LowbitError(
                f"input '{name}': samples batched together differ in shape ({shapes[0]} and {shapes[1]} after "
                f"the batch axis); {SAME_SHAPE_FIX}"
            )
    return {name: np.concatenate([p[name] for p in pieces]) for name in pieces[0]}


SAME_SHAPE_FIX = "pad the samples to one length, or use a batch size of 1 (--batch-size 1)"


def same_dynamic_dims(headers: Mapping[Path, Mapping[str, Any]], specs: list[InputSpec]) -> None:
    """Files whose samples differ in a dynamic dimension cannot share a batch: say so before calibration."""
    for s in specs:
        seen: dict[tuple, Path] = {}
        for path, arrays in headers.items():
            key = pick_keys(str(path), set(arrays), specs)[s.name]
            shape = tuple(arrays[key].shape)
            dims = shape[1:] if len(shape) == len(s.shape) else shape
            seen.setdefault(dims, path)
            if len(seen) > 1:
                (a, pa), (b, pb) = list(seen.items())[:2]
                raise LowbitError(
                    f"input '{s.name}': samples in {pa} have shape {a} after the batch axis but those in {pb} "
                    f"have {b}; {SAME_SHAPE_FIX}"
                )
