"""Crash-safe checkpoints: written to a temporary directory, marked COMPLETE, then renamed.

A directory ``checkpoints/step-N`` without ``COMPLETE`` is never loaded. Weights are safetensors;
optimizer state is loaded with ``torch.load(weights_only=True)``.

Test hook: ``MEDTUNE_TEST_CHECKPOINT_DELAY=SECONDS`` pauses every checkpoint write half-way (weights
written, ``COMPLETE`` not yet), so a test can kill the process while a checkpoint is being written
(tests/test_kill_resume.py). Unset in normal use.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medtune.errors import MedtuneError, describe
from medtune.fsdp import full_trainable_state, is_sharded, load_full_states
from medtune.fsutil import atomic_dir, prepare_output_dir, read_json, write_json

MARKER = "COMPLETE"


def rng_states(world: int = 1) -> dict[str, torch.Tensor]:
    """This process's RNG states ('torch', 'cuda'); with several processes also every rank's
    ('torch.rank1', ...), so each resumes its own dropout stream. A collective when
    ``world > 1``: every rank calls it."""
    own = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        own["cuda"] = torch.cuda.get_rng_state()
    if world == 1:
        return own
    import torch.distributed as dist

    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, own)
    return {**own, **{f"{key}.rank{r}": value.cpu() for r, states in enumerate(gathered)
                      for key, value in states.items()}}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler,
                    state: dict[str, Any], keep: int = 2,
                    full: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None,
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """``full``: (weights, optimizer state) already gathered from FSDP shards (medtune.fsdp);
    ``rng``: every rank's RNG states (``rng_states``), else this process's."""
    target = run_dir / "checkpoints" / f"step-{step:07d}"
    weights, optim_state = full if full is not None else (full_trainable_state(model), optimizer.state_dict())
    with atomic_dir(target) as tmp:
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save(optim_state, tmp / "optimizer.pt")
        _test_delay()
        save_file(rng or rng_states(), str(tmp / "rng.safetensors"))
        write_json(tmp / "trainer_state.json", {
            **state, "step": step, "scheduler": scheduler.state_dict(),
            "python_random": list(random.getstate()[1]),
        })
        (tmp / MARKER).write_text("ok\n")  # last file written before the rename
    prune(run_dir, keep)
    return target


def _test_delay() -> None:
    delay = os.environ.get("MEDTUNE_TEST_CHECKPOINT_DELAY")
    if delay:
        time.sleep(float(delay))


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir()
             if p.is_dir() and p.name.startswith("step-") and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def prune(run_dir: Path, keep: int) -> None:
    root = run_dir / "checkpoints"
    done = complete_checkpoints(run_dir)
    for old in done[: max(0, len(done) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)
    for junk in root.glob(".step-*"):  # temporary dirs left by a crash mid-write
        shutil.rmtree(junk, ignore_errors=True)


def load_checkpoint(path: Path, model, optimizer, scheduler, rank: int = 0) -> dict[str, Any]:
    weights = load_file(str(path / "trainable.safetensors"))
    optim_state = torch.load(path / "optimizer.pt", weights_only=True)
    if is_sharded(model):  # FSDP: every rank reads the full state and keeps its shards
        load_full_states(model, optimizer, weights, optim_state)
    else:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        optimizer.load_state_dict(optim_state)
    state = read_json(path / "trainer_state.json")
    scheduler.load_state_dict(state.pop("scheduler"))
    rng = load_file(str(path / "rng.safetensors"))
    own = {key: rng.get(f"{key}.rank{rank}", rng.get(key)) for key in ("torch", "cuda")}
    torch.set_rng_state(own["torch"])
    if own["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(own["cuda"])
    py = state.pop("python_random")
    random.setstate((3, tuple(py), None))
    return state


def resume(path: Path, model, optimizer, scheduler, *, rank: int, total: int,
           config: dict[str, Any], digest: str) -> dict[str, Any]:
    """Load checkpoint ``path`` to continue a run that ends at step ``total`` with ``config``
    and training examples of ``digest`` (``batching.examples_digest``). A config the checkpoint
    cannot be loaded into, or one that ended before it, is one error line naming the changed
    keys; other changes and other data are warnings (rank 0)."""
    saved = read_json(path / "trainer_state.json")
    changed = config_changes(saved.get("config"), config)
    if saved["step"] > total:
        raise MedtuneError(f"{path}: the checkpoint is at step {saved['step']} but this config ends "
                           f"at step {total}; raise train.max_steps (or train.epochs) to go on")
    try:
        state = load_checkpoint(path, model, optimizer, scheduler, rank=rank)
    except (RuntimeError, ValueError, KeyError) as exc:  # LoRA shapes, parameter groups, names
        raise MedtuneError(f"{path}: cannot resume with this config (changed since the "
                           f"checkpoint: {', '.join(changed) or 'none'}; {describe(exc, 120)}); "
                           "resume with the run's config or start a new run") from None
    if rank == 0 and changed:  # the schedule and optimizer state came from the old config
        print(f"warning: config changed since the checkpoint: {', '.join(changed)}; the result "
              "will differ from an uninterrupted run", file=sys.stderr)
    if rank == 0 and saved.get("data_digest") not in (None, digest):
        print("warning: the training examples differ from the checkpoint's: the batches and the "
              "result will differ from an uninterrupted run", file=sys.stderr)
    return state


SAFE_TO_CHANGE = {"train.log_every", "train.eval_every", "train.eval_samples", "train.save_every",
                  "train.keep_checkpoints"}  # bookkeeping: a resumed run trains the same


def config_changes(saved: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Dotted keys (``predict`` aside) whose value differs between the config a checkpoint was
    written with and the resuming one; [] for a checkpoint that predates this record."""
    if not saved:
        return []
    return sorted(f"{section}.{key}" for section, values in current.items() if section != "predict"
                  for key, value in values.items()
                  if saved.get(section, {}).get(key, value) != value
                  and f"{section}.{key}" not in SAFE_TO_CHANGE)


def previous_run(run_dir: Path) -> Path:
    """Where --overwrite keeps what ``run_dir`` held until the new run is saved."""
    run_dir = run_dir.absolute()
    return run_dir.with_name(f".{run_dir.name}.previous")


def fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Create the run directory, empty: nothing of a previous run (metrics appended to,
    checkpoints picked by --resume, a full fine-tune's weights next to a new adapter) may leak
    into this one. With --overwrite the previous contents move to ``previous_run`` and are
    deleted by ``save``: a crash or Ctrl-C before then loses no finished run. Where that folder
    exists already, an earlier replacement never finished: it keeps the run it holds and the
    unfinished one here is emptied. ``setup`` has refused an output holding the inputs."""
    prepare_output_dir(run_dir, overwrite)
    if not any(run_dir.iterdir()):
        return
    kept = previous_run(run_dir)
    if not kept.exists():
        os.replace(run_dir, kept)
        run_dir.mkdir()
        print(f"{run_dir}: its previous contents are kept in {kept} until this run is saved",
              file=sys.stderr)
        return
    for path in run_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
