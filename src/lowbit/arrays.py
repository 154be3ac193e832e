"""Reading .npy/.npz files safely: headers without data, members cut to the samples needed, never a pickle."""

from __future__ import annotations

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
            return {_single_input_key(path, specs): np.load(path, mmap_mode="r", allow_pickle=False)}
        ranks = {s.name: len(s.shape) for s in specs}
        if any((axes or {}).get(s.name, 0) != 0 for s in specs):
            # Only a batch on axis 0 can be cut to `limit` rows while reading; with another axis (or a constant)
            # in the file, every member is read whole so their sample counts agree (the source still stops at limit).
            limit = None
        with zipfile.ZipFile(path) as zf:
            members = {m[:-4]: m for m in zf.namelist() if m.endswith(".npy")}
            keys = pick_keys(str(path), set(members), specs)
            # npz members can't be memory-mapped: read only the needed members, and of each only the first
            # `limit` samples, so `--samples 16` on a small file holding a huge compressed array stays small.
            return {
                key: _read_member(zf, members[key], ranks[name], limit, f"{path}:{key}") for name, key in keys.items()
            }
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise LowbitError(f"cannot read {path} ({one_line(e)}); re-save it with numpy.save/savez") from None


def _read_member(zf: zipfile.ZipFile, member: str, rank: int, limit: int | None, where: str) -> np.ndarray:
    with zf.open(member) as f:
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
