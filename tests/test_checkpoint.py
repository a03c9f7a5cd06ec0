"""Checkpoints: crash-safe writes, COMPLETE marker, pruning, exact resume after a crash."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_NOTES
from medtune import checkpoint as ckpt
from medtune.config import Config, load_config
from medtune.errors import MedtuneError
from medtune.train import train

N, K = 6, 3  # uninterrupted steps; the crash comes right after the step-K checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ckpt_data") / "train.csv"
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(path, index=False)
    return str(path)


def run_cfg(base: Path, *extra: str) -> Config:
    # dropout > 0 so the resumed run must also restore the RNG state to match
    return load_config(None, [f"model.base={base}", "model.device=cpu", "model.quantization=nf4",
                              "lora.r=4", "lora.dropout=0.1", "train.batch_size=4",
                              "train.lr=1e-2", "train.warmup_steps=2", "train.scheduler=cosine",
                              f"train.max_steps={N}", f"train.save_every={K}",
                              "train.eval_every=0", "train.eval_samples=2", "train.log_every=1",
                              "train.keep_checkpoints=3", *extra])


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def run_a(tiny_base, data, tmp_path_factory) -> Path:
    """N steps without interruption."""
    return train(run_cfg(tiny_base), data, tmp_path_factory.mktemp("a") / "run", val=data,
                 progress=False)


class Crash(Exception):
    pass


def test_resume_after_crash_matches_uninterrupted_run(run_a, tiny_base, data, tmp_path):
    def crash_after_checkpoint(row):
        if row.get("step") == K + 1:  # step K's checkpoint is on disk; step K+1 is lost
            raise Crash

    run_b = tmp_path / "run"
    with pytest.raises(Crash):
        train(run_cfg(tiny_base), data, run_b, val=data, progress=False,
              callbacks=[crash_after_checkpoint])
    assert [p.name for p in ckpt.complete_checkpoints(run_b)] == [f"step-{K:07d}"]
    assert not (run_b / "adapter").exists()
    at_k = load_file(str(run_b / "checkpoints" / f"step-{K:07d}" / "trainable.safetensors"))
    # the checkpoint records the training time so far; pretend the first process took 1000 s
    state_file = run_b / "checkpoints" / f"step-{K:07d}" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert 0 < state["elapsed_s"] < 1000
    state_file.write_text(json.dumps({**state, "elapsed_s": 1000.0}))

    train(run_cfg(tiny_base), data, run_b, val=data, progress=False, resume=True)
    rows = [json.loads(x) for x in (run_b / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, N + 1))  # no stale rows
    # time adds up over the resume instead of restarting from zero
    assert all(r["elapsed_s"] > 1000 for r in rows if r.get("step", 0) > K and "loss" in r)
    summary = json.loads((run_b / "medtune.json").read_text())["summary"]
    assert 1000 < summary["train_seconds"] < 1000 + 600
    final_a, final_b = adapter(run_a), adapter(run_b)
    assert max_diff(final_a, final_b) < 1e-5
    # not vacuous: the resumed run really trained past step K
    last = ckpt.complete_checkpoints(run_b)[-1]
    assert last.name == f"step-{N:07d}"
    assert max_diff(at_k, load_file(str(last / "trainable.safetensors"))) > 1e-4


def test_validation_during_training_does_not_change_training(run_a, tiny_base, data, tmp_path):
    # validate() switches the 4-bit model to eval mode mid-run; training must not notice
    run_c = train(run_cfg(tiny_base, "train.eval_every=2"), data, tmp_path / "run", val=data,
                  progress=False)
    rows = (run_c / "metrics.jsonl").read_text()
    assert rows.count("val_accuracy") == N // 2
    assert max_diff(adapter(run_a), adapter(run_c)) < 1e-5


def test_ctrl_c_checkpoints_then_resume_finishes_the_same_run(run_a, tiny_base, data, tmp_path,
                                                              capsys):
    def ctrl_c_at_step_2(row):
        if row.get("step") == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled: finish the step, checkpoint, stop

    run = tmp_path / "run"
    before = signal.getsignal(signal.SIGINT)  # other tests (e.g. Spark) may have installed their own
    if before in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        before = signal.default_int_handler
    with pytest.raises(MedtuneError, match=r"interrupted: checkpoint saved at step 2\b"):
        train(run_cfg(tiny_base), data, run, val=data, progress=False,
              callbacks=[ctrl_c_at_step_2])
    assert [p.name for p in ckpt.complete_checkpoints(run)] == ["step-0000002"]
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    capsys.readouterr()
    train(run_cfg(tiny_base), data, run, val=data, progress=False, resume=True)
    assert max_diff(adapter(run_a), adapter(run)) < 1e-5
    assert "config changed" not in capsys.readouterr().err  # the same config: no warning


def test_a_second_ctrl_c_stops_at_once(tiny_base, data, tmp_path):
    def ctrl_c_twice(row):  # e.g. a step that hangs: the user presses Ctrl-C again
        if row.get("step") == 1:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    if before in (signal.SIG_IGN, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
        before = signal.default_int_handler
    with pytest.raises(KeyboardInterrupt):
        train(run_cfg(tiny_base), data, tmp_path / "run", val=data, progress=False,
              callbacks=[ctrl_c_twice])
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    assert ckpt.complete_checkpoints(tmp_path / "run") == []  # none was half-written


def test_resume_with_a_changed_config_warns_naming_the_keys(tiny_base, data, tmp_path, capsys):
    run = tmp_path / "run"
    train(run_cfg(tiny_base, "train.max_steps=2", "train.save_every=1"), data, run, val=data,
          progress=False)
    capsys.readouterr()
    train(run_cfg(tiny_base, "train.max_steps=3", "train.lr=5e-3", "train.log_every=2"), data,
          run, val=data, progress=False, resume=True)
    err = capsys.readouterr().err
    # save_every and log_every are bookkeeping: not listed
    assert "warning: config changed since the checkpoint: train.lr, train.max_steps;" in err
    assert ckpt.config_changes(None, Config().to_dict()) == []  # a checkpoint from before


def test_resume_that_cannot_go_on_is_one_error_line_and_other_data_warns(tiny_base, data,
                                                                        tmp_path, capsys):
    run = tmp_path / "run"
    train(run_cfg(tiny_base, "train.max_steps=2", "train.save_every=1"), data, run, val=data,
          progress=False)
    # another LoRA rank: the adapter cannot load (was a RuntimeError traceback)
    with pytest.raises(MedtuneError, match=r"cannot resume with this config \(changed since the "
                                           r"checkpoint: lora.r, train.max_steps;"):
        train(run_cfg(tiny_base, "lora.r=8", "train.max_steps=3"), data, run, val=data,
              progress=False, resume=True)
    # a config that ends before the checkpoint (was a silent 'success' at step 2 of 1)
    with pytest.raises(MedtuneError, match=r"checkpoint is at step 2 but this config ends at "
                                           r"step 1; raise train.max_steps"):
        train(run_cfg(tiny_base, "train.max_steps=1"), data, run, val=data, progress=False,
              resume=True)
    other = tmp_path / "other.csv"  # the same labels, fewer notes
    pd.read_csv(data).iloc[:12].to_csv(other, index=False)
    capsys.readouterr()
    train(run_cfg(tiny_base, "train.max_steps=3"), str(other), run, val=data, progress=False,
          resume=True)
    assert "warning: the training examples differ from the checkpoint's" in capsys.readouterr().err


def test_resume_without_complete_checkpoint_is_an_error(tiny_base, data, tmp_path):
    run = tmp_path / "run"
    half = run / "checkpoints" / "step-0000002"  # a crash mid-write: no COMPLETE marker
    half.mkdir(parents=True)
    (half / "trainable.safetensors").write_bytes(b"garbage")
    assert ckpt.complete_checkpoints(run) == []
    with pytest.raises(MedtuneError, match="no complete checkpoint"):
        train(run_cfg(tiny_base), data, run, val=data, progress=False, resume=True)
    with pytest.raises(MedtuneError, match="no complete checkpoint"):
        train(run_cfg(tiny_base), data, tmp_path / "fresh", val=data, progress=False,
              resume=True)


# ----------------------------------------------------------------------------- unit level
def _toy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)  # frozen: not part of a checkpoint
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return model, opt, sched


def _train_step(model, opt, sched) -> None:
    model(torch.randn(3, 4)).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_checkpoint_roundtrip_continues_identically(tmp_path):
    model, opt, sched = _toy()
    _train_step(model, opt, sched)
    random.seed(7)
    path = ckpt.save_checkpoint(tmp_path, 1, model, opt, sched, {"epoch": 0}, keep=2)
    assert (path / ckpt.MARKER).is_file()
    saved = load_file(str(path / "trainable.safetensors"))
    assert set(saved) == {"0.bias", "1.weight", "1.bias"}  # frozen 0.weight is not saved
    py_next = random.random()
    for _ in range(2):  # inputs come from the torch RNG; AdamW moments and lr carry over
        _train_step(model, opt, sched)

    model2, opt2, sched2 = _toy()
    state = ckpt.load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 1 and state["epoch"] == 0
    assert random.random() == py_next
    for _ in range(2):
        _train_step(model2, opt2, sched2)
    assert sched2.get_last_lr() == sched.get_last_lr()
    for (name, p), p2 in zip(model.named_parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, p2), name


def test_incomplete_checkpoints_are_ignored_and_old_ones_pruned(tmp_path):
    model, opt, sched = _toy()
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, model, opt, sched, {}, keep=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000003", "step-0000004"]
    (root / "step-0000009").mkdir()  # newer but incomplete: never the one loaded
    leftover = root / ".step-0000005.abc.tmp"  # temp dir of a crash mid-write
    leftover.mkdir()
    found = ckpt.complete_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-0000003", "step-0000004"]
    ckpt.save_checkpoint(tmp_path, 5, model, opt, sched, {}, keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-0000004", "step-0000005", "step-0000009"]  # leftover temp removed
    assert not leftover.exists()
    assert ckpt.complete_checkpoints(tmp_path)[-1].name == "step-0000005"
