"""PHI: `medtune data scrub` on the command line, `data.scrub_phi` scrubs what training sees, and
note text (a unique canary string) never reaches a log, progress line, error message, metrics
file, run metadata or the MLflow store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import medtune.train as train_mod
from conftest import TINY_NOTES
from medtune.config import load_config
from medtune.errors import MedtuneError

CANARY = "ZQXCANARY123"
PHI = ["John Smith", "4455667", "03/14/2023", "555-201-3344", "jsmith@example.com",
       "123-45-6789"]


def phi_note(i: int, note: str) -> str:
    """An invented note carrying identifiers of several types and the canary."""
    if i % 2:
        return (f"Pt John Smith, MRN 4455667, seen on 03/14/2023; call 555-201-3344. {note} "
                f"{CANARY} visit {i}")
    return f"{note}, email jsmith@example.com, SSN 123-45-6789 {CANARY} visit {i}"


def notes_frame(n: int = 48) -> pd.DataFrame:
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    return pd.DataFrame({"id": [f"n{i}" for i in range(n)],
                         "text": [phi_note(i, TINY_NOTES[i % 8]) for i in range(n)],
                         "label": [labels[i % 8] for i in range(n)]})


def medtune(*args: str, cwd: Path, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([sys.executable, "-m", "medtune", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd, env=full)


# ------------------------------------------------------------------------------ scrubbing
def test_data_scrub_cli_scrubs_reports_counts_and_refuses_overwrite(tmp_path):
    src, out = tmp_path / "notes.csv", tmp_path / "scrubbed.csv"
    notes_frame(6).to_csv(src, index=False)
    done = medtune("data", "scrub", str(src), "--output", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["rows"] == 6 and counts["rows_changed"] == 6
    assert {"NAME", "MRN", "DATE", "PHONE", "EMAIL", "SSN"} <= set(counts["spans"])
    scrubbed = pd.read_csv(out)
    assert scrubbed["id"].tolist() == [f"n{i}" for i in range(6)]  # other columns kept
    text = out.read_text()
    assert not [p for p in PHI if p in text]
    assert "[NAME]" in text and "[SSN]" in text and "headache after fall" in text
    for stream in (done.stdout, done.stderr):
        assert not [p for p in PHI if p in stream] and CANARY not in stream
    assert "warning" not in done.stderr  # nothing left in other columns

    frame = notes_frame(6).assign(history=[f"seen by {PHI[0]} on {PHI[2]}"] * 6)
    frame.to_csv(src, index=False)
    warned = medtune("data", "scrub", str(src), "-o", str(tmp_path / "w.csv"), cwd=tmp_path)
    assert warned.returncode == 0, warned.stderr
    assert json.loads(warned.stdout)["not_scrubbed"] == {"history": 12}
    assert "'history' (12)" in warned.stderr and "--also history" in warned.stderr
    assert PHI[0] not in warned.stderr + warned.stdout
    both = medtune("data", "scrub", str(src), "-o", str(tmp_path / "b.csv"), "--also", "history",
                   cwd=tmp_path)
    assert both.returncode == 0 and "warning" not in both.stderr, both.stderr
    assert PHI[0] not in (tmp_path / "b.csv").read_text()
    notes_frame(6).to_csv(src, index=False)

    before = out.read_bytes()
    again = medtune("data", "scrub", str(src), "--output", str(out), cwd=tmp_path)
    assert again.returncode == 2 and out.read_bytes() == before
    assert again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--overwrite" in again.stderr and "Traceback" not in again.stderr
    forced = medtune("data", "scrub", str(src), "--output", str(out), "--overwrite", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr


@pytest.mark.parametrize("scrub", [True, False])
def test_scrub_phi_switch_scrubs_what_training_sees(scrub, tiny_base, tmp_path, monkeypatch):
    data = tmp_path / "train.csv"
    notes_frame(16).to_csv(data, index=False)
    seen: list[str] = []
    real = train_mod.encode_examples

    def spy(template, tokenizer, texts, answers, max_length, labels=None):
        seen.extend(texts)
        return real(template, tokenizer, texts, answers, max_length, labels)

    monkeypatch.setattr(train_mod, "encode_examples", spy)
    cfg = load_config(None, [f"model.base={tiny_base}", "model.device=cpu",
                             "model.quantization=none", "lora.r=4", "train.batch_size=4",
                             "train.max_steps=1", "train.eval_samples=2",
                             f"data.scrub_phi={str(scrub).lower()}"])
    s = train_mod.setup(cfg, str(data), tmp_path / "run")
    assert len(seen) == 16  # train and validation notes
    leaked = [p for p in PHI if any(p in t for t in seen)]
    if scrub:
        assert leaked == [] and all("[" in t for t in seen)
        assert not [p for p in PHI if any(p in t for t in s.val_texts)]
        assert all("headache" in t or "pain" in t or "seizure" in t or "memory" in t
                   or "hematuria" in t or "syncope" in t or "radiculopathy" in t
                   or "urine" in t for t in seen)  # clinical content survives
    else:
        assert leaked == PHI  # not vacuous: without the switch the identifiers reach training


# ------------------------------------------------------------------------------ canary
BAD_INPUTS = {
    "ragged.csv": f"text,label\n\"{CANARY} a note\",head\n\"{CANARY} b\",head,extra\n",
    "bad.jsonl": f'{{"text": "{CANARY} fine", "label": "head"}}\n'
                 f'{{"text": "{CANARY} broken", "label": }}\n',
    "headerless.csv": f"{CANARY} pt with headache after fall r/o bleed,head\n"
                      f"{CANARY} low back pain radiating to the leg,body\n",
    "deep.jsonl": '{"text": ' + "[" * 5000 + "]" * 5000 + f', "label": "{CANARY}"}}\n',
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_errors_never_quote_notes(name, tmp_path):
    from medtune.data import load_labeled
    from medtune.predict_io import iter_records

    path = tmp_path / name
    path.write_text(BAD_INPUTS[name])
    for read in (lambda: load_labeled(path), lambda: list(iter_records(path)[0])):
        with pytest.raises(MedtuneError) as err:
            read()
        message = str(err.value)
        assert CANARY not in message and "\n" not in message and name in message


def test_mcqa_answer_holding_a_note_is_not_echoed(tmp_path):
    from medtune.data import load_labeled

    path = tmp_path / "q.csv"
    path.write_text(f"question,opa,opb,opc,opd,cop\nWhich?,a,b,c,d,\"{CANARY} pt note\"\n"
                    "What?,a,b,c,d,E\n")
    with pytest.raises(MedtuneError) as err:
        load_labeled(path, task="mcqa")
    assert CANARY not in str(err.value) and "row 1" in str(err.value)
    path.write_text("question,opa,opb,opc,opd,cop\nWhat?,a,b,c,d,E\n")
    with pytest.raises(MedtuneError, match="answer 'E'"):  # a short value is still shown
        load_labeled(path, task="mcqa")


@pytest.mark.slow
def test_canary_never_leaves_the_input_files(tiny_base, tmp_path, monkeypatch, capfd):
    """split (CLI) -> train with MLflow tracking -> predict -> a bad-input CLI error: the canary
    note text shows up in no output stream and in no file but the data splits."""
    pytest.importorskip("mlflow")
    from medtune.config import PredictConfig
    from medtune.predict import predict_file
    from medtune.registry import mlflow_callback
    from medtune.train import train

    notes = tmp_path / "notes.csv"
    notes_frame(48).to_csv(notes, index=False)
    headerless = tmp_path / "headerless.csv"
    headerless.write_text(BAD_INPUTS["headerless.csv"])
    monkeypatch.chdir(tmp_path)  # MLflow's artifact root (./mlruns) lands in tmp_path
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "canary")
    streams = []

    split = medtune("data", "split", str(notes), "--output", "splits", "--min-count", "2",
                    cwd=tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    bad = medtune("data", "split", str(headerless), "--output", "bad", cwd=tmp_path)
    assert bad.returncode == 2 and "no text column" in bad.stderr, bad.stderr[-3000:]
    streams += [split.stdout, split.stderr, bad.stdout, bad.stderr]

    run = tmp_path / "run"
    cfg = load_config(None, [f"model.base={tiny_base}", "model.device=cpu",
                             "model.quantization=none", "lora.r=4", "train.batch_size=4",
                             "train.max_steps=2", "train.eval_every=1", "train.eval_samples=4",
                             "train.log_every=1", "train.save_every=1"])
    tracker = mlflow_callback(cfg, run)
    train(cfg, "splits/train.csv", run, val="splits/val.csv", progress=True,
          callbacks=[tracker])
    tracker.finish(run)
    predict_file(str(run), "splits/test.csv", "preds.csv", PredictConfig(), progress=True)
    captured = capfd.readouterr()
    assert "train" in captured.out + captured.err  # the progress output was captured
    streams += [captured.out, captured.err]
    for stream in streams:
        assert CANARY not in stream and not [p for p in PHI if p in stream]

    # every file written, except the data splits (which are notes by design)
    inputs = {notes, headerless, *(tmp_path / "splits").glob("*.csv")}
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p not in inputs]
    names = {p.name for p in written}
    assert {"metrics.jsonl", "medtune.json", "mlflow.db", "preds.csv", "data_card.md",
            "data_card.json", "labels.json"} <= names
    logged = [p for p in written if "mlruns" in p.parts or "mlartifacts" in p.parts]
    assert {"metrics.jsonl", "medtune.json", "data_card.md"} <= {p.name for p in logged}
    holding = [str(p.relative_to(tmp_path)) for p in written if CANARY.encode() in p.read_bytes()]
    assert holding == []
    db = (tmp_path / "mlflow.db").read_bytes()
    assert b"val_accuracy" in db and b"train.lr" in db  # metrics and params were logged ...
    assert CANARY.encode() not in db and b"John Smith" not in db  # ... and no note text
