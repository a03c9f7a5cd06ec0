"""Data-parallel training on CPU: 2 processes (torchrun, and accelerate launch with the shipped
config) must end with the adapter that one process gets from the same global batches, see every
example of an uneven last batch, validate the same, and leave only rank 0's files behind.

Both launches start at once in a module fixture (they run while the single-process references
train in this process), each process on one thread."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_NOTES
from medtune.config import load_config
from medtune.train import all_reduce_grads_, rank_share, train

ROOT = Path(__file__).resolve().parents[1]
HEAD, BODY = [TINY_NOTES[i] for i in (0, 1, 4, 5)], [TINY_NOTES[i] for i in (2, 3, 6, 7)]
TOL = 1e-4
# batch 4 over 2 ranks; every step is 2 + 2 except the epoch's short batch:
#   13 rows -> a batch of 1: rank 0 gets nothing that step (still joins every collective)
#   15 rows -> a batch of 3: 1 + 2 (the old split dropped the third example)
COMMON = ["model.device=cpu", "lora.r=8", "lora.dropout=0", "train.batch_size=4",
          "train.epochs=1", "train.lr=5e-3", "train.warmup_steps=0", "train.eval_every=2",
          "train.eval_samples=8", "train.log_every=1", "train.save_every=2",
          "train.keep_checkpoints=5"]
# case: (launcher + config, rows, quantization, extra overrides); "fsdp": the shipped accelerate
# FSDP config, which makes the trainer shard (FSDP2) the NF4 base, LoRA and optimizer state over the
# two processes; "fsdp-full": full fine-tuning sharded (every weight, the root's included, trains)
CASES = {"nf4": ("torchrun", 13, "nf4", ()), "none": ("accelerate-ddp", 15, "none", ()),
         "fsdp": ("accelerate-fsdp", 13, "nf4", ()),
         "fsdp-full": ("torchrun", 15, "none", ("lora.enabled=false", "train.fsdp=true"))}

TRACKED = "none"  # the case launched with --track


def _rows(n: int, prefix: str) -> pd.DataFrame:
    notes, labels = HEAD + BODY, ["CT Head"] * 4 + ["L-Spine"] * 4
    return pd.DataFrame({"id": [f"{prefix}{i}" for i in range(n)],
                         "text": [f"{notes[i % 8]} visit {i}" for i in range(n)],
                         "label": [labels[i % 8] for i in range(n)]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(launcher: str, nproc: int, args: list[str], log: Path,
            tracking: Path | None = None) -> subprocess.Popen:
    port = str(_free_port())
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", port, "-m", "medtune", "train", *args]
    else:  # a shipped accelerate config (MULTI_GPU or FSDP) on CPU: model.device=cpu -> gloo
        config = ROOT / "configs" / "accelerate" / f"{launcher.split('-')[1]}.yaml"
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(config), "--num_processes", str(nproc),
               "--main_process_port", port, "-m", "medtune", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg"}
    if tracking is not None:  # --track: a private MLflow store, its artifacts next to it
        cmd.append("--track")
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tracking / 'mlruns.db'}",
                   MLFLOW_EXPERIMENT_NAME="ddp")
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                cwd=tracking or ROOT,
                                start_new_session=True)  # a hung run is killed with its ranks


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory):
    """{case: (two-process run dir, one-process run dir, launcher log)}."""
    root = tmp_path_factory.mktemp("ddp")
    val = root / "val.csv"
    _rows(8, "v").to_csv(val, index=False)
    procs, out, codes = {}, {}, {}
    try:
        singles: dict[tuple, Path] = {}
        for case, (launcher, n, quant, extra) in CASES.items():
            data = root / f"train{n}.csv"
            _rows(n, "r").to_csv(data, index=False)
            overrides = [f"model.base={tiny_base}", f"model.quantization={quant}", *COMMON,
                         *[e for e in extra if not e.startswith("train.fsdp")]]
            multi, log = root / f"multi-{case}", root / f"{case}.log"
            procs[case] = _launch(launcher, 2, ["--data", str(data), "--val", str(val),
                                                "--output", str(multi), *overrides, *extra], log,
                                  tracking=root if case == TRACKED else None)
            key = (n, quant, *overrides)
            if key not in singles:  # the one-process reference (fsdp shares nf4's)
                singles[key] = train(load_config(None, overrides), str(data),
                                     root / f"single-{case}", val=str(val), progress=False)
            out[case] = (multi, singles[key], log)
        deadline = time.monotonic() + 180
        for case, proc in procs.items():
            try:
                codes[case] = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # a collective that never completes: a hang
                codes[case] = "timeout"
    finally:
        for proc in procs.values():  # never leave ranks behind
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    for case, code in codes.items():
        assert code == 0, f"{case}: launcher exited {code}\n{out[case][2].read_text()[-3000:]}"
    return out


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_json(run / "metrics.jsonl", lines=True)


# ----------------------------------------------------------------------------- unit
def test_rank_share_covers_every_example_once_with_near_equal_shares():
    for n in range(0, 12):
        for world in (1, 2, 3, 4):
            parts = [rank_share(list(range(100, 100 + n)), r, world) for r in range(world)]
            assert [i for p in parts for i in p] == list(range(100, 100 + n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert rank_share([7, 8, 9], 0, 2) == [7] and rank_share([7, 8, 9], 1, 2) == [8, 9]
    assert rank_share([5], 0, 2) == [] and rank_share([5], 1, 2) == [5]


def test_all_reduce_grads_is_a_no_op_without_a_process_group():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    all_reduce_grads_([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))


# ----------------------------------------------------------------------------- two processes
def _trained(run: Path) -> dict[str, torch.Tensor]:
    """The adapter, or the whole model of a full fine-tuning run."""
    adapter = run / "adapter" / "adapter_model.safetensors"
    return load_file(str(adapter if adapter.is_file() else run / "model.safetensors"))


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_train_the_same_adapter_as_one(runs, case, tiny_base):
    multi, single, _ = runs[case]
    a, b = _trained(multi), _trained(single)
    assert a.keys() == b.keys() and len(a) > 0
    if (multi / "adapter").is_dir():  # B starts at zero
        moved = max(float(v.abs().max()) for k, v in b.items() if "lora_B" in k)
    else:  # full fine-tuning: distance from the base's weights
        base = load_file(str(tiny_base / "model.safetensors"))
        moved = max(float((b[k] - base[k]).abs().max()) for k in base)
    assert moved > 100 * TOL  # the comparison below is not trivially true
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < TOL, f"{case}: adapters differ by {worst}"


def test_tracked_run_is_one_mlflow_run_from_rank0(runs):
    from mlflow import MlflowClient

    multi, _, _ = runs[TRACKED]
    client = MlflowClient(tracking_uri=f"sqlite:///{multi.parent / 'mlruns.db'}")
    found = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert len(found) == 1  # every rank used to start (and finish) a run of its own
    run = found[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == "4"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_validation_match_and_only_rank0_wrote(runs, case):
    multi, single, _ = runs[case]
    m, s = _metrics(multi), _metrics(single)
    # one row per step and per evaluation: a second writer would duplicate them
    train_m, train_s = m[m["loss"].notna()], s[s["loss"].notna()]
    assert train_m["step"].tolist() == train_s["step"].tolist() == [1, 2, 3, 4]
    assert np.abs(train_m["loss"].to_numpy() - train_s["loss"].to_numpy()).max() < 1e-4
    val_m, val_s = m[m["val_loss"].notna()], s[s["val_loss"].notna()]
    assert val_m["step"].tolist() == val_s["step"].tolist() == [2, 4]
    assert np.abs(val_m["val_loss"].to_numpy() - val_s["val_loss"].to_numpy()).max() < 1e-4
    assert val_m["val_accuracy"].tolist() == val_s["val_accuracy"].tolist()
    ckpts = sorted(p.name for p in (multi / "checkpoints").iterdir())
    assert ckpts == ["step-0000002", "step-0000004"]
    assert all((multi / "checkpoints" / c / "COMPLETE").is_file() for c in ckpts)
    assert not [p for p in multi.rglob("*") if p.name.endswith(".tmp") or ".old" in p.name]
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())


def _run_launch(launcher: str, args: list[str], log: Path) -> None:
    """Two processes to the end (killed with their ranks after 180 s); exit code 0 expected."""
    proc = _launch(launcher, 2, args, log)
    try:
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 0, log.read_text()[-3000:]


def _resumable_copy(run: Path, to: Path) -> Path:
    """``run`` as it was after its step-2 checkpoint: later checkpoint and outputs removed."""
    import shutil

    shutil.copytree(run, to)
    for stale in ("checkpoints/step-0000004", "adapter", "medtune.json"):
        path = to / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return to


def _resume_matches(run: Path, data: Path, val: Path, overrides: list[str], tmp_path: Path) -> None:
    """``run`` resumed (torchrun, two processes) from its step-2 checkpoint ends with the same
    adapter as the uninterrupted ``run``."""
    again = _resumable_copy(run, tmp_path / "again")
    _run_launch("torchrun", ["--data", str(data), "--val", str(val), "--output", str(again),
                             "--resume", *overrides], tmp_path / "resume.log")
    assert "resuming from step-0000002" in (tmp_path / "resume.log").read_text()
    a = load_file(str(again / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_fsdp_run_was_sharded_and_resumes_to_the_same_adapter(runs, tiny_base, tmp_path):
    import json

    multi, _, _ = runs["fsdp"]
    assert json.loads((multi / "medtune.json").read_text())["sharded"] is True
    assert json.loads((runs["nf4"][0] / "medtune.json").read_text())["sharded"] is False
    # resume the sharded run from its step-2 checkpoint (torchrun + train.fsdp=true this time)
    data, val = multi.parent / "train13.csv", multi.parent / "val.csv"
    overrides = [f"model.base={tiny_base}", "model.quantization=nf4", *COMMON, "train.fsdp=true"]
    _resume_matches(multi, data, val, overrides, tmp_path)


def test_two_process_resume_with_dropout_restores_each_ranks_random_stream(runs, tiny_base,
                                                                          tmp_path):
    """With LoRA dropout every rank draws its own masks; a checkpoint used to keep only rank 0's
    RNG state, so after --resume both ranks drew the same masks and the adapter differed."""
    data, val = runs["nf4"][0].parent / "train13.csv", runs["nf4"][0].parent / "val.csv"
    overrides = [f"model.base={tiny_base}", "model.quantization=nf4", *COMMON, "lora.dropout=0.3",
                 "train.eval_every=0"]
    whole = tmp_path / "whole"
    _run_launch("torchrun", ["--data", str(data), "--val", str(val), "--output", str(whole),
                             *overrides], tmp_path / "whole.log")
    _resume_matches(whole, data, val, overrides, tmp_path)
