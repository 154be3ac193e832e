"""TFLite model metadata for image models: what MediaPipe / the TFLite Task Library read to run a .tflite without
code (the input's color space and normalization, the labels of a classifier's output).

Written with flatbuffers directly, after `metadata_schema.fbs` of tflite-support 0.4.4 (its package needs
protobuf < 4, which onnx does not allow): a `ModelMetadata` table (file identifier "M001") in the model's
metadata entry `TFLITE_METADATA`, and the labels file in a zip archive appended to the flatbuffer, as
tflite-support's `MetadataPopulator` packs associated files. Field numbers below are the schema's, in
declaration order (a union takes two: its type, then its value).
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from flatbuffers.table import Table

from ...errors import LowbitError
from .writer import FlatModel

METADATA_NAME = "TFLITE_METADATA"
IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"  # ImageProperties, NormalizationOptions and label files are all in 1.0.0
LABELS_FILE = "labels.txt"
FEATURE, IMAGE = 1, 2  # ContentProperties: FeatureProperties, ImageProperties
NORMALIZATION = 1  # ProcessUnitOptions: NormalizationOptions
RGB, GRAYSCALE = 1, 2  # ColorSpaceType
AXIS_LABELS = 2  # AssociatedFileType: TENSOR_AXIS_LABELS


@dataclass
class ImageMetadata:
    """mean / std in pixel units (0-255): the model's input is (pixel - mean) / std, per channel or one value."""

    mean: Sequence[float] = (0.0,)
    std: Sequence[float] = (1.0,)
    labels: Sequence[str] | None = None


def _check(fm: FlatModel, meta: ImageMetadata) -> int:
    if len(fm.inputs) != 1:
        raise LowbitError(f"image metadata describes one image input; this model has {len(fm.inputs)} inputs")
    shape = fm.tensors[fm.inputs[0]].shape
    if len(shape) != 4 or shape[3] not in (1, 3):
        raise LowbitError(
            f"image metadata needs a 4-D input with 1 or 3 channels last (NHWC), not {tuple(shape)}; "
            "drop --labels / --image-metadata"
        )
    channels = int(shape[3])
    for what, values in (("--mean", meta.mean), ("--std", meta.std)):
        if len(values) not in (1, channels):
            raise LowbitError(f"{what}: {len(values)} values for {channels} input channels; give 1 or {channels}")
    if any(s <= 0 for s in meta.std):
        raise LowbitError(f"--std must be positive, got {list(meta.std)}")
    if meta.labels is not None:
        classes = fm.tensors[fm.outputs[0]].shape[-1]
        if len(meta.labels) != classes:
            raise LowbitError(
                f"--labels: {len(meta.labels)} labels for an output of {classes} classes; one label per line"
            )
    return channels


def _floats(b: flatbuffers.Builder, values: Sequence[float]) -> int:
    return b.CreateNumpyVector(np.asarray(values, np.float32))


def _table(b: flatbuffers.Builder, fields: dict[int, tuple[str, Any]]) -> int:
    """A table from {field number: (kind, value)}: kind "off" (a built offset), "u8" or "i8"."""
    b.StartObject(max(fields, default=-1) + 1)
    for slot, (kind, value) in sorted(fields.items()):
        if kind == "off":
            b.PrependUOffsetTRelativeSlot(slot, value, 0)
        elif kind == "u8":
            b.PrependUint8Slot(slot, value, 0)
        else:
            b.PrependInt8Slot(slot, value, 0)
    return b.EndObject()


def _vector(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def build(fm: FlatModel, meta: ImageMetadata, name: str) -> tuple[bytes, dict[str, bytes]]:
    """The ModelMetadata flatbuffer for `fm` and the files it names."""
    channels = _check(fm, meta)
    mean = [float(v) for v in meta.mean] * (channels if len(meta.mean) == 1 else 1)
    std = [float(v) for v in meta.std] * (channels if len(meta.std) == 1 else 1)
    b = flatbuffers.Builder(256)
    norm = _table(b, {0: ("off", _floats(b, mean)), 1: ("off", _floats(b, std))})
    unit = _table(b, {0: ("u8", NORMALIZATION), 1: ("off", norm)})
    # the normalized input's range, for pixels 0..255 (what tflite-support's image writers record)
    lo = [(0 - m) / s for m, s in zip(mean, std)]
    hi = [(255 - m) / s for m, s in zip(mean, std)]
    stats = _table(b, {0: ("off", _floats(b, hi)), 1: ("off", _floats(b, lo))})
    image = _table(b, {0: ("i8", RGB if channels == 3 else GRAYSCALE)})
    content = _table(b, {0: ("u8", IMAGE), 1: ("off", image)})
    in_name = b.CreateString("image")
    inputs = [
        _table(
            b,
            {0: ("off", in_name), 3: ("off", content), 4: ("off", _vector(b, [unit])), 5: ("off", stats)},
        )
    ]
    files: dict[str, bytes] = {}
    outputs = []
    for k, idx in enumerate(fm.outputs):
        fields: dict[int, tuple[str, Any]] = {0: ("off", b.CreateString(fm.tensors[idx].name))}
        feature = _table(b, {})
        fields[3] = ("off", _table(b, {0: ("u8", FEATURE), 1: ("off", feature)}))
        if k == 0 and meta.labels is not None:
            files[LABELS_FILE] = "".join(f"{label}\n" for label in meta.labels).encode()
            label_file = _table(
                b,
                {
                    0: ("off", b.CreateString(LABELS_FILE)),
                    1: ("off", b.CreateString("class labels, one per output index")),
                    2: ("i8", AXIS_LABELS),
                },
            )
            fields[6] = ("off", _vector(b, [label_file]))
        outputs.append(_table(b, fields))
    sub = _table(b, {2: ("off", _vector(b, inputs)), 3: ("off", _vector(b, outputs))})
    root = _table(
        b,
        {
            0: ("off", b.CreateString(name)),
            1: ("off", b.CreateString("written by lowbit")),
            3: ("off", _vector(b, [sub])),
            7: ("off", b.CreateString(MIN_PARSER_VERSION)),
        },
    )
    b.Finish(root, file_identifier=IDENTIFIER)
    return bytes(b.Output()), files


def append_files(data: bytes, files: dict[str, bytes]) -> bytes:
    """The flatbuffer with `files` in a zip archive after it (stored, fixed dates: same inputs, same bytes)."""
    if not files:
        return data
    buf = io.BytesIO(data)
    buf.seek(0, io.SEEK_END)
    with zipfile.ZipFile(buf, "a", zipfile.ZIP_STORED) as z:
        for name in sorted(files):
            z.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), files[name])
    return buf.getvalue()


# -- reading it back (tests, `lowbit eval` users) ---------------------------------------------------------
def _field(t: Table, slot: int) -> int:
    return t.Offset(4 + 2 * slot)


def _sub(t: Table, slot: int) -> Table | None:
    o = _field(t, slot)
    return Table(t.Bytes, t.Indirect(o + t.Pos)) if o else None


def _items(t: Table, slot: int) -> list[Table]:
    o = _field(t, slot)
    if not o:
        return []
    start = t.Vector(o)
    return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]


def _str(t: Table, slot: int) -> str | None:
    o = _field(t, slot)
    return t.String(o + t.Pos).decode() if o else None


def _float_list(t: Table, slot: int) -> list[float]:
    o = _field(t, slot)
    return [float(v) for v in t.GetVectorAsNumpy(flatbuffers.number_types.Float32Flags, o)] if o else []


def _byte(t: Table, slot: int) -> int:
    o = _field(t, slot)
    return int(t.Get(flatbuffers.number_types.Int8Flags, o + t.Pos)) if o else 0


def read(data: bytes) -> dict[str, Any]:
    """What `build` wrote, parsed from a .tflite file's bytes: name, the image input's color space, mean, std and
    stats, each output's name and label file, and the files appended after the flatbuffer."""
    from .writer import read_metadata

    raw = read_metadata(data).get(METADATA_NAME)
    if raw is None:
        raise LowbitError("the model has no TFLITE_METADATA entry")
    if raw[4:8] != IDENTIFIER:
        raise LowbitError("TFLITE_METADATA is not a ModelMetadata flatbuffer (no M001 identifier)")
    root = Table(raw, flatbuffers.encode.Get(flatbuffers.packer.uoffset, raw, 0))
    sub = _items(root, 3)[0]
    image = _items(sub, 2)[0]
    content = _sub(image, 3)
    props = _sub(content, 1) if content else None
    unit = _items(image, 4)[0]
    norm = _sub(unit, 1)
    stats = _sub(image, 5)
    outputs = []
    for out in _items(sub, 3):
        files = [{"name": _str(f, 0), "type": _byte(f, 2)} for f in _items(out, 6)]
        outputs.append({"name": _str(out, 0), "files": files})
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            appended = {n: z.read(n) for n in z.namelist()}
    except zipfile.BadZipFile:  # no files were appended
        appended = {}
    return {
        "name": _str(root, 0),
        "min_parser_version": _str(root, 7),
        "content": _byte(content, 0) if content else 0,
        "color_space": _byte(props, 0) if props else 0,
        "mean": _float_list(norm, 0) if norm else [],
        "std": _float_list(norm, 1) if norm else [],
        "stats": {"max": _float_list(stats, 0), "min": _float_list(stats, 1)} if stats else {},
        "outputs": outputs,
        "files": appended,
    }
