"""ONNX Runtime sessions in the two ways a QDQ model can run.

`.ort` files (ORT format, `lowbit export --to ort`) load here too, by path: ONNX Runtime reads them directly.
Their graph is already optimized and is a flatbuffer, not ONNX protobuf, so they run only in "kernels" mode,
and the commands that read the ONNX graph (quantize, diagnose, report, lint) need the ONNX model instead.

"kernels": default graph optimizations fuse Q/DQ around ops into integer kernels (QLinearConv, QGemm, ...),
as deployment does. "simulate": optimizations off, so every op runs in float between Q/DQ pairs, which is
what the quantization math says the model computes.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort

from ..arrays import one_line
from ..data import InputSpec
from ..errors import LowbitError
from ..graph import external
from ..graph.io import external_files

Mode = Literal["kernels", "simulate"]


def is_ort_format(model: object) -> bool:
    """A path to an ORT-format model (by its `.ort` suffix, as ONNX Runtime itself tells the formats apart)."""
    return isinstance(model, (str, os.PathLike)) and Path(model).suffix.lower() == ".ort"


def ort_format_input_specs(path: str | os.PathLike) -> list[InputSpec]:
    """The inputs of a `.ort` file, read through an ONNX Runtime session (there is no ONNX graph to read)."""
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"model not found: {p}; check the path")
    try:
        sess = session(str(p))
    except Exception as e:  # ORT raises its own exception types for files it cannot load
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"ONNX Runtime cannot load {p} ({first}); check or re-export the model") from None
    specs = []
    for inp in sess.get_inputs():
        kind = inp.type.removeprefix("tensor(").removesuffix(")")
        try:
            dtype = np.dtype(_ORT_TYPES.get(kind, kind))
        except TypeError:
            raise LowbitError(f"model input '{inp.name}' of {p} has unsupported type {inp.type}") from None
        shape = tuple(d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) else None) for d in inp.shape)
        specs.append(InputSpec(inp.name, dtype, shape))
    return specs


_ORT_TYPES = {"float": "float32", "double": "float64", "float16": "float16", "bool": "bool", "string": "object"}


def session(
    model: str | Path | bytes | onnx.ModelProto, mode: Mode = "kernels", threads: int = 0, spin: bool = True
) -> ort.InferenceSession:
    """`spin=False`: worker threads sleep instead of busy-waiting between ops and runs (the same values, much less
    CPU on a small or shared machine; latency measurements keep ORT's default)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if mode == "kernels" else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4  # fatal only: every error reaches lowbit as an exception, said in one line
    if is_large(model):
        # ORT's CPU arena keeps every buffer it ever held until the session goes: a simulated run of a 2.5 GB
        # weight-only model, which dequantizes every weight, grew it to 1.9 GB (0.6 GB without it). And what
        # earlier sessions freed goes back to the system first.
        opts.enable_cpu_mem_arena = False
        external.trim_heap()
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if isinstance(model, onnx.ModelProto):
        return from_proto(model, opts)
    if isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def is_large(model: str | Path | bytes | onnx.ModelProto) -> bool:
    """Whether a model's weights reach `graph.external.FILE_BYTES` (files: with their external data)."""
    if isinstance(model, onnx.ModelProto):
        return external.has_external(model) or model.ByteSize() >= external.FILE_BYTES
    if isinstance(model, bytes):
        return len(model) >= external.FILE_BYTES
    p = Path(model)
    if not p.is_file():
        return False  # ONNX Runtime says what is wrong with it
    files = [p] if is_ort_format(p) else [p, *external_files(p)]
    return sum(f.stat().st_size for f in files if f.is_file()) >= external.FILE_BYTES


def from_proto(model: onnx.ModelProto, opts: ort.SessionOptions, folder: str | None = None) -> ort.InferenceSession:
    """A session of an in-memory model. `folder` is where the model's external data files are (a model loaded
    lazily: its skeleton is passed as bytes and ONNX Runtime maps the files from there). A large self-contained
    model is written to a temporary folder with external data and loaded by path (`graph.external.FILE_BYTES`)."""
    if external.has_external(model):
        if folder is None:
            raise ValueError("the model refers to external data files: pass the folder they are in")
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    if model.ByteSize() < external.FILE_BYTES:
        return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    # ONNX Runtime maps the data file: on POSIX the mapping outlives the folder, removed at once.
    with tempfile.TemporaryDirectory(prefix="lowbit-session-", ignore_cleanup_errors=True) as tmp:
        path = external.write_external(model, Path(tmp) / "model.onnx")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model that also outputs the named intermediate tensors (to observe or compare them)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            out.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            have.add(name)
    return out


def output_batch_axes(sess: Any) -> dict[str, int]:
    """Each output's batch axis: where its shape names the inputs' symbolic batch dimension (a recognizer's
    time-first logits [T, batch, C]: 1), else 0."""
    batch = {i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], str)}
    axes = {}
    for o in sess.get_outputs():
        named = [k for k, d in enumerate(o.shape or ()) if isinstance(d, str) and d in batch]
        axes[o.name] = named[0] if named else 0
    return axes


def join(chunks: list[np.ndarray], axis: int = 0, samples: int | None = None) -> np.ndarray:
    """Batches of one output as one array, samples first (concatenated along the output's batch `axis`).

    `samples`, the number of samples the chunks hold in all, settles outputs whose shapes do not say where the batch
    is: a recognizer exported with batch fixed at 1 gives time-first [T, 1, C] (often declared as something else),
    which joined on axis 0 would read as T * N samples. When `axis` does not add up to `samples`, the first axis
    that does is the batch axis; with none, one sample per chunk is stacked on a new axis 0."""
    if samples is not None and chunks and chunks[0].ndim and sum(c.shape[axis] for c in chunks) != samples:
        fits = [
            k
            for k in range(chunks[0].ndim)
            if sum(c.shape[k] for c in chunks) == samples and all(c.ndim == chunks[0].ndim for c in chunks)
        ]
        if fits:
            axis = fits[0]
        elif len(chunks) == samples and all(c.shape == chunks[0].shape for c in chunks):
            return np.stack(chunks)
    if 0 < axis < chunks[0].ndim:
        chunks = [np.moveaxis(c, axis, 0) for c in chunks]
    return np.concatenate(_padded(chunks))


def _padded(chunks: list[np.ndarray]) -> list[np.ndarray]:
    """Chunks whose dims after the batch axis differ (batches of sequences of different lengths) padded with zeros
    to the longest. Both sides of a comparison are padded alike, so cosine, SQNR and largest error are unchanged;
    the padded positions agree, which per-position agreement counts."""
    if len({c.shape[1:] for c in chunks}) <= 1 or len({c.ndim for c in chunks}) > 1:
        return chunks
    longest = tuple(int(m) for m in np.max([c.shape for c in chunks], axis=0)[1:])
    return [pad_to(c, longest) for c in chunks]


def pad_to(a: np.ndarray, trailing: tuple[int, ...]) -> np.ndarray:
    """`a` (samples first) padded with zeros after its data to the dims `trailing` past the batch axis."""
    if a.shape[1:] == tuple(trailing) or a.ndim != len(trailing) + 1:
        return a
    return np.pad(a, [(0, 0)] + [(0, max(0, m - d)) for m, d in zip(trailing, a.shape[1:])])


def run_all(
    sess: ort.InferenceSession, batches: Iterable[dict[str, np.ndarray]], samples: int | None = None
) -> list[np.ndarray]:
    """Every output, concatenated over batches, samples first (see `output_batch_axes`). `samples`: how many the
    batches hold, when the first input's first axis does not say (a time-first input); counted from it otherwise."""
    names = {i.name for i in sess.get_inputs()}
    outs: list[list[np.ndarray]] = []
    counted = 0
    for batch in batches:
        feeds = {k: v for k, v in batch.items() if k in names}
        n = len(next(iter(batch.values())))
        res = run_batch(sess, None, feeds, n, "the model")
        counted += n
        if not outs:
            outs = [[] for _ in res]
        for acc, r in zip(outs, res):
            acc.append(r)
    axes = output_batch_axes(sess)
    total = samples if samples is not None else counted
    return [join(o, axes.get(meta.name, 0), total) for o, meta in zip(outs, sess.get_outputs())]


def run_batch(sess: Any, names: list[str] | None, feeds: dict[str, np.ndarray], samples: int, what: str) -> list:
    """`sess.run`, with a failure said in one line. A batch that fails where its first sample alone runs is a graph
    that fixes its batch size at 1 although its inputs say otherwise (third-party exports often do): say so, with
    the fix, rather than ONNX Runtime's shape error."""
    try:
        return list(sess.run(names, feeds))
    except LowbitError:  # a LiteRT or ExecuTorch session's own one-line error already says what to do
        raise
    except Exception as e:  # ORT raises its own exception types; LiteRT and ExecuTorch sessions others
        first = short_error(e)
        if samples > 1 and _first_sample_runs(sess, names, feeds, samples):
            raise LowbitError(
                f"{what} fails on a batch of {samples} samples but runs on one: its graph fixes the batch size at 1 "
                f"(ONNX Runtime: {first}); rerun with --batch-size 1"
            ) from None
        raise LowbitError(f"{what} failed on this data: {first}{_time_first_hint(sess, samples)}") from None


def _time_first_hint(sess: Any, samples: int) -> str:
    """When a batch of several samples fails and an input's first axis is symbolic, that axis may not be a batch
    at all (madmom-style [frames, features] inputs): name the option that takes each file whole."""
    if samples <= 1 or not hasattr(sess, "get_inputs"):
        return ""
    names = [i.name for i in sess.get_inputs() if len(i.shape) >= 2 and not isinstance(i.shape[0], int)]
    if not names:
        return ""
    return (
        f"; if the first axis of {', '.join(names)} is not a batch of samples (a time-first [frames, features] "
        f"input), rerun with --batch-axis {names[0]}=none (each file whole is then one sample)"
    )


def short_error(e: Exception) -> str:
    """ONNX Runtime's message, first line, without the C++ source location and signature it carries."""
    return re.sub(r"/onnxruntime_src/\S+:\d+ [^(]*\([^)]*\)( const)? ", "", one_line(e))


def _first_sample_runs(sess: Any, names: list[str] | None, feeds: dict[str, np.ndarray], samples: int) -> bool:
    one = {k: v[:1] if v.ndim and v.shape[0] == samples else v for k, v in feeds.items()}
    try:
        sess.run(names, one)
    except Exception:  # not even one sample runs: the plain error says more
        return False
    return True


def cpu_has_vnni() -> bool | None:
    """Whether this x86 CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI); None if unknown."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_vnni" in flags or "avx_vnni" in flags
