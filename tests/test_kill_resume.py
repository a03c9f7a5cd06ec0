"""Crash safety of `medtune train` as a real process: SIGKILL at a random step, SIGKILL while a
checkpoint is being written, then `--resume` finishes the same run as an uninterrupted one; and
Ctrl-C (SIGINT) checkpoints and exits with a one-line message.

Checkpoint writes are slowed with the test hook ``MEDTUNE_TEST_CHECKPOINT_DELAY`` (seconds slept
half-way through every checkpoint write, see medtune.checkpoint) so that the kills land where
intended on any machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from safetensors.torch import load_file

from conftest import TINY_NOTES
from medtune import checkpoint as ckpt
from medtune.config import load_config
from medtune.train import train

N = 8  # training steps of the run
SEED = 20240607  # where the first kill lands is a seeded random choice
DELAY = "0.4"  # seconds each checkpoint write pauses half-way in the killed runs


def overrides(base: Path, steps: int = N) -> list[str]:
    # nf4 + LoRA (the QLoRA path); dropout > 0 so resume must also restore the RNG state
    return [f"model.base={base}", "model.device=cpu", "model.quantization=nf4", "lora.r=4",
            "lora.dropout=0.1", "train.batch_size=4", "train.lr=1e-2", "train.warmup_steps=2",
            "train.scheduler=cosine", f"train.max_steps={steps}", "train.save_every=1",
            "train.eval_every=0", "train.eval_samples=2", "train.log_every=1",
            "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kill_data") / "train.csv"
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(path, index=False)
    return path


class Proc:
    """`python -m medtune train ...` in the background, output to files (no pipe to fill)."""

    def __init__(self, workdir: Path, name: str, args: list[str], delay: str | None):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
               "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
        env.pop("MEDTUNE_TEST_CHECKPOINT_DELAY", None)
        if delay:
            env["MEDTUNE_TEST_CHECKPOINT_DELAY"] = delay
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.p = subprocess.Popen([sys.executable, "-m", "medtune", *args], stdout=out,
                                      stderr=err, env=env, cwd=workdir)

    def wait_until(self, condition: Callable[[], bool], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.p.poll() is not None:
                raise AssertionError(f"process ended (rc {self.p.returncode}) before the "
                                     f"condition:\n{self.stderr()[-3000:]}")
            if time.monotonic() > deadline:
                self.p.kill()
                raise AssertionError("timed out waiting for the training process")
            time.sleep(0.01)

    def kill(self, sig: int = signal.SIGKILL) -> int:
        self.p.send_signal(sig)
        return self.p.wait(timeout=120)

    def finish(self) -> int:
        return self.p.wait(timeout=300)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


def train_args(data: Path, run: Path, base: Path, *extra: str, steps: int = N) -> list[str]:
    return ["train", "--data", str(data), "--val", str(data), "--output", str(run), *extra,
            *overrides(base, steps)]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError):  # a line being appended right now
            steps.append(json.loads(line)["step"])
    return steps


def complete_steps(run: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in ckpt.complete_checkpoints(run)]


def temp_checkpoints(run: Path) -> list[Path]:
    root = run / "checkpoints"
    return sorted(root.glob(".step-*")) if root.is_dir() else []


def adapter(run: Path):
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_uninterrupted_run(tiny_base, data, tmp_path):
    reference = train(load_config(None, overrides(tiny_base)), str(data), tmp_path / "ref",
                      val=str(data), progress=False)
    run = tmp_path / "run"

    # 1. SIGKILL at a random step
    k = random.Random(SEED).randint(2, N - 3)
    first = Proc(tmp_path, "first", train_args(data, run, tiny_base), DELAY)
    first.wait_until(lambda: any(s >= k for s in logged_steps(run)))
    assert first.kill() == -signal.SIGKILL
    done1 = complete_steps(run)
    assert done1 and k - 1 <= done1[-1] <= k + 1, (k, done1)
    assert not (run / "adapter").exists() and not (run / "medtune.json").exists()

    # 2. resume, and SIGKILL while its first checkpoint is half-written
    before = set(temp_checkpoints(run))  # the first kill may have left one already

    def new_temp() -> list[Path]:
        return [p for p in temp_checkpoints(run) if p not in before
                and (p / "trainable.safetensors").is_file()]

    second = Proc(tmp_path, "second", train_args(data, run, tiny_base, "--resume"), DELAY)
    second.wait_until(lambda: bool(new_temp()))
    second.kill()
    assert f"resuming from step-{done1[-1]:07d}" in second.stderr()
    half = new_temp()
    assert len(half) == 1, "the kill should have left a half-written checkpoint behind"
    assert not (half[0] / ckpt.MARKER).exists()  # weights written, never marked complete
    half_step = int(re.match(r"\.step-(\d+)\.", half[0].name).group(1))
    assert half_step == done1[-1] + 1
    done2 = complete_steps(run)
    assert done2 == done1  # the half-written one is not among the loadable ones

    # 3. resume to the end: it starts from the newest *complete* checkpoint
    third = Proc(tmp_path, "third", train_args(data, run, tiny_base, "--resume"), None)
    assert third.finish() == 0, third.stderr()[-3000:]
    assert f"resuming from step-{done2[-1]:07d} (step {done2[-1]}/{N})" in third.stderr()
    assert temp_checkpoints(run) == []  # leftovers of the crash are cleaned up
    assert complete_steps(run) == [N - 1, N]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, N + 1))  # each step once
    a, b = adapter(reference), adapter(run)
    assert a.keys() == b.keys()
    assert max(float((a[n] - b[n]).abs().max()) for n in a) < 1e-5
    # not vacuous: training moved the adapter (LoRA B starts at zero)
    assert max(float(v.abs().max()) for n, v in b.items() if "lora_B" in n) > 1e-4


def test_sigint_checkpoints_and_exits_with_one_line(tiny_base, data, tmp_path):
    run = tmp_path / "run"
    proc = Proc(tmp_path, "ctrl_c", train_args(data, run, tiny_base, steps=40), "0.05")
    proc.wait_until(lambda: any(s >= 2 for s in logged_steps(run)))
    rc = proc.kill(signal.SIGINT)
    err = proc.stderr()
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    m = re.fullmatch(r"error: interrupted: checkpoint saved at step (\d+); continue with "
                     r"--resume", errors[0])
    assert m, errors[0]
    step = int(m.group(1))
    assert 2 <= step < 40
    assert complete_steps(run)[-1] == step  # the promised checkpoint exists and is complete
    assert not (run / "medtune.json").exists()  # the run is not marked finished
