"""Models past protobuf's 2 GB limit: written as `OUT.onnx` (the graph) + `OUT.onnx.data` (the weights).

Protobuf refuses to serialize a message of 2 GB or more, and a serialized copy of a large model doubles its
memory, so large models are never serialized whole. `external_form` streams every initializer of
`TENSOR_BYTES` or more into a data file, one tensor at a time, page-aligned (ONNX Runtime maps such files
instead of copying them), and returns the small graph-only "skeleton" that refers to it; the model passed in is
not changed. The skeleton records the data file's sha256 in `metadata_props` (`DATA_SHA256_KEY`), so the hash
of the `.onnx` file (which a lowbit plan records) also covers its weights.

When a model is written this way (`use_external`): always when the float model kept its weights in external
data, or when the serialized model would reach `LIMIT_BYTES`. Both thresholds are module constants so tests can
send a small model down the same path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx
import onnx_ir as ir
from google.protobuf.message import Message
from onnx import numpy_helper

# Past this serialized size a model is written with external data (protobuf's hard limit is 2 GiB; the margin
# leaves room for the graph and for ByteSize's estimate).
LIMIT_BYTES = 2**31 - 2**27
# Initializers of at least this many bytes go to the data file; smaller ones (shapes, scales) stay in the graph.
TENSOR_BYTES = 1024
# In-memory models at least this large (serialized) are handed to ONNX Runtime and the checker as a temporary file
# with external data, not as bytes: no serialized copy of the whole model in memory (none is possible past 2 GB),
# and ONNX Runtime maps the data file rather than copying it.
FILE_BYTES = 2**26
ALIGN = 4096
DATA_SHA256_KEY = "lowbit.external_data_sha256"


def data_path(model_path: str | os.PathLike) -> Path:
    """Where the external data of a model written by lowbit goes: `OUT.onnx.data` beside `OUT.onnx`."""
    p = Path(model_path)
    return p.with_name(p.name + ".data")


def has_external(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def use_external(proto: onnx.ModelProto, input_external: bool = False) -> bool:
    """Whether `proto` is written as model + data file: the float model had external data, or it is too big."""
    return input_external or has_external(proto) or proto.ByteSize() >= LIMIT_BYTES


def _copy_except(src: Message, dst: Message, skip: str) -> None:
    """Copy every set field of `src` into `dst` but the field named `skip` (no copy of what is skipped)."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if fd.is_repeated:
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _tensor_bytes(t: onnx.TensorProto) -> bytes:
    if t.data_location == onnx.TensorProto.EXTERNAL:
        raise ValueError(f"initializer '{t.name}' refers to external data; load it before writing the model")
    if t.HasField("raw_data"):
        return t.raw_data
    a = numpy_helper.to_array(t)  # typed fields (float_data, int32_data, ...): external data is raw little-endian
    return a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def external_form(proto: onnx.ModelProto, data: BinaryIO, location: str) -> onnx.ModelProto:
    """The skeleton of `proto` whose large initializers are written to `data` (referred to as `location`, a
    file name beside the model). One tensor's bytes are in memory at a time; `proto` is unchanged."""
    graph = onnx.GraphProto()
    _copy_except(proto.graph, graph, "initializer")
    digest = hashlib.sha256()
    offset = 0
    for t in proto.graph.initializer:
        inline = t.data_type == onnx.TensorProto.STRING or t.ByteSize() < TENSOR_BYTES  # strings cannot be raw
        if t.data_location != onnx.TensorProto.EXTERNAL and inline:
            graph.initializer.add().CopyFrom(t)
            continue
        raw = _tensor_bytes(t)
        pad = b"\0" * (-offset % ALIGN)
        for chunk in (pad, raw):
            data.write(chunk)
            digest.update(chunk)
        offset += len(pad)
        s = graph.initializer.add()
        s.name, s.data_type, s.doc_string = t.name, t.data_type, t.doc_string
        s.dims.extend(t.dims)
        s.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(raw)))):
            s.external_data.add(key=key, value=value)
        offset += len(raw)
        del raw
    skeleton = onnx.ModelProto()
    _copy_except(proto, skeleton, "graph")
    skeleton.graph.CopyFrom(graph)
    kept = [p for p in skeleton.metadata_props if p.key != DATA_SHA256_KEY]
    del skeleton.metadata_props[:]
    skeleton.metadata_props.extend(kept)
    skeleton.metadata_props.add(key=DATA_SHA256_KEY, value=digest.hexdigest())
    return skeleton


def write_external(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """`proto` as `path` + `path.data` (not atomic: for temporary copies; outputs go through `pipeline.save`)."""
    p = Path(path)
    with data_path(p).open("wb") as f:
        skeleton = external_form(proto, f, data_path(p).name)
    p.write_bytes(skeleton.SerializeToString())
    return p


def external_base(model: ir.Model) -> str | None:
    """The folder a lazily loaded model's external weights are read from (None: all weights in memory)."""
    for v in model.graph.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            return str(v.const_value.base_dir)
    return None


def load_into_memory(model: ir.Model) -> None:
    """Replace every external (memory-mapped) initializer by an in-memory copy and unmap its file: the model
    no longer depends on the file it was loaded from (what is written or run is self-contained)."""
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.ExternalTensor):
            v.const_value = ir.Tensor(np.array(t.numpy()), name=v.name)
            release(t)


def release(t: object) -> None:
    """Unmap a memory-mapped external tensor, so its pages stop counting in this process's memory. A tensor
    still viewed by some array stays mapped (closing would fail); it is unmapped when that array goes."""
    if isinstance(t, ir.ExternalTensor):
        try:
            t.release()
        except BufferError:
            pass


def trim_heap() -> None:
    """Give freed heap memory back to the system. glibc keeps freed blocks below its (dynamically raised) mmap
    threshold in the heap: after a large model's float weights were quantized one by one, hundreds of MB stayed
    counted in this process until exit. Does nothing off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
