"""Crash-safe writing: the old content or the complete new one, flushed to disk before the rename."""

from __future__ import annotations

import os

import pytest

from medtune.errors import MedtuneError
from medtune.fsutil import atomic_dir, atomic_file, check_output_dir, check_output_file


def _record_fsyncs(monkeypatch) -> list[str]:
    """Names of what was fsynced, in order; a rename is recorded as 'rename'."""
    events: list[str] = []
    real_open, real_fsync, real_replace = os.open, os.fsync, os.replace
    names: dict[int, str] = {}

    def fake_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        names[fd] = os.path.basename(str(path))
        return fd

    def fake_fsync(fd):
        events.append(names.get(fd, "?"))
        real_fsync(fd)

    def fake_replace(src, dst):
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", fake_fsync)
    monkeypatch.setattr(os, "replace", fake_replace)
    return events


def test_atomic_file_flushes_before_the_rename(tmp_path, monkeypatch):
    target = tmp_path / "out.json"
    target.write_text("old")
    events = _record_fsyncs(monkeypatch)
    with atomic_file(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert events[-2] == "rename" and events[-1] == tmp_path.name  # then the folder's entry
    assert events[0].startswith(".out.json.") and events.index("rename") == 1


def test_failed_block_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_atomic_dir_flushes_every_file_before_replacing(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    events = _record_fsyncs(monkeypatch)
    with atomic_dir(target) as tmp:
        (tmp / "a.bin").write_bytes(b"a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"b")
    assert sorted(p.name for p in target.iterdir()) == ["a.bin", "sub"]
    first_rename = events.index("rename")
    assert {"a.bin", "b.bin", "sub"} <= set(events[:first_rename])


def test_output_that_holds_an_input_is_refused_even_with_overwrite(tmp_path):
    data = tmp_path / "work" / "train.csv"
    data.parent.mkdir()
    data.write_text("text,label\n")
    for out in (tmp_path / "work", tmp_path):
        with pytest.raises(MedtuneError, match="is or contains the input"):
            check_output_dir(out, overwrite=True, inputs=[data])
    check_output_dir(tmp_path / "elsewhere", inputs=[data, None, "tfidf"])  # absent names pass


def test_written_files_get_ordinary_modes_not_owner_only(tmp_path):
    """safetensors >= 0.8 and mkstemp create 0600 files; medtune's artifacts follow the umask."""
    import torch
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_dir(tmp_path / "adapter") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "x.txt").write_text("x")
    with atomic_file(tmp_path / "card.json") as tmp:
        tmp.write_text("{}")
    mode = lambda p: os.stat(p).st_mode & 0o777  # noqa: E731
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    assert mode(tmp_path / "adapter" / "w.safetensors") == file_mode
    assert mode(tmp_path / "adapter" / "sub") == dir_mode == mode(tmp_path / "adapter")
    assert mode(tmp_path / "adapter" / "sub" / "x.txt") == file_mode
    assert mode(tmp_path / "card.json") == file_mode


def test_atomic_dir_puts_back_a_version_a_crash_left_between_the_renames(tmp_path):
    target = tmp_path / "merged"
    old = tmp_path / ".merged.old"
    old.mkdir()
    (old / "model.txt").write_text("v1")  # crash after renaming merged -> .merged.old
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "model.txt").write_text("half")
        raise RuntimeError("crash")
    assert (target / "model.txt").read_text() == "v1" and not old.exists()
    with atomic_dir(target) as tmp:
        (tmp / "model.txt").write_text("v2")
    assert (target / "model.txt").read_text() == "v2" and sorted(os.listdir(tmp_path)) == ["merged"]


def test_output_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "notes.csv").write_text("text,label\n")
    with pytest.raises(MedtuneError, match=r"cannot be created, .*notes.csv is not a directory"):
        check_output_dir(tmp_path / "notes.csv" / "run" / "x")
    assert check_output_dir(tmp_path / "new" / "run") == tmp_path / "new" / "run"
    # an output file too ('predict -o notes.csv/x.csv' said "notes.csv: File exists")
    with pytest.raises(MedtuneError, match=r"x.csv: cannot be created, .*notes.csv is not a dir"):
        check_output_file(tmp_path / "notes.csv" / "x.csv", overwrite=True)


def test_an_output_file_name_that_is_a_directory_is_refused_before_any_work(tmp_path):
    (tmp_path / "out.csv").mkdir()  # predicted every row, then failed at the final rename
    with pytest.raises(MedtuneError, match=r"out.csv: is a directory; give a file name"):
        check_output_file(tmp_path / "out.csv", overwrite=True)


def test_an_output_inside_an_input_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)  # `merge run -o run/adapter --overwrite` replaced it
    for out in (run / "adapter", run / "new"):
        with pytest.raises(MedtuneError, match="is inside the input"):
            check_output_dir(out, overwrite=True, inputs=[run])
    check_output_dir(tmp_path / "merged", inputs=[run])  # beside it: fine


def test_the_current_directory_is_refused_as_an_output_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # `-o .`: a traceback (". has an empty name"); `-o ..`: EBUSY
    for out in (".", "..", str(work)):
        with pytest.raises(MedtuneError, match="cannot be the current directory"):
            check_output_dir(out, overwrite=True)
    check_output_dir("sub")
    with atomic_dir("sub") as tmp:  # a relative name works from here
        (tmp / "f").write_text("x")
    assert (work / "sub" / "f").read_text() == "x"


def test_an_output_file_that_is_not_a_regular_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)  # --overwrite replaced the FIFO with a regular file
    with pytest.raises(MedtuneError, match="not a regular file"):
        check_output_file(fifo, overwrite=True)
