"""Crash-safe file writing: everything medtune writes goes to a temporary name and is renamed.

A reader therefore sees either the old file or the complete new one, never a half-written file.
The new data is flushed to disk (fsync) before the rename and the rename itself after it, so a
power loss cannot leave a renamed but empty file either.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # what open() would give: libraries that write through a private
_DIR_MODE = 0o777 & ~_UMASK  # temporary file (safetensors >= 0.8, mkstemp) leave 0600 behind


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # artifacts are ordinary files, not owner-only ones
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk; a no-op where the platform
    cannot open a directory."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _seal_tree(root: Path) -> None:
    """Give every file and folder under ``root`` the modes the umask allows, then flush them."""
    for folder, _, files in os.walk(root):
        for name in files:
            file = Path(folder) / name
            if not file.is_symlink():
                os.chmod(file, _FILE_MODE)
            _fsync(file)
        os.chmod(folder, _DIR_MODE)
        _fsync(Path(folder))


@contextlib.contextmanager
def file_lock(path: str | Path, waiting: str = "") -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block: processes that
    build the same thing take turns. ``waiting``: a line printed to stderr when another process
    holds it."""
    import fcntl
    import sys

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory next to ``path``; move it onto ``path`` only on success.

    An existing ``path`` is replaced only after the new directory is complete. Its previous
    version is kept as ``.NAME.old`` for the moment between the two renames; if a crash left only
    that, it is put back here first.
    """
    path = Path(path).absolute()  # "." has no name to put beside it
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    if old.is_dir() and not path.exists():
        os.replace(old, path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _seal_tree(tmp)
        if path.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """A JSON file's value; a file that is not JSON (or not UTF-8) is one error line naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise MedtuneError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except UnicodeDecodeError:
        raise MedtuneError(f"{path}: not valid JSON (not UTF-8 text)") from None


def check_output_dir(path: str | Path, overwrite: bool = False,
                     inputs: Iterable[str | Path | None] = ()) -> Path:
    """Refuse a non-empty existing output directory unless ``overwrite``; create nothing (for a
    writer that builds the whole directory with ``atomic_dir``: a failure leaves no trace).
    ``inputs``: files or directories the command reads; an output that is one of them, holds one
    or lies inside one is refused even with ``overwrite`` (replacing it whole would delete or
    change the input)."""
    path = Path(path)
    here = path.resolve()
    # replaced whole, the current directory would leave the shell in a deleted folder
    if Path.cwd().resolve().is_relative_to(here):
        raise MedtuneError(f"{path}: the output directory cannot be the current directory or "
                           "one above it; name a new directory")
    for item in inputs:
        if not item or not Path(item).exists():
            continue
        source = Path(item).resolve()
        if source.is_relative_to(here):
            raise MedtuneError(f"{path}: output directory is or contains the input {item}; "
                               "choose another output")
        if source.is_dir() and here.is_relative_to(source):  # merge RUN -o RUN/adapter
            raise MedtuneError(f"{path}: output directory is inside the input {item}; "
                               "choose an output outside it")
    if path.exists() and not path.is_dir():
        raise MedtuneError(f"{path}: exists and is not a directory")
    _check_parents(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise MedtuneError(f"{path}: output directory is not empty (pass --overwrite to replace it)")
    return path


def prepare_output_dir(path: str | Path, overwrite: bool = False,
                       inputs: Iterable[str | Path | None] = ()) -> Path:
    """Create an output directory, refusing a non-empty existing one unless ``overwrite`` (and,
    as ``check_output_dir``, one that is or holds one of ``inputs``)."""
    path = check_output_dir(path, overwrite, inputs)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _check_parents(path: Path) -> None:
    for parent in path.absolute().parents:  # the first that exists must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise MedtuneError(f"{path}: cannot be created, {parent} is not a directory")
            break


def check_output_file(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse to replace an existing output file unless ``overwrite``, a directory in its place,
    and one that cannot be created because a file stands where a folder above it should be."""
    path = Path(path)
    _check_parents(path)
    if path.is_dir():  # refused now, not after the work when the rename fails
        raise MedtuneError(f"{path}: is a directory; give a file name for the output")
    if path.exists() and not path.is_file():  # a FIFO, a device: never replaced by a file
        raise MedtuneError(f"{path}: exists and is not a regular file")
    if path.exists() and not overwrite:
        raise MedtuneError(f"{path}: output file exists (pass --overwrite to replace it)")
    return path
