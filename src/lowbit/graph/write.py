"""Writing files safely: refuse an output that is an input (however spelled), and commit one or several files
atomically (temporary file beside each, fsync, rename, with SIGINT/SIGTERM held until all are in place)."""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from ..errors import LowbitError


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
