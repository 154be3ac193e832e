"""Reading .npy/.npz files safely: headers without data, never a pickle. A .npy file and an uncompressed .npz member
are memory-mapped read-only (nothing is read or copied until used, and pages already used can be dropped:
`release`); a compressed member is read, cut to the samples needed."""

from __future__ import annotations

import mmap
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .errors import LowbitError

if TYPE_CHECKING:
    from .data import InputSpec


class Header(NamedTuple):
    shape: tuple[int, ...]
    dtype: np.dtype


def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def shape_text(shape: tuple) -> str:
    # Dynamic batch shows as N whatever the exporter called it; other dynamic dims keep their name.
    dims = [str(d) if isinstance(d, int) else "N" if i == 0 else (d or "?") for i, d in enumerate(shape)]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _read_header(f, where: str) -> Header:
    try:
        version = np.lib.format.read_magic(f)
        fmt = np.lib.format
        shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(f)
    except (ValueError, OSError, EOFError) as e:
        raise LowbitError(f"{where} is not a valid .npy array ({one_line(e)}); re-save it with numpy.save") from None
    return Header(tuple(shape), dtype)


def _single_input_key(path: Path, specs: list[InputSpec]) -> str:
    if len(specs) != 1:
        names = ", ".join(s.name for s in specs)
        raise LowbitError(
            f"{path} holds one array but the model has {len(specs)} inputs ({names}); use a .npz keyed by input name"
        )
    return specs[0].name


def read_headers(path: Path, specs: list[InputSpec]) -> dict[str, Header]:
    if path.suffix.lower() == ".npy":
        key = _single_input_key(path, specs)
        with open(path, "rb") as f:
            return {key: _read_header(f, str(path))}
    try:
        with zipfile.ZipFile(path) as zf:
            headers = {}
            for member in zf.namelist():
                if member.endswith(".npy"):
                    with zf.open(member) as f:
                        headers[member[:-4]] = _read_header(f, f"{path}:{member[:-4]}")
            return headers
    except (zipfile.BadZipFile, OSError) as e:
        raise LowbitError(f"{path} is not a valid .npz archive ({one_line(e)}); re-save it with numpy.savez") from None


def load_arrays(
    path: Path, specs: list[InputSpec], limit: int | None = None, axes: Mapping[str, int | None] | None = None
) -> dict[str, np.ndarray]:
    try:
        if path.suffix.lower() == ".npy":
            # Memory-mapped so a large file is read slice by slice, never whole.
            key = _single_input_key(path, specs)
            mapped = _mapped(path, 0, None, str(path))
            return {key: mapped if mapped is not None else np.load(path, mmap_mode="r", allow_pickle=False)}
        ranks = {s.name: len(s.shape) for s in specs}
        if any((axes or {}).get(s.name, 0) != 0 for s in specs):
            # Only a batch on axis 0 can be cut to `limit` rows while reading; with another axis (or a constant)
            # in the file, every member is read whole so their sample counts agree (the source still stops at limit).
            limit = None
        with zipfile.ZipFile(path) as zf:
            members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
            keys = pick_keys(str(path), set(members), specs)
            out = {}
            for name, key in keys.items():
                where, info = f"{path}:{key}", zf.getinfo(members[key])
                # A stored member (numpy.savez) is memory-mapped like a .npy file; a compressed one
                # (numpy.savez_compressed) is read, and of it only the first `limit` samples, so `--samples 16` on
                # a small file holding a huge compressed array stays small.
                start = _stored_data_start(zf, info)
                mapped = None if start is None else _mapped(path, start, info.file_size, where)
                if mapped is not None and limit is not None and mapped.ndim == ranks[name] and mapped.ndim:
                    # cut as `_read_member` cuts: an empty member (a KV cache's 0-length past, read unmapped) beside
                    # mapped ones would otherwise count `limit` samples against their whole file
                    mapped = mapped[:limit]
                out[key] = mapped if mapped is not None else _read_member(zf, info, ranks[name], limit, where)
            return out
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise LowbitError(f"cannot read {path} ({one_line(e)}); re-save it with numpy.save/savez") from None


class _FileMap(mmap.mmap):
    """A read-only shared mapping of a data file made by `load_arrays`: its pages may be dropped once read
    (`release`), since the file still holds them."""


def _mapped(path: Path, start: int, size: int | None, where: str) -> np.ndarray | None:
    """The .npy array at byte `start` of `path` (`size` bytes long; None: to the end of the file), memory-mapped
    read-only: nothing is read or copied until used. None when it is not a plain C-ordered array with values (the
    caller reads it as before, which also says what is wrong with it). Only the header
    and the length are checked: no zip CRC, as for a .npy file, which has none."""
    with open(path, "rb") as f:
        f.seek(start)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        count = int(np.prod(shape, dtype=np.int64))
        if fortran or dtype.hasobject or count == 0:
            return None
        offset = f.tell()
        end = start + size if size is not None else os.fstat(f.fileno()).st_size
        if offset + count * dtype.itemsize > end:
            raise LowbitError(f"{where} is truncated; re-save it with numpy.save/savez")
        try:
            m = _FileMap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without mmap: read it the usual way
            return None
    return np.frombuffer(m, dtype=dtype, count=count, offset=offset).reshape(shape)


def _stored_data_start(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> int | None:
    """Where an uncompressed, unencrypted member's bytes start in the archive (after its local header)."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or zf.fp is None:
        return None
    zf.fp.seek(info.header_offset)
    local = zf.fp.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


def release(a: np.ndarray) -> None:
    """Drop the pages holding `a` from this process's memory when `a` lies in a file `load_arrays` mapped (the
    file keeps them: a later read maps them in again, the same bytes); anything else is left alone. A data
    source reads each sample once, so without this a calibration file's pages would stay resident to the end of
    the run (the YOLO head's 78 MB of calibration input, most of its peak memory above ONNX Runtime's tool)."""
    base = a.base
    while isinstance(base, (np.ndarray, memoryview)):
        base = base.obj if isinstance(base, memoryview) else base.base
    if not isinstance(base, _FileMap) or not a.flags.c_contiguous or a.nbytes == 0:
        return
    lo = a.__array_interface__["data"][0] - np.frombuffer(base, np.uint8).__array_interface__["data"][0]
    hi = lo + a.nbytes
    lo, hi = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE, hi // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages inside
    if hi > lo and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, rank: int, limit: int | None, where: str) -> np.ndarray:
    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        # Only a C-ordered batch (leading sample axis) can be cut while streaming; anything else is read whole.
        if fortran or dtype.hasobject or len(shape) != rank or not shape:
            f.seek(0)
            return np.lib.format.read_array(f, allow_pickle=False)
        rows = shape[0] if limit is None else min(shape[0], limit)
        count = rows * int(np.prod(shape[1:], dtype=np.int64))
        data = f.read(count * dtype.itemsize)
        if len(data) != count * dtype.itemsize:
            raise LowbitError(f"{where} is truncated; re-save it with numpy.savez")
        return np.frombuffer(data, dtype=dtype, count=count).reshape((rows, *shape[1:]))


def pick_keys(where: str, keys: set[str], specs: list[InputSpec]) -> dict[str, str]:
    """Map each input name to the key that holds its data."""
    names = [s.name for s in specs]
    if all(n in keys for n in names):
        return {n: n for n in names}
    if len(names) == 1 and len(keys) == 1:
        return {names[0]: next(iter(keys))}  # one input, one array: the key name doesn't matter
    missing = next(n for n in names if n not in keys)
    raise LowbitError(
        f"input '{missing}' missing in {where} (found keys: {sorted(keys)}); store arrays under the model's input names"
    )
