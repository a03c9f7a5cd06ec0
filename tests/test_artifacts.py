"""Artifacts: every writer refuses to replace an existing output unless asked (leaving it byte for
byte as it was), a writer that fails half-way leaves no partial output, weights are safetensors
only, and nothing is unpickled from disk."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from conftest import TINY_NOTES
from medtune import checkpoint as ckpt
from medtune.base import BaseSpec, build_base
from medtune.config import DataConfig, PredictConfig, load_config
from medtune.errors import MedtuneError
from medtune.synth import synth_protocol, write_synth
from medtune.train import train

SENTINEL = b"precious bytes \x00\xff that must survive\n"
SRC = Path(__file__).resolve().parents[1] / "src" / "medtune"
TINY_BASE = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=2, seq_len=32, batch_size=4, steps=2)


def run_cfg(base: Path, *extra: str):
    return load_config(None, [f"model.base={base}", "model.device=cpu", "model.quantization=none",
                              "lora.r=4", "train.batch_size=4", "train.max_steps=2",
                              "train.save_every=1", "train.eval_every=0", "train.eval_samples=2",
                              "train.log_every=1", *extra])


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="module")
def notes(work) -> Path:
    """A labelled synthetic notes file (5 labels x ~40 rows)."""
    return write_synth("protocol", 200, work / "notes.csv", seed=3)


@pytest.fixture(scope="module")
def tiny_data(work) -> Path:
    path = work / "tiny.csv"
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(work, tiny_base, tiny_data) -> Path:
    return train(run_cfg(tiny_base), str(tiny_data), work / "run", val=str(tiny_data),
                 progress=False)


@pytest.fixture(scope="module")
def merged(work, run) -> Path:
    from medtune.merge import merge

    merge(run, work / "merged")
    return work / "merged"


def snapshot(path: Path) -> dict[str, bytes]:
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else b"<dir>"
            for p in sorted(path.rglob("*"))}


def leftovers(directory: Path) -> list[str]:
    """Temporary names an atomic writer could have left behind."""
    return sorted(p.name for p in directory.rglob("*")
                  if p.name.endswith((".tmp", ".old")) or p.name.startswith("."))


# ------------------------------------------------------------------------------ refusal
def _writers(notes: Path, tiny_data: Path, run: Path, tiny_base: Path
             ) -> dict[str, tuple[str, Callable[[Path], object]]]:
    """name -> (kind of output, call that writes to the given output without overwrite)."""
    from medtune.datacard import split_data
    from medtune.evaluate import evaluate
    from medtune.merge import merge
    from medtune.predict import predict_file
    from medtune.scrub import scrub_file

    texts = list(synth_protocol(40, seed=1)["text"])
    return {
        "split": ("dir", lambda out: split_data(notes, out, DataConfig(min_count=5))),
        "train": ("dir", lambda out: train(run_cfg(tiny_base), str(tiny_data), out,
                                           progress=False)),
        "merge": ("dir", lambda out: merge(run, out)),
        "predict": ("file", lambda out: predict_file(str(run), str(tiny_data), str(out),
                                                     PredictConfig(), progress=False)),
        "evaluate": ("dir", lambda out: evaluate(str(run), str(tiny_data), str(out),
                                                 similarity=False, isolate=False)),
        "synth": ("file", lambda out: write_synth("protocol", 20, out)),
        "scrub": ("file", lambda out: scrub_file(notes, out)),
        "base": ("dir", lambda out: build_base(texts, out, BaseSpec(**TINY_BASE),
                                               progress=False)),
    }


WRITERS = ["split", "train", "merge", "predict", "evaluate", "synth", "scrub", "base"]


@pytest.mark.parametrize("name", WRITERS)
def test_writer_refuses_existing_output_and_leaves_it_untouched(name, notes, tiny_data, run,
                                                                tiny_base, tmp_path):
    kind, write = _writers(notes, tiny_data, run, tiny_base)[name]
    if kind == "file":
        out = tmp_path / "existing.csv"
        out.write_bytes(SENTINEL)
    else:
        out = tmp_path / "existing"
        out.mkdir()
        (out / "keep.txt").write_bytes(SENTINEL)
        (out / "sub").mkdir()
        (out / "sub" / "more.bin").write_bytes(SENTINEL * 3)
    before = snapshot(out)
    with pytest.raises(MedtuneError, match="overwrite"):
        write(out)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # nothing written beside it


def test_base_reuses_its_own_build_and_overwrite_replaces(tmp_path):
    texts = list(synth_protocol(40, seed=1)["text"])
    out = build_base(texts, tmp_path / "base", BaseSpec(**TINY_BASE), progress=False)
    before = snapshot(out)
    assert build_base(texts, out, BaseSpec(**TINY_BASE), progress=False) == out  # same inputs
    assert snapshot(out) == before
    other = BaseSpec(**{**TINY_BASE, "seed": 1})
    with pytest.raises(MedtuneError, match="overwrite"):
        build_base(texts, out, other, progress=False)  # a different build is not silently kept
    assert snapshot(out) == before
    build_base(texts, out, other, progress=False, overwrite=True)
    assert json.loads((out / "medtune_base.json").read_text())["spec"]["seed"] == 1


def test_merge_refuses_to_replace_its_own_run(run):
    from medtune.merge import merge

    before = snapshot(run)
    with pytest.raises(MedtuneError, match="is or contains the input"):
        merge(run, run, overwrite=True)
    assert snapshot(run) == before


# ------------------------------------------------------------------------------ failure mid-way
class Boom(RuntimeError):
    pass


def half_write_then_fail(target_arg: int = 1):
    """A replacement writer that puts some bytes at its output path, then fails."""
    def fail(*args, **kwargs):
        Path(args[target_arg]).write_bytes(b"partial")
        raise Boom("disk full")
    return fail


@pytest.mark.parametrize("ext", [".csv", ".parquet"])
def test_synth_and_scrub_failing_midway_leave_nothing(ext, notes, tmp_path, monkeypatch):
    import medtune.synth as synth_mod
    from medtune.scrub import scrub_file

    monkeypatch.setattr(synth_mod, "write_table_by_extension", half_write_then_fail())
    with pytest.raises(Boom):
        write_synth("protocol", 20, tmp_path / f"synth{ext}")
    with pytest.raises(Boom):
        scrub_file(notes, tmp_path / f"scrubbed{ext}")
    assert list(tmp_path.iterdir()) == []


def test_split_failing_midway_leaves_nothing(notes, tmp_path, monkeypatch):
    import medtune.datacard as datacard

    monkeypatch.setattr(datacard, "card_markdown", lambda card: (_ for _ in ()).throw(Boom()))
    with pytest.raises(Boom):
        datacard.split_data(notes, tmp_path / "splits", DataConfig(min_count=5))
    assert list(tmp_path.iterdir()) == []


def test_predict_failing_midway_leaves_nothing(run, tiny_data, tmp_path, monkeypatch):
    from medtune import predict_io
    from medtune.predict import predict_file

    real, calls = predict_io.ChunkWriter.write, {"n": 0}

    def second_chunk_fails(self, df):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("disk full")
        real(self, df)

    monkeypatch.setattr(predict_io.ChunkWriter, "write", second_chunk_fails)
    with pytest.raises(Boom):
        predict_file(str(run), str(tiny_data), str(tmp_path / "pred.csv"),
                     PredictConfig(chunk_rows=4), progress=False)
    assert calls["n"] == 2  # the first chunk really was written to the temporary file
    assert list(tmp_path.iterdir()) == []


def test_merge_failing_midway_leaves_nothing(run, tmp_path, monkeypatch):
    import medtune.merge as merge_mod

    monkeypatch.setattr(merge_mod, "write_json", half_write_then_fail(0))
    with pytest.raises(Boom):
        merge_mod.merge(run, tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []


def test_base_build_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    import medtune.base as base_mod

    monkeypatch.setattr(base_mod, "write_json", half_write_then_fail(0))
    with pytest.raises(Boom):
        build_base(list(synth_protocol(40, seed=1)["text"]), tmp_path / "base",
                   BaseSpec(**TINY_BASE), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_failing_midway_leaves_nothing(run, tmp_path, monkeypatch):
    import torch

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monkeypatch.setattr(ckpt.torch, "save", half_write_then_fail())
    with pytest.raises(Boom):
        ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {})
    assert ckpt.complete_checkpoints(tmp_path) == []
    assert list((tmp_path / "checkpoints").iterdir()) == []


def test_run_failing_while_saving_is_not_finished_and_resume_completes_it(
        tiny_base, tiny_data, tmp_path, monkeypatch):
    from peft import PeftModel

    def partial_adapter(self, directory, **kwargs):
        Path(directory, "adapter_model.safetensors").write_bytes(b"partial")
        raise Boom("disk full")

    monkeypatch.setattr(PeftModel, "save_pretrained", partial_adapter)
    out = tmp_path / "run"
    with pytest.raises(Boom):
        train(run_cfg(tiny_base), str(tiny_data), out, val=str(tiny_data), progress=False)
    assert not (out / "adapter").exists() and not (out / "medtune.json").exists()
    assert leftovers(out) == []
    monkeypatch.undo()
    # every step is checkpointed, so --resume only has to save the run
    train(run_cfg(tiny_base), str(tiny_data), out, val=str(tiny_data), progress=False,
          resume=True)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((out / "medtune.json").read_text())["summary"]
    assert summary["step"] == 2 and "loss" in summary and "val_accuracy" in summary


def test_torn_metrics_line_does_not_break_resume(tiny_base, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(run_cfg(tiny_base, "train.max_steps=1"), str(tiny_data), out, progress=False)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 2, "loss": 0.')  # a SIGKILL in the middle of an append
    train(run_cfg(tiny_base), str(tiny_data), out, progress=False, resume=True)
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 1, 2, 2]  # train + validation rows of each step, the torn line gone


# ------------------------------------------------------------------------------ formats
def test_weights_are_safetensors_only(run, merged):
    checkpoint = ckpt.complete_checkpoints(run)[-1]
    for directory in (run, merged, checkpoint):
        names = [p.name for p in directory.rglob("*") if p.is_file()]
        pickled = [n for n in names if n.endswith((".bin", ".pth", ".pkl", ".pickle", ".ckpt",
                                                   ".pt")) and n != "optimizer.pt"]
        assert pickled == [], directory
        assert any(n.endswith(".safetensors") for n in names), directory


def test_nothing_is_unpickled_from_disk():
    """Every torch.load passes weights_only=True; no pickle/joblib loading of artifacts. (The one
    pickle is measure.py's hand-off to its own measuring child process through a private
    temporary directory, never a user's file.)"""
    loads = []
    for path in SRC.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\(", text):
            depth, i = 1, m.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
            call = text[m.start():i]
            loads.append(path.name)
            assert "weights_only=True" in call, f"{path.name}: {call}"
        if path.name != "measure.py":
            assert not re.search(r"\b(?:pickle|joblib|dill)\.loads?\(", text), path.name
        assert "trust_remote_code=True" not in text, path.name
    assert "checkpoint.py" in loads  # the scan sees the one load there is
