"""Numerics: a non-finite loss or gradient stops training with a message naming the step and the
usual cause, before that step's optimizer update and checkpoint."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

import medtune.train as train_mod
from conftest import TINY_NOTES
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.train import train

BAD_STEP = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("num_data") / "train.csv"
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(path, index=False)
    return str(path)


def cfg(base: Path):
    return load_config(None, [f"model.base={base}", "model.device=cpu", "model.quantization=none",
                              "lora.r=4", "train.batch_size=4", "train.max_steps=5",
                              "train.save_every=1", "train.keep_checkpoints=5",
                              "train.eval_every=0", "train.eval_samples=2", "train.log_every=1"])


def checkpoints(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def check_stopped(run: Path, message: str, what: str) -> None:
    assert f"{what} became" in message and f"at step {BAD_STEP}:" in message
    assert "fp16" in message and "learning rate" in message  # the usual causes are named
    assert "\n" not in message
    # nothing written for the bad step, and the run is not marked finished
    assert checkpoints(run) == [f"step-{s:07d}" for s in range(1, BAD_STEP)]
    assert not (run / "adapter").exists() and not (run / "medtune.json").exists()


@pytest.mark.parametrize("poison", [float("inf"), float("-inf")])
def test_infinite_loss_stops_before_the_update(poison, tiny_base, data, tmp_path, monkeypatch):
    real, calls = train_mod.supervised_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        ce, n = real(*args, **kwargs)
        calls["n"] += 1
        return (ce * poison, n) if calls["n"] == BAD_STEP else (ce, n)

    monkeypatch.setattr(train_mod, "supervised_loss", poisoned)
    run = tmp_path / "run"
    with pytest.raises(MedtuneError) as err:
        train(cfg(tiny_base), data, run, val=data, progress=False)
    check_stopped(run, str(err.value), "loss")
    assert f"loss became {poison}" in str(err.value)


def test_non_finite_gradient_with_finite_loss_stops(tiny_base, data, tmp_path, monkeypatch):
    """An fp16 backward can overflow while the loss itself is finite: the gradient norm catches
    it, and the weights stay those of the last good step."""
    real, calls = train_mod._step, {"n": 0}

    def overflowing_backward(s, *args, **kwargs):
        out = real(s, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == BAD_STEP:
            grad = next(p.grad for p in s.model.parameters() if p.grad is not None)
            grad.view(-1)[0] = float("nan")
            seen["model"] = s.model
        return out

    seen: dict = {}
    monkeypatch.setattr(train_mod, "_step", overflowing_backward)
    run = tmp_path / "run"
    with pytest.raises(MedtuneError) as err:
        train(cfg(tiny_base), data, run, val=data, progress=False)
    check_stopped(run, str(err.value), "gradient norm")
    last_good = load_file(str(run / "checkpoints" / f"step-{BAD_STEP - 1:07d}" /
                              "trainable.safetensors"))
    params = dict(seen["model"].named_parameters())
    for name, value in last_good.items():  # the optimizer never applied the bad gradient
        assert torch.equal(params[name].detach(), value), name
