"""Evaluate a model on data: accuracy against labels, and fidelity against a reference (float) model.

Data is streamed batch by batch; only the outputs are kept. The result is an `EvalResult`; its metrics are
real floats (the SQNR of a model compared with itself is +inf), and its JSON form follows jsonable.py (null).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from ..data import BatchAxes, ImagePreprocess, InputSpec, input_specs, open_data
from ..errors import LowbitError
from ..graph.io import model_name
from ..runtimes.executorch import ExecutorchSession, is_pte
from ..runtimes.litert import LiteRTSession, is_tflite
from ..runtimes.ort import Mode, is_ort_format, join, output_batch_axes, run_batch, session
from .jsonable import JsonResult
from .outputs import check_kind_names, output_fidelity

ModelLike = str | os.PathLike | onnx.ModelProto
MODES = ("kernels", "simulate")


@dataclasses.dataclass
class EvalResult(JsonResult):
    """What `evaluate` measured. `accuracy`: {"top1", "top5" (None under 5 classes)} with labels; `outputs`:
    per output name, with a reference, the measures that fit its kind (`outputs.output_fidelity`): "kind", "why",
    "task" (the headline), "top1_agreement" (None unless class scores), "cosine", "sqnr_db", "max_abs_error"."""

    model: str
    samples: int
    mode: str
    runtime: str
    accuracy: dict[str, float | None] | None = None
    outputs: dict[str, dict[str, Any]] | None = None
    reference: str | None = None
    reference_runtime: str | None = None


def evaluate(
    model: ModelLike,
    data: str | os.PathLike | Iterable[Any],
    labels: str | os.PathLike | Sequence[int] | np.ndarray | None = None,
    reference: ModelLike | None = None,
    mode: Mode = "kernels",
    batch_size: int = 32,
    preprocess: ImagePreprocess | None = None,
    limit: int | None = None,
    progress: bool = True,
    kinds: Mapping[str, str] | None = None,
    *,
    workers: int = 1,
    ray_address: str | None = None,
    batch_axes: BatchAxes | None = None,
) -> EvalResult:
    """Run `model` over `data`; report top-1/top-5 accuracy (with `labels`) and per-output fidelity (with `reference`).

    `labels`: a .npy file (int array of shape (N,)), a text file with one integer per line, or an array.
    `mode`: "kernels" (ORT default optimizations: fused integer kernels) or "simulate" (optimizations off).
    The reference always runs with default optimizations, as the float model it normally is.
    A `.tflite` model (or reference) runs in LiteRT with XNNPACK; it takes the same NCHW data as its ONNX twin.
    A `.ort` model (or reference) runs in ONNX Runtime as it is, in mode "kernels" only.
    `kinds`: {output name: kind} overriding the guessed kind of an output (outputs.py: class_scores, dense_map,
    sequence, boxes, embedding, values).
    `workers` > 1 (or a `ray_address`): Ray tasks run shares of the data (a path) and the driver joins their outputs
    in data order, so every number is the same as in one process (`shard.py`, `pip install lowbit[ray]`).
    `batch_axes`: the axis each input's samples are stacked on when not 0, or None for an input constant across
    samples (see `open_data`), as for calibration.
    """
    if mode not in MODES:
        raise LowbitError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "simulate" and is_pte(model):
        raise LowbitError(
            f"mode simulate runs an ONNX model's quantized math in float; it does not apply to {_name(model)}, "
            "an ExecuTorch program (use mode kernels)"
        )
    if mode == "simulate" and is_tflite(model):
        raise LowbitError(
            "mode simulate runs an ONNX model's quantized math in float; it does not apply to "
            f"{_name(model)}, a .tflite file (use mode kernels)"
        )
    if mode == "simulate" and is_ort_format(model):
        raise LowbitError(
            f"mode simulate runs an ONNX model's quantized math in float; {_name(model)} is an ORT-format "
            "file with its graph already optimized (use mode kernels, or simulate its ONNX model)"
        )
    lite = file_session(model)
    ref_lite = file_session(reference) if reference is not None else None
    specs = lite.input_specs() if lite is not None else input_specs(model)
    if reference is not None:
        ref_specs = ref_lite.input_specs() if ref_lite is not None else input_specs(reference)
        _check_reference_inputs(specs, ref_specs, _name(reference))
        if lite is not None:  # a .tflite runs any batch; a reference with a fixed one sets it for both
            fixed = {r.name: r.shape[0] for r in ref_specs if r.shape and isinstance(r.shape[0], int)}
            specs = [
                dataclasses.replace(s, shape=(fixed[s.name], *s.shape[1:])) if s.name in fixed else s for s in specs
            ]
    source = open_data(
        data,
        specs,
        batch_size=batch_size,
        preprocess=preprocess,
        limit=limit,
        what="evaluation data",
        batch_axes=batch_axes,
    )
    wanted = load_labels(labels) if labels is not None else None
    counted = wanted is not None and _match_labels(wanted, labels, data, specs, batch_size, preprocess, batch_axes)

    sess = lite if lite is not None else _session(model, mode)
    ref_sess = ref_lite if ref_lite is not None else _session(reference, "kernels") if reference is not None else None
    out_names = [o.name for o in sess.get_outputs()]
    check_kind_names(kinds, out_names)
    if ref_sess is not None:
        _check_outputs({o.name: o.shape for o in sess.get_outputs()}, {o.name: o.shape for o in ref_sess.get_outputs()})
    # Only outputs something is computed from are kept: all with a reference, else the scores for accuracy.
    keep = out_names if ref_sess is not None else out_names[:1] if wanted is not None else []

    def check_first(res: dict[str, np.ndarray], ref_res: dict[str, np.ndarray] | None) -> None:
        if ref_res is not None:  # static shapes can be missing; the first real outputs settle it
            _check_outputs({n: res[n].shape for n in out_names}, {n: ref_res[n].shape for n in out_names})
        if wanted is not None:
            _check_label_range(wanted, res[out_names[0]].shape, out_names[0])

    bar = tqdm(
        total=source.num_samples, desc="evaluating", unit="sample", disable=None if progress else True, leave=False
    )
    try:
        if workers > 1 or ray_address is not None:
            from ..shard import evaluate_sharded

            outs, refs, seen = evaluate_sharded(
                (model, mode, reference, data, specs, batch_size, preprocess, limit, keep, batch_axes),
                workers,
                ray_address,
                bar,
            )
            if seen:  # the workers ran the checks' inputs; check them here, as one process does first
                check_first({n: v[0] for n, v in outs.items()}, {n: v[0] for n, v in refs.items()} or None)
        else:
            outs, refs, seen = collect(sess, ref_sess, source, keep, bar=bar, first=check_first)
    finally:
        bar.close()
    if seen == 0:
        raise LowbitError(f"no samples to evaluate in {_name(data)}; check the data (or --limit)")
    if wanted is not None and not counted and (len(wanted) < seen or (limit is None and len(wanted) != seen)):
        raise LowbitError(
            f"{_name(labels)} has {len(wanted)} labels but {_name(data)} gave {seen} samples; "
            "give exactly one label per sample"
        )

    result = EvalResult(
        model=_name(model),
        samples=seen,
        mode=mode,
        runtime=_runtime(lite),
        reference=_name(reference) if reference is not None else None,
        reference_runtime=_runtime(ref_lite) if reference is not None else None,
    )
    axes = output_batch_axes(sess)  # the reference has the same outputs (checked above)
    if wanted is not None:
        logits = join(outs[out_names[0]], axes.get(out_names[0], 0), seen)
        result.accuracy = _accuracy(logits.reshape(len(logits), -1), wanted[:seen])
    if ref_sess is not None:
        result.outputs = {
            n: output_fidelity(
                join(refs[n], axes.get(n, 0), seen), join(outs[n], axes.get(n, 0), seen), n, (kinds or {}).get(n)
            )
            for n in out_names
        }
    return result


def collect(
    sess: Any,
    ref_sess: Any,
    batches: Iterable[dict[str, np.ndarray]],
    keep: list[str],
    select: Any = None,
    chunk: int = 1,
    bar: Any = None,
    first: Any = None,
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]], int]:
    """Run the model (and the reference) over the batches; the outputs in `keep` and every reference output, per
    batch, and the number of samples. With `select`, only batches of the chunks it accepts run (`shard.py`);
    `first(outputs, reference outputs)` checks the first batch's results before the rest run."""
    out_names = [o.name for o in sess.get_outputs()]
    in_names = {i.name for i in sess.get_inputs()}
    ref_in = {i.name for i in ref_sess.get_inputs()} if ref_sess is not None else set()
    ref_names = [o.name for o in ref_sess.get_outputs()] if ref_sess is not None else []
    outs: dict[str, list[np.ndarray]] = {n: [] for n in keep}
    refs: dict[str, list[np.ndarray]] = {n: [] for n in out_names} if ref_sess is not None else {}
    seen = 0
    count = getattr(batches, "count", None)
    for b, batch in enumerate(batches):
        if select is not None and not select(b // chunk):
            continue
        # the source knows where each input's batch axis is (a time-first input's is not the first)
        n_batch = count(batch) if count is not None else len(next(iter(batch.values())))
        feeds = {k: v for k, v in batch.items() if k in in_names}
        res = dict(zip(out_names, run_batch(sess, None, feeds, n_batch, "the model")))
        if ref_sess is not None:
            ref_feeds = {k: v for k, v in batch.items() if k in ref_in}
            ref_res = dict(zip(ref_names, run_batch(ref_sess, None, ref_feeds, n_batch, "the reference model")))
            for n in out_names:
                refs[n].append(np.atleast_1d(ref_res[n]))
        if first is not None and seen == 0:
            first(res, ref_res if ref_sess is not None else None)
        for n in keep:
            outs[n].append(np.atleast_1d(res[n]))
        seen += n_batch
        if bar is not None:
            bar.update(n_batch)
    return outs, refs, seen


def open_sessions(model: ModelLike, mode: Mode, reference: ModelLike | None) -> tuple[Any, Any]:
    """The model's session (LiteRT for a .tflite) and the reference's (None without one)."""
    sess = file_session(model) or _session(model, mode)
    if reference is None:
        return sess, None
    return sess, file_session(reference) or _session(reference, "kernels")


def _name(thing: Any) -> str:
    return model_name(thing)


def file_session(model: Any) -> LiteRTSession | ExecutorchSession | None:
    """A .tflite in LiteRT, a .pte in ExecuTorch; None for a model ONNX Runtime runs."""
    if is_tflite(model):
        return LiteRTSession(model)
    return ExecutorchSession(model) if is_pte(model) else None


def _runtime(lite: LiteRTSession | ExecutorchSession | None) -> str:
    if lite is None:
        return "onnxruntime"
    if isinstance(lite, ExecutorchSession):
        return "executorch (XNNPACK)"
    return "litert (XNNPACK)" if lite.delegate_partitions() else "litert"


def _session(model: ModelLike, mode: Mode):
    # session() takes str or Path paths; ONNX Runtime reads any other os.PathLike through os.fspath too
    try:
        return session(os.fspath(model) if isinstance(model, os.PathLike) else model, mode)
    except Exception as e:  # ORT raises its own exception types for models it cannot load
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"ONNX Runtime cannot load {_name(model)} ({first}); check or re-export the model") from None


def _shape_text(shape: Sequence[Any]) -> str:
    dims = ["N" if i == 0 else str(d) if isinstance(d, int) else (d or "?") for i, d in enumerate(shape)]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _check_reference_inputs(specs: list[InputSpec], ref_specs: list[InputSpec], ref_name: str) -> None:
    mine = {s.name: s for s in specs}
    for r in ref_specs:
        s = mine.get(r.name)
        if s is None:
            raise LowbitError(
                f"reference {ref_name} takes input '{r.name}', which the model does not have; "
                "compare models with the same inputs"
            )
        if len(s.shape) != len(r.shape) or any(
            isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(s.shape[1:], r.shape[1:])
        ):
            raise LowbitError(
                f"input '{r.name}' differs: model takes {_shape_text(s.shape)}, reference takes "
                f"{_shape_text(r.shape)}; compare models with the same inputs"
            )


def _check_outputs(model_shapes: dict[str, Sequence[Any]], ref_shapes: dict[str, Sequence[Any]]) -> None:
    """Same output names, and the same shapes apart from the batch axis (unknown dims match anything)."""
    for name in model_shapes:
        if name not in ref_shapes:
            raise LowbitError(
                f"model output '{name}' is not an output of the reference (which has "
                f"{', '.join(ref_shapes)}); compare models with the same outputs"
            )
    for name in ref_shapes:
        if name not in model_shapes:
            raise LowbitError(
                f"reference output '{name}' is not an output of the model (which has "
                f"{', '.join(model_shapes)}); compare models with the same outputs"
            )
    for name, a in model_shapes.items():
        b = ref_shapes[name]
        if len(a) != len(b) or any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a[1:], b[1:])):
            raise LowbitError(
                f"output '{name}' differs: model gives {_shape_text(a)}, reference gives "
                f"{_shape_text(b)}; compare models with the same outputs"
            )


def load_labels(labels: str | os.PathLike | Sequence[int] | np.ndarray) -> np.ndarray:
    """Class labels as a 1-D int array, from a .npy file, a text file (one integer per line) or a sequence."""
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels).expanduser()
        if not path.is_file():
            raise LowbitError(
                f"label file not found: {path}; expected a .npy int array or a text file with one integer per line"
            )
        if path.suffix.lower() == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise LowbitError(f"cannot read label file {path} ({first}); save it with numpy.save") from None
            where = str(path)
        else:
            arr = _read_text_labels(path)
            where = str(path)
    else:
        arr = np.asarray(labels)
        where = "the labels"
    if arr.ndim != 1:
        raise LowbitError(f"{where} has shape {arr.shape}; labels must be one integer class per sample, shape (N,)")
    if arr.dtype.kind not in "iu":
        raise LowbitError(f"{where} holds {arr.dtype} values; labels must be integers (class indices)")
    return arr.astype(np.int64)


def _read_text_labels(path: Path) -> np.ndarray:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise LowbitError(
            f"cannot read label file {path} ({type(e).__name__}); expected one integer per line"
        ) from None
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline or two is not a missing label
    values = []
    for i, line in enumerate(lines, 1):
        try:
            values.append(int(line.strip()))
        except ValueError:
            raise LowbitError(
                f"line {i} of label file {path} is {line.strip()!r}, not an integer; "
                "write one integer class index per line"
            ) from None
    return np.asarray(values, dtype=np.int64)


def _match_labels(
    wanted: np.ndarray,
    labels: Any,
    data: Any,
    specs: list[InputSpec],
    batch_size: int,
    preprocess: ImagePreprocess | None,
    batch_axes: BatchAxes | None = None,
) -> bool:
    """Labels must number the data's samples before --limit (and before dropping a partial fixed batch).

    Returns whether the count was checked; a generator's samples are only known after the run.
    """
    where = _name(labels)
    total = None
    if isinstance(data, (str, os.PathLike, list, tuple)):
        # Counting with a dynamic batch axis gives the raw sample count, cheaply (file headers only).
        loose = [dataclasses.replace(s, shape=(None, *s.shape[1:])) for s in specs]
        total = open_data(
            data, loose, batch_size=batch_size, preprocess=preprocess, what="evaluation data", batch_axes=batch_axes
        ).num_samples
    if total is not None and len(wanted) != total:
        raise LowbitError(
            f"{where} has {len(wanted)} labels but {_name(data)} has {total} samples; give exactly one label per sample"
        )
    return total is not None


def _check_label_range(wanted: np.ndarray, shape: tuple[int, ...], output: str) -> None:
    if len(shape) < 2 or int(np.prod(shape[1:])) != shape[-1]:
        raise LowbitError(
            f"output '{output}' has shape {shape}; accuracy needs (N, classes) scores as the first output"
        )
    classes = shape[-1]
    bad = np.flatnonzero((wanted < 0) | (wanted >= classes))
    if len(bad):
        i = int(bad[0])
        raise LowbitError(
            f"label {int(wanted[i])} (sample {i}) is out of range for output '{output}' with {classes} "
            f"classes; labels must be in 0..{classes - 1}"
        )


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    top1 = float(np.mean(logits.argmax(1) == labels))
    top5 = None
    if logits.shape[1] >= 5:
        # A label is in the top 5 when fewer than 5 classes score strictly higher than it.
        mine = logits[np.arange(len(labels)), labels]
        top5 = float(np.mean((logits > mine[:, None]).sum(1) < 5))
    return {"top1": top1, "top5": top5}
