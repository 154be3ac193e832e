"""Model files in and out: one loader with clear errors for bad files, atomic writes, never over the input.

Every user-supplied model is read by `load_proto` (or `load_model`, its onnx-ir form). Raw protobuf is kept on
purpose where it is only read or handed on, never edited: sessions get serialized bytes (runtimes/ort.py), the
lint, the report's layer pairing and the integer emulator walk `graph.node` (evaluate/lint.py, evaluate/
report_data.py, runtimes/emulate.py), the TFLite converter reads protobuf nodes (export/tflite), and
`data.input_specs` reads only the graph inputs (no checker, no external weights). Passes and the quantizer
edit onnx-ir models from `load_model`. ORT's own optimized-graph dump (lint) is not user input and is read
with plain onnx.load. Walks over raw protobuf that need producers and readers share `graph.index.GraphIndex`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from ..errors import LowbitError


def load_proto(
    model: str | os.PathLike | onnx.ModelProto, *, check: bool = True, external_data: bool = True
) -> onnx.ModelProto:
    """The one reader of user-supplied models: a path or a ModelProto in, a checked ModelProto out.

    Every problem is a one-line LowbitError: a wrong argument type, missing file, corrupt or truncated file, no
    graph nodes, external data onnx refuses (outside the model's folder, absolute, missing, a symlink), ONNX
    checker failure. `check=False` skips the checker (it reads every weight) for callers that only look at the
    graph's inputs; `external_data=False` leaves external weights unread.
    """
    if isinstance(model, onnx.ModelProto):
        if not model.graph.node:
            raise LowbitError("the in-memory model holds no graph nodes; pass a complete ONNX model")
        if check:
            _check(model, "the in-memory model")
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise LowbitError(f"model must be a path to an .onnx file or an onnx.ModelProto, got {type(model).__name__}")
    p = Path(model)
    if not p.is_file():
        raise LowbitError(f"model not found: {p}; check the path")
    refuse_ort_format(p)
    try:
        proto = onnx.load(str(p), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError) as e:
        raise LowbitError(
            f"{p} is not a readable ONNX model (corrupt, truncated or not a valid ONNX model file): {_first_line(e)}"
        ) from None
    if not proto.graph.node:
        raise LowbitError(f"{p} holds no graph nodes (corrupt, truncated or not an ONNX model)")
    external = _has_external_data(proto)
    if external:
        # Before the checker: its messages about external files read like corruption, and they name no fix.
        _check_external_locations(proto, p)
    if check:
        # By path, so models with external data (> 2 GB) are checked too.
        _check(str(p), str(p))
    if external and external_data:
        try:
            onnx.load_external_data_for_model(proto, str(p.parent))
        except (OSError, ValueError, RuntimeError) as e:
            raise LowbitError(
                f"{p} keeps its weights in external data files that cannot be read ({_first_line(e)}); "
                "keep them beside the model"
            ) from None
    return proto


def load_model(model: str | os.PathLike | onnx.ModelProto) -> ir.Model:
    """`load_proto` as an onnx-ir model (what lowbit's passes edit); external weights stay lazy, on disk.

    An in-memory ModelProto is copied first: onnx-ir shares tensor buffers with the proto it reads, and the
    caller's model must not change."""
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(load_proto(model))
        return ir.from_proto(copy)
    proto = load_proto(model, external_data=False)  # the path-based checker also finds missing external files
    return ir.from_proto(proto) if not _has_external_data(proto) else ir.load(str(model))


def external_files(model: object) -> list[Path]:
    """The external data files a model file refers to (none for an in-memory model or one that cannot be read:
    the loader says what is wrong with it)."""
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_file():
        return []
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except Exception:  # any unreadable file: load_proto reports it with its own message
        return []
    found: dict[str, None] = {}
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            found.update({e.value: None for e in t.external_data if e.key == "location"})
    return [Path(model).parent / loc for loc in found]


def refuse_ort_format(path: str | os.PathLike) -> None:
    """One line for a `.ort` file where an ONNX graph is read: ORT format is a flatbuffer ONNX Runtime loads,
    not ONNX protobuf (quantize, diagnose, report, lint, export need the ONNX model)."""
    if Path(path).suffix.lower() == ".ort":
        raise LowbitError(
            f"{path} is an ORT-format model; this needs the ONNX model it was exported from "
            "(.ort files run only in lowbit eval and bench)"
        )


def check_writable(output: str | os.PathLike) -> None:
    """Refuse, before any long work, an output path that is a folder or lies in a folder we cannot write.

    Probes with a real temporary file rather than os.access: that also catches read-only file systems, ACLs and
    root on a read-only mount, which permission bits do not show."""
    out = Path(output)
    if out.is_dir():
        raise LowbitError(f"output {out} is a folder; name a file inside it, e.g. -o {out / 'model.int8.onnx'}")
    folder = out.parent
    if not folder.is_dir():
        raise LowbitError(f"output folder {folder} does not exist or is not a folder; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as e:
        raise LowbitError(
            f"cannot write to output folder {folder} ({e.strerror or type(e).__name__}); "
            "choose a writable folder with -o or fix its permissions"
        ) from None
    os.close(fd)
    Path(probe).unlink(missing_ok=True)


def _check_external_locations(proto: onnx.ModelProto, p: Path) -> None:
    """The external-data rules onnx enforces, each as a message naming the fix."""
    folder = p.parent.resolve()
    for t in proto.graph.initializer:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        where = f"{p}: weight '{t.name}' is stored in external file '{location}'"
        if not location:
            raise LowbitError(f"{p}: weight '{t.name}' has external data without a location; re-save the model")
        if os.path.isabs(location):
            raise LowbitError(
                f"{where}, an absolute path, which onnx refuses; move the file beside the model and re-save it "
                "with a relative location (onnx.save(..., location='weights.bin'))"
            )
        target = p.parent / location
        if not target.resolve().is_relative_to(folder):
            raise LowbitError(
                f"{where}, outside the model's folder, which onnx refuses; move it into {p.parent} and re-save "
                "the model with a relative location"
            )
        if target.is_symlink():
            raise LowbitError(f"{where}, a symbolic link, which onnx refuses; replace the link by the file itself")
        if not target.is_file():
            raise LowbitError(
                f"{where}, which is missing or not a regular file; keep the model's external data files beside it"
            )


def model_name(model: object) -> str:
    """How messages and results name a model argument."""
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, onnx.ModelProto):
        return "<in-memory model>"
    return f"the {type(model).__name__} passed in"


def _check(model: str | onnx.ModelProto, name: str) -> None:
    from .external import FILE_BYTES, has_external, write_external

    try:
        if isinstance(model, onnx.ModelProto) and not has_external(model) and model.ByteSize() >= FILE_BYTES:
            # The in-memory checker serializes the model (a second copy; refused past 2 GB): check a file instead.
            with tempfile.TemporaryDirectory(prefix="lowbit-check-") as folder:
                onnx.checker.check_model(str(write_external(model, Path(folder) / "model.onnx")))
        else:
            onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.checker.ValidationError) as e:
        raise LowbitError(f"{name} fails the ONNX checker (corrupt or truncated?): {_first_line(e)}") from None


def _has_external_data(proto: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.samefile(b)
    return a.resolve() == b.resolve()


def check_output_path(output: str | Path, inputs: list[str | Path]) -> Path:
    out = Path(output)
    for src in inputs:
        if same_file(out, src):
            raise LowbitError(f"output {out} is the input model; choose another path with -o")
    if out.suffix.lower() != ".onnx":
        raise LowbitError(f"output {out} must end in .onnx")
    if not out.parent.exists():
        raise LowbitError(f"output folder {out.parent} does not exist; create it first")
    return out


Labelled = Sequence[tuple[str, "str | os.PathLike | None"]]


def check_paths(writes: Labelled, reads: Labelled) -> None:
    """Refuse, before any work, a written path that is (however spelled: symlink, hard link, `./x`) a path this
    run reads, another written path, or an existing folder. Labels name the option, so the one-line error says
    which option to change: `("-o", "m.q.onnx")`, `("recipe", "r.json")`. `None` entries are skipped, and so
    are reads that are not paths (in-memory models, arrays)."""
    read = [(label, Path(p)) for label, p in reads if isinstance(p, (str, os.PathLike))]
    written: list[tuple[str, Path]] = []
    for label, p in writes:
        if p is None:
            continue
        w = Path(p)
        for what, r in read:
            if same_file(w, r):
                also = "" if str(w) == str(r) else f" {r}"
                raise LowbitError(f"{label} {w} is the {what}{also}, which this run reads; choose another path")
        for other, prev in written:
            if same_file(w, prev):
                raise LowbitError(f"{label} {w} is also {other}; choose two different paths")
        if w.is_dir():
            raise LowbitError(f"{label} {w} is a folder; give a file path")
        written.append((label, w))


_written: list[Path] = []  # every path this process committed, so an interrupt can say what it left behind


def written_paths() -> list[Path]:
    """Paths committed so far by this process (in order)."""
    return list(_written)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT/SIGTERM wait while files are renamed into place, then are re-raised: an interrupt never lands
    between two renames of one commit. Python runs signal handlers in the main thread only, so handlers are
    swapped (rather than masked: another thread could take a masked signal) and only there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    old: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(sig)
        if handler is None:  # installed outside Python: cannot be restored, so leave it alone
            continue
        old[sig] = handler
        signal.signal(sig, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for held, previous in old.items():
            signal.signal(held, previous)
        if got:
            signal.raise_signal(got[0])


# What a file of `write_together` holds: its bytes, or a function that writes them into the open file (a model's
# external data, streamed one tensor at a time rather than held in memory as one bytes object).
Payload = bytes | Callable[[BinaryIO], None]


def _temp_beside(path: Path, data: Payload) -> Path:
    """`data` in a fsynced temporary file in `path`'s folder (same file system, so the rename is atomic)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should be as readable as any file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not every platform opens folders; the renames are still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(data: bytes, path: str | Path) -> None:
    """Write to a temporary file in the target folder, then rename: readers never see half a file."""
    write_together([(Path(path), data)])


def write_together(files: Sequence[tuple[str | Path, Payload]]) -> None:
    """Write several files as one: all of them or none (a model and its plan; a model written with external
    data, its `.data` file and its plan).

    1. every file goes to a fsynced temporary file beside its target, in the order given (a payload may be a
       function writing into the open file; a later one may use what an earlier one computed); any failure
       (disk full, a target that is a folder, an interrupt) removes the temporaries and leaves every target as
       it was;
    2. the existing targets but the last are kept as hard-linked backups;
    3. the targets are renamed into place in the order given (the model last, so a model on disk always has its
       own plan beside it), with SIGINT/SIGTERM held until the renames are done; if a rename fails, the
       targets already renamed get their backups back (or are removed if they did not exist).
    Backups and temporaries are removed in every case: no `.tmp` file is left behind."""
    targets = [Path(p) for p, _ in files]
    temps: list[Path] = []
    backups: list[Path] = []

    def clean() -> None:
        for leftover in [*temps, *backups]:
            leftover.unlink(missing_ok=True)

    try:
        for path, (_, data) in zip(targets, files):
            temps.append(_temp_beside(path, data))
        # Cleaned up before a held signal is re-raised: a SIGTERM left at its default kills at once.
        with _signals_held():
            try:
                _commit(targets, temps, backups)
            finally:
                clean()
    finally:
        clean()


def _commit(targets: list[Path], temps: list[Path], backups: list[Path]) -> None:
    saved = {path: _backup(path) for path in targets[:-1]}
    backups.extend(b for b in saved.values() if b is not None)
    done: list[Path] = []
    try:
        for path, tmp in zip(targets, temps):
            os.replace(tmp, path)
            done.append(path)
    except BaseException:
        for path in done:  # put back what this commit replaced: never half of it
            old = saved.get(path)
            if old is not None:
                os.replace(old, path)
            else:
                path.unlink(missing_ok=True)
        raise
    for folder in {p.parent for p in targets}:
        _fsync_dir(folder)
    _written.extend(targets)


def _backup(path: Path) -> Path | None:
    """A hard link to `path`'s current file under a temporary name, or None if there is none (or the file
    system has no hard links: then a failed commit removes the new file rather than restoring the old)."""
    if not path.is_file():
        return None
    for i in range(100):
        name = path.parent / f".{path.name}.{os.getpid()}.{i}.bak.tmp"
        try:
            os.link(path, name)
            return name
        except FileExistsError:
            continue
        except OSError:
            return None
    return None


def save_model(model: ir.Model | onnx.ModelProto, path: str | Path, external: bool = False) -> Path:
    """Serialize and write atomically; as `path` + `path.data` (written together) when `external` or when the
    model is too large to serialize (`graph.external`)."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    write_together(model_files(proto, Path(path), external))
    return Path(path)


def model_files(
    proto: onnx.ModelProto, path: Path, external: bool = False, on_model: Callable[[bytes], None] | None = None
) -> list[tuple[Path, Payload]]:
    """The files that hold `proto` at `path`, for `write_together`: the model alone, or (when `external` or the
    model is too large to serialize) its data file first and the model last. `on_model(model_bytes)` is called
    with the `.onnx` bytes before they are written (a plan records their hash)."""
    from .external import data_path, external_form, use_external

    if not use_external(proto, external):
        data = model_bytes(proto)
        if on_model is not None:
            on_model(data)
        return [(path, data)]
    skeleton: list[bytes] = []

    def write_data(f: BinaryIO) -> None:
        skeleton.append(external_form(proto, f, data_path(path).name).SerializeToString())
        if on_model is not None:
            on_model(skeleton[0])

    def write_model(f: BinaryIO) -> None:
        f.write(skeleton[0])

    return [(data_path(path), write_data), (path, write_model)]


def model_bytes(model: ir.Model | onnx.ModelProto) -> bytes:
    """The bytes `save_model` writes for a model held whole in one file."""
    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    return proto.SerializeToString()


def model_size(path: str | Path) -> int:
    return Path(path).stat().st_size
