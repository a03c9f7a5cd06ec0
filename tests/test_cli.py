"""Command line: help, resolved config, one-line errors with exit code 2, --debug tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TINY_NOTES


def medtune(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "medtune", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


def test_help_lists_the_verbs():
    out = medtune("--help")
    assert out.returncode == 0, out.stderr
    for verb in ("train", "merge", "config", "data", "base"):
        assert verb in out.stdout


def test_config_show_prints_resolved_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# medtune config show c.yaml\ntrain:\n  batch_size: 8\n")
    out = medtune("config", "show", str(path), "train.lr=1e-4",
                  "lora.target_modules=q_proj,v_proj", "model.device=cpu")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["train"]["lr"] == 1e-4 and shown["train"]["batch_size"] == 8
    assert shown["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert shown["model"]["device"] == "cpu"
    assert shown["train"]["epochs"] == 1.0  # untouched default shown too


def test_user_error_is_one_line_exit_2_without_traceback(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lrr: 1e-4\n")
    out = medtune("config", "show", str(path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert str(path) in lines[0] and "train.lr" in lines[0]
    assert "Traceback" not in out.stderr and out.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    out = medtune("--debug", "config", "show", str(tmp_path / "missing.yaml"))
    assert out.returncode != 0
    assert "Traceback" in out.stderr and "ConfigError" in out.stderr


def test_resume_without_checkpoint_is_a_user_error(tiny_base, tmp_path):
    data = tmp_path / "t.csv"
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(data, index=False)
    out = medtune("train", "--data", str(data), "--output", str(tmp_path / "run"),
                  "--base", str(tiny_base), "--resume", "model.device=cpu",
                  "model.quantization=none", "train.batch_size=4")
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "no complete checkpoint" in last
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()  # nothing written: a plain train can follow
    taken = tmp_path / "file"
    taken.write_text("x")
    out = medtune("data", "synth", "--n", "5", "-o", str(taken / "x.csv"))  # parent is a file
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [f"error: {taken / 'x.csv'}: cannot be created, {taken} is not a directory"]


def test_train_in_a_log_prints_plain_progress_and_no_library_bars(tiny_base, tmp_path):
    """stderr is a pipe here, as in a log file or CI: medtune's own progress lines, with numbers
    only, and none of transformers' "Loading weights" bars."""
    data = tmp_path / "t.csv"
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(data, index=False)
    out = medtune("train", "--data", str(data), "--output", str(tmp_path / "run"),
                  "--base", str(tiny_base), "model.device=cpu", "model.quantization=none",
                  "train.batch_size=4", "train.max_steps=3", "train.eval_samples=2")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Loading weights" not in out.stderr and "it/s]" not in out.stderr
    progress = [line for line in out.stderr.splitlines() if line.startswith("train ")]
    assert progress and progress[-1].startswith("train 3/3 loss=")
    assert not any(note[:20] in out.stderr + out.stdout for note in TINY_NOTES[:16])


@pytest.mark.parametrize("option, value", [("--port", "99999"), ("--max-batch", "0"),
                                           ("--max-concurrency", "0")])
def test_serve_refuses_impossible_limits_before_starting(tmp_path, option, value):
    out = medtune("serve", "--model", str(tmp_path), option, value)
    assert out.returncode == 2 and option in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("base", ["missing-model", "/nowhere/model", "./rel/model"])
def test_missing_base_is_named_as_a_missing_directory_not_a_hub_id(tmp_path, base):
    data = tmp_path / "t.csv"
    pd.DataFrame({"text": TINY_NOTES[:8], "label": ["a", "b"] * 4}).to_csv(data, index=False)
    out = medtune("train", "--data", str(data), "--output", str(tmp_path / "run"), "--base", base)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines == [f"error: {base}: base model directory not found"], lines
    assert not (tmp_path / "run").exists()


def test_full_fine_tuning_of_a_4bit_base_is_refused_before_the_base_is_built(tmp_path):
    data = tmp_path / "t.csv"
    pd.DataFrame({"text": TINY_NOTES[:8], "label": ["a", "b"] * 4}).to_csv(data, index=False)
    env_cache = tmp_path / "cache"
    out = subprocess.run([sys.executable, "-m", "medtune", "train", "--data", str(data), "-o",
                          str(tmp_path / "run"), "lora.enabled=false"], capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "MEDTUNE_CACHE": str(env_cache)})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: full fine-tuning (lora.enabled=false) needs model.quantization=none"]
    assert not env_cache.exists()  # no embedded base was built first


@pytest.mark.parametrize("args, message", [
    (["predict", "--model", "m", "--data", "d.csv", "-o", "o.csv", "--mode", "generate",
      "--min-confidence", "0.5"], "--min-confidence needs constrained mode"),
    (["predict", "--model", "m", "--data", "d.csv", "-o", "o.csv", "--snap"],
     "--snap maps generated answers to labels"),
    (["train", "--data", "d.csv", "-o", "run", "--resume", "--overwrite"],
     "--resume continues a run and --overwrite replaces it"),
])
def test_options_that_would_be_ignored_are_refused(tmp_path, args, message):
    out = medtune(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines


def test_ctrl_c_says_interrupted_and_exits_130(monkeypatch, capsys, tmp_path):
    # typer turns KeyboardInterrupt into a silent exit 130; the user must see why it stopped
    import medtune.data
    from medtune import cli

    def pressed_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(medtune.data, "inspect_data", pressed_ctrl_c)
    monkeypatch.setattr(sys, "argv", ["medtune", "data", "inspect", str(tmp_path / "x.csv")])
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted")


def test_sigterm_unwinds_like_ctrl_c_and_leaves_no_temporary_file(monkeypatch, capsys, tmp_path):
    # timeout / docker stop / Slurm send SIGTERM: it killed the process where it stood, leaving
    # `.NAME.*.tmp` files (partial predictions, split notes) behind
    import signal

    import medtune.synth
    from medtune import cli
    from medtune.fsutil import atomic_file

    def terminated_while_writing(*args, **kwargs):
        with atomic_file(tmp_path / "out.csv") as tmp:
            tmp.write_text("half of it")
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(medtune.synth, "synth_protocol", terminated_while_writing)
    monkeypatch.setattr(sys, "argv", ["medtune", "data", "synth", "--n", "5", "-o",
                                      str(tmp_path / "out.csv")])
    try:
        with pytest.raises(SystemExit) as stopped:
            cli.main()
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.value.code == 130
    assert capsys.readouterr().err.startswith("interrupted")
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary file


@pytest.mark.parametrize("args, message", [
    (["--n", "-3"], "error: --n: must be >= 1, got -3"),
    (["--n", "0"], "error: --n: must be >= 1, got 0"),  # a header-only file every step refuses
    (["--imbalance", "-1"], "error: --imbalance: must be >= 0, got -1.0"),
    (["--label-noise", "2"], "error: --label-noise: must be in [0, 1], got 2.0"),
])
def test_synth_errors_name_the_option_as_typed(tmp_path, args, message):
    out = medtune("data", "synth", *args, "-o", str(tmp_path / "s.csv"))
    assert out.returncode == 2 and out.stderr.strip() == message
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("args, message", [
    (["bogus"], "error: No such command 'bogus'. (see '"),
    (["train", "--bogus"], "error: No such option: --bogus"),
    (["predict", "--data", "d.csv"], "error: Missing option '--model'. (see '"),
    (["data", "synth", "--n", "x"], "error: Invalid value for '--n'"),
])
def test_command_line_mistakes_print_one_line(tmp_path, args, message):
    # click's own usage errors, drawn by typer as a multi-line box before: one line like the rest
    out = medtune(*args, cwd=tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), lines
    assert lines[0].endswith("--help')"), lines


def test_no_arguments_still_show_help(tmp_path):
    out = medtune("data", cwd=tmp_path)
    assert out.returncode == 2 and "synth" in out.stdout + out.stderr


@pytest.mark.parametrize("args, message", [
    (["--min-confidence", "1.5"], "error: --min-confidence: must be >= 0 and <= 1, got 1.5"),
    (["--merge", "maybe"], "error: --merge: unknown 'maybe' (choose from auto, yes, no)"),
    (["--batch-size", "-1"], "error: --batch-size: must be >= 0, got -1"),
])
def test_predict_options_are_checked_like_config_keys_before_any_loading(tmp_path, args, message):
    # the model 'm' does not exist: the option's error must come first, naming it as typed
    out = medtune("predict", "--model", "m", "--data", "d.csv", "-o", "o.csv", *args, cwd=tmp_path)
    assert out.returncode == 2 and out.stderr.strip() == message


@pytest.mark.parametrize("exc, line, described", [
    (MemoryError(), "MemoryError", "MemoryError"),  # empty message: str(exc).splitlines() == []
    (ValueError("\n\n  bad value  \nmore"), "bad value", "ValueError: bad value"),
    (OSError("x" * 400), "x" * 300, "OSError: " + "x" * 300),
])
def test_error_lines_never_fail_on_the_message_they_describe(exc, line, described):
    from medtune.errors import describe, first_line

    assert first_line(exc) == line and describe(exc) == described


@pytest.mark.parametrize("verb", [["train"], ["evaluate"], ["predict"], ["ablate"],
                                  ["data", "split"], ["data", "inspect"]])
def test_verbs_reading_labelled_files_take_the_options_their_column_errors_name(verb):
    # data.py's "no label column ...; set --label-column" must be actionable on every verb
    out = medtune(*verb, "--help")
    assert out.returncode == 0
    assert "--text-column" in out.stdout and "--label-column" in out.stdout


def _one_based_mcqa(path: Path, n: int = 12) -> Path:
    rows = [{"id": f"q{i}", "question": f"Which nerve is injured in case {i}?", "opa": "Ulnar",
             "opb": "Radial", "opc": "Median", "opd": "Axillary", "cop": 1 + i % 4}
            for i in range(n)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_mcqa_options_on_train_inspect_and_evaluate(tiny_base, tmp_path):
    data = _one_based_mcqa(tmp_path / "q.csv")
    out = medtune("data", "inspect", str(data), "--task", "mcqa")  # 4 is out of 0-3
    assert out.returncode == 2 and "pass --cop-base 1, or set data.cop_base=1" in out.stderr
    assert medtune("data", "inspect", str(data), "--task", "mcqa", "--cop-base", "1",
                   "--json").returncode == 0
    out = medtune("data", "inspect", str(data), "--task", "mcqa", "--cop-base", "2")
    assert out.returncode == 2 and "--cop-base" in out.stderr and "Traceback" not in out.stderr
    # as protocol notes, the MCQA file is refused with the way out
    out = medtune("train", "--data", str(data), "--output", str(tmp_path / "p"), "--base",
                  str(tiny_base))
    assert out.returncode == 2 and "read as protocol notes: pass --task mcqa" in out.stderr
    run = tmp_path / "run"
    out = medtune("train", "--data", str(data), "--output", str(run), "--base", str(tiny_base),
                  "--task", "mcqa", "--cop-base", "1", "model.quantization=none",
                  "train.batch_size=4", "train.max_steps=1", "data.val_fraction=0")
    assert out.returncode == 0, out.stderr[-2000:]
    meta = json.loads((run / "medtune.json").read_text())
    assert meta["task"] == "mcqa" and meta["config"]["data"]["cop_base"] == 1
    out = medtune("evaluate", "--model", str(run), "--data", str(data), "-o",
                  str(tmp_path / "eval"), "--cop-base", "1", "--no-similarity")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["accuracy"] >= 0


@pytest.mark.parametrize("option", [["--label-noise", "0.5"], ["--imbalance", "3"]])
def test_synth_mcqa_refuses_the_protocol_only_options(tmp_path, option):
    out = medtune("data", "synth", "--task", "mcqa", *option, "-o", str(tmp_path / "q.csv"))
    assert out.returncode == 2 and out.stderr.strip().startswith(
        "error: --imbalance and --label-noise shape protocol notes")
    assert not (tmp_path / "q.csv").exists()


def test_cop_base_on_protocol_notes_is_refused_not_ignored(tmp_path):
    data = tmp_path / "n.csv"
    pd.DataFrame({"text": TINY_NOTES[:4], "label": ["a", "b"] * 2}).to_csv(data, index=False)
    for args in (["data", "inspect", str(data), "--cop-base", "1"],
                 ["data", "split", str(data), "-o", str(tmp_path / "s"), "--cop-base", "1"]):
        out = medtune(*args)
        assert out.returncode == 2 and out.stderr.strip() == (
            "error: --cop-base / data.cop_base numbers multiple-choice answers: it needs --task "
            "mcqa (protocol labels are names)"), out.stderr
    assert not (tmp_path / "s").exists()


def test_split_warns_about_labels_spelled_two_ways(tmp_path):
    rows = [(f"note about the head {i}", "CT Head without contrast" if i % 2 else
             "ct head without contrast") for i in range(20)]
    rows += [(f"note about the spine {i}", "MRI L-Spine") for i in range(10)]
    pd.DataFrame(rows, columns=["text", "label"]).to_csv(tmp_path / "n.csv", index=False)
    out = medtune("data", "split", str(tmp_path / "n.csv"), "-o", str(tmp_path / "s"),
                  "--min-count", "2")
    assert out.returncode == 0, out.stderr  # the card listed them; the console said nothing
    assert "warning: 1 label pair(s) look like one label spelled two ways" in out.stderr
