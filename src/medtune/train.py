"""`medtune train`: completion-only QLoRA fine-tuning with checkpoints and exact resume.

Recipe shape: setup -> fit -> save. The loss is computed on answer tokens only, and the LM head
runs only at those positions: with a 32k-256k vocabulary the [batch, seq, vocab] logits tensor is
most of the head's cost and memory, while a classification answer is a handful of tokens.

    tokens/step = batch_size x padded length (length-grouped batches keep padding small)
    loss        = sum of CE over supervised tokens in the step / supervised tokens in the step
so the gradient does not depend on how a step is split into micro-batches or processes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medtune import checkpoint as ckpt
from medtune import fsdp
from medtune.batching import (
    Example,
    collate,
    encode_examples,
    epoch_batches,
    examples_digest,
    steps_per_epoch,
)
from medtune.config import Config
from medtune.data import hold_out, load_for_training
from medtune.errors import MedtuneError
from medtune.fsdp import unwrap
from medtune.fsutil import atomic_dir, check_output_dir, read_json, write_json
from medtune.model import (
    attach_lora,
    compute_dtype,
    enable_checkpointing,
    load_base_model,
    load_tokenizer,
    resolve_base,
    resolve_device,
)
from medtune.optim import _is_oom, make_optimizer, make_scheduler, param_groups
from medtune.progress import library_bars
from medtune.runlog import drop_metrics_after, plot_losses
from medtune.scoring import check_head
from medtune.sft import (
    all_reduce_,
    all_reduce_grads_,
    barrier,
    broadcast_trainable_,
    end_distributed,
    init_distributed,
    rank_share,
    supervised_loss,
)
from medtune.tasks import default_template

Callback = Callable[[dict[str, Any]], None]


# ----------------------------------------------------------------------------- setup
@dataclass
class Setup:
    cfg: Config
    run_dir: Path
    model: Any
    tokenizer: Any
    template: Any
    labels: list[str]
    train: list[Example]
    val_texts: list[str]
    val_answers: list[str]
    val: list[Example]
    base: str
    device: str
    rank: int = 0
    world: int = 1
    meta: dict[str, Any] = field(default_factory=dict)


def _last_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of ``run_dir``, for --resume; none is an error."""
    found = ckpt.complete_checkpoints(run_dir)
    if not found:
        raise MedtuneError(f"{run_dir}: --resume given but no complete checkpoint found")
    return found[-1]


def _check_world(cfg: Config, world: int) -> None:
    if cfg.train.batch_size % world:
        raise MedtuneError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                           f"{world} processes")


def setup(cfg: Config, data: str, output: str | Path, *, val: str | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True) -> Setup:
    torch.manual_seed(cfg.train.seed)
    device = resolve_device(cfg.model.device)
    rank, world = init_distributed(device)
    _check_world(cfg, world)
    run_dir = Path(output)
    if not resume:  # refused before any work, by every rank (none waits for the others at a
        # barrier); created by rank 0 once the inputs have loaded
        check_output_dir(run_dir, overwrite, inputs=[data, val, cfg.model.base])
    if resume:
        _last_checkpoint(run_dir)  # none: refused before anything is loaded
    if cfg.model.base != "embedded":
        resolve_base(cfg.model.base)  # a missing base fails here, before the data is read
    if not cfg.lora.enabled and cfg.model.quantization != "none":  # before any base is built
        raise MedtuneError("full fine-tuning (lora.enabled=false) needs model.quantization=none")
    train_df = load_for_training(data, cfg.data, quiet=rank != 0)
    if val:
        val_df = load_for_training(val, cfg.data, quiet=rank != 0)
    else:
        train_df, val_df = hold_out(train_df, cfg.data)
        if train_df.empty:  # before anything is built or written
            raise MedtuneError(f"{data}: no training rows left after holding out {len(val_df)} for "
                               f"validation (data.val_fraction={cfg.data.val_fraction}); give more "
                               "rows, --val FILE, or data.val_fraction=0")
    if cfg.data.scrub_phi:
        from medtune.phi import scrub_text

        train_df = train_df.assign(text=train_df["text"].map(scrub_text))
        val_df = val_df.assign(text=val_df["text"].map(scrub_text))
    labels = sorted(set(train_df["label"]))
    if cfg.data.task == "mcqa":
        labels = ["A", "B", "C", "D"]
    if resume and (run_dir / "labels.json").is_file():
        started = read_json(run_dir / "labels.json").get("labels")
        if started != labels:  # the adapter was trained on another label set
            raise MedtuneError(f"{data}: its labels differ from the run's labels.json ({len(labels)} "
                               f"vs {len(started or [])}); --resume needs the data the run started with")
    if cfg.data.task != "mcqa":  # labels training never saw: a warning line, all of them an error
        from medtune.data import check_unseen_labels

        check_unseen_labels(labels, val_df["label"], val or data, "validation label")
    base = cfg.model.base
    if base == "embedded":
        from medtune.base import build_base

        # rank 0 builds (or finds) the cached base; the others wait, then find it in the cache
        for turn in (0, 1):
            if (rank == 0) == (turn == 0):
                base = str(build_base(list(train_df["text"]), extra_vocab_texts=labels,
                                      progress=progress and rank == 0,
                                      scrub=not cfg.data.scrub_phi))  # scrubbed above if so
            barrier()
    tokenizer = load_tokenizer(base)
    quantized = cfg.model.quantization != "none"
    with library_bars(progress and rank == 0):
        model = load_base_model(base, cfg.model, tokenizer)
    if cfg.model.gradient_checkpointing:
        enable_checkpointing(model)
    if cfg.lora.enabled:
        model = attach_lora(model, cfg.lora, quantized=quantized)
    if quantized:
        _keep_4bit_training_layout(model)
    check_head(model)  # the loss computes the LM head itself: refuse what it cannot reproduce
    if world > 1:
        broadcast_trainable_(model)
        torch.manual_seed(cfg.train.seed + rank)  # independent dropout masks on each rank
    if fsdp.requested(cfg):
        if world > 1:
            fsdp.shard(model, device, world)
        elif rank == 0:
            fsdp.note_single_process()
    template = default_template(cfg.data.task, tokenizer, labels, cfg.model.template)
    enc = [encode_examples(template, tokenizer, list(df["text"]), list(df["label"]),
                           cfg.train.max_length, labels) for df in (train_df, val_df)]
    if rank == 0 and not resume:
        ckpt.fresh_run_dir(run_dir, overwrite)
    local = Path(base).expanduser()  # a local base is recorded absolute: found from any directory
    meta = {"kind": "run" if cfg.lora.enabled else "merged",
            "base": str(local.resolve()) if local.is_dir() else base, "task": cfg.data.task,
            "quantization": cfg.model.quantization, "device": device,
            "compute_dtype": str(compute_dtype(device, cfg.model.compute_dtype)).replace("torch.", ""),
            "train_rows": len(train_df), "val_rows": len(val_df), "data": str(data),
            "data_resolved": str(Path(data).resolve()),  # found again from any directory
            "processes": world, "sharded": fsdp.is_sharded(model),
            "config": cfg.to_dict()}
    return Setup(cfg=cfg, run_dir=run_dir, model=model, tokenizer=tokenizer, template=template,
                 labels=labels, train=enc[0], val_texts=list(val_df["text"]),
                 val_answers=list(val_df["label"]), val=enc[1], base=base, device=device,
                 rank=rank, world=world, meta=meta)


def _keep_4bit_training_layout(model) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights for a faster kernel on the
    first eval-mode forward (``validate``), and that kernel has no backward: every later training
    step would silently get wrong gradients. Keep the trainable layout for the whole run."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# ----------------------------------------------------------------------------- fit
class Interrupted(Exception):
    pass


def _step(s: Setup, batch: list[Example], micro: int, total: torch.Tensor) -> tuple[float, int]:
    """One optimizer step's forward/backward over ``batch`` (this rank's share), in micro-batches.
    ``total``: supervised tokens of the whole step over all ranks (the loss normaliser)."""
    device = s.device
    loss_sum, tokens = 0.0, 0
    parts: list[list[Example] | None] = [batch[i:i + micro] for i in range(0, len(batch), micro)]
    if fsdp.is_sharded(s.model):
        # every rank must run as many forward/backward passes as the others (each one gathers
        # the layers): a rank with fewer runs passes on a stand-in example with zero weight
        parts += [None] * (fsdp.max_over_ranks(len(parts)) - len(parts))
    for part in parts:
        b = collate(part or s.train[:1], s.tokenizer.pad_token_id)
        b = {k: v.to(device) for k, v in b.items()}
        ce, _ = supervised_loss(s.model, b["input_ids"], b["attention_mask"], b["labels"])
        if part is None:
            (ce * 0.0).backward()
            continue
        (ce / total.to(device)).backward()
        loss_sum += ce.item()
        tokens += int(b["attention_mask"].sum())
    return loss_sum, tokens


@torch.no_grad()
def validate(s: Setup) -> dict[str, float]:
    from medtune.scoring import score_labels

    n = min(len(s.val), s.cfg.train.eval_samples)
    if n == 0:
        return {}
    s.model.eval()
    ce_sum, count = 0.0, 0
    for i in range(0, n, 16):
        b = {k: v.to(s.device) for k, v in collate(s.val[i:min(n, i + 16)], s.tokenizer.pad_token_id).items()}
        ce, k = supervised_loss(s.model, b["input_ids"], b["attention_mask"], b["labels"])
        ce_sum, count = ce_sum + float(ce), count + k
    scores = score_labels(s.model, s.tokenizer, s.template, s.val_texts[:n], s.labels,
                          batch_size=8, max_length=s.cfg.train.max_length)
    pred = [s.labels[j] for j in scores.argmax(-1).tolist()]
    acc = sum(p == g for p, g in zip(pred, s.val_answers[:n], strict=True)) / n
    if fsdp.is_sharded(s.model):
        fsdp.reshard(s.model)
    s.model.train()
    return {"val_loss": ce_sum / max(1, count), "val_accuracy": acc}


def _log(s: Setup, row: dict[str, Any], callbacks: Sequence[Callback]) -> None:
    if s.rank != 0:
        return
    with open(s.run_dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")
    for cb in callbacks:
        cb(row)


def fit(s: Setup, *, resume: bool = False, progress: bool = True,
        callbacks: Sequence[Callback] | None = None) -> dict[str, Any]:
    cfg, tc = s.cfg, s.cfg.train
    callbacks = callbacks or []
    _check_world(cfg, s.world)
    spe = steps_per_epoch(len(s.train), tc.batch_size)
    total = tc.max_steps or max(1, math.ceil(spe * tc.epochs))
    params = [p for p in s.model.parameters() if p.requires_grad]
    sharded = fsdp.is_sharded(s.model)
    optimizer = make_optimizer(param_groups(s.model, cfg), cfg, s.device)
    scheduler = make_scheduler(optimizer, cfg, total)
    start_step, state, resumed = 0, {}, {}
    digest = examples_digest(s.train)  # once: every checkpoint records it
    if resume:
        last_ckpt = _last_checkpoint(s.run_dir)
        state = ckpt.resume(last_ckpt, s.model, optimizer, scheduler, rank=s.rank, total=total,
                            config=s.meta["config"], digest=digest)
        start_step = state["step"]
        if s.rank == 0:
            resumed = drop_metrics_after(s.run_dir / "metrics.jsonl", start_step)
            print(f"resuming from {last_ckpt.name} (step {start_step}/{total})", file=sys.stderr)
    lengths = [len(e.input_ids) for e in s.train]
    # a micro-batch size halved after running out of memory stays halved on resume
    micro = tc.micro_batch_size or tc.batch_size
    micro = min(micro, state.get("micro_batch_size") or micro)
    if start_step == 0 and tc.warmup_steps >= total and s.rank == 0:
        print(f"warning: train.warmup_steps={tc.warmup_steps} >= the run's {total} steps: the "
              f"learning rate never reaches train.lr", file=sys.stderr)
    s.model.train()
    stop = {"flag": False}

    def _on_signal(signum, frame):  # Ctrl-C / SIGTERM: finish the step, checkpoint, exit
        if stop["flag"]:  # asked twice: stop now (the last complete checkpoint stays)
            raise KeyboardInterrupt
        stop["flag"] = True

    # every rank traps the signal (torchrun forwards it to all); the flag is all-reduced below
    old = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if _main_thread() else {}
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from medtune.progress import make_progress

    t0, tok_window, last = time.time(), 0, resumed  # resumed: a run killed after its last step
    before = float(state.get("elapsed_s", 0.0))  # training time spent before the resume
    epoch_cache: dict[int, list[list[int]]] = {}
    try:
        with make_progress("train", TextColumn("[bold]train"), BarColumn(),
                           TextColumn("{task.completed}/{task.total}"),
                           TextColumn("loss {task.fields[loss]:.4f} lr {task.fields[lr]:.2e} "
                                      "{task.fields[tps]:.0f} tok/s"), TimeRemainingColumn(),
                           disable=not progress or s.rank != 0) as bar:
            task = bar.add_task("train", total=total, completed=start_step, loss=float("nan"),
                                lr=scheduler.get_last_lr()[0], tps=0.0)
            for step in range(start_step, total):
                epoch, idx = divmod(step, spe)
                if epoch not in epoch_cache:
                    epoch_cache = {epoch: epoch_batches(lengths, tc.batch_size, tc.seed, epoch,
                                                        tc.group_by_length)}
                batch = [s.train[i] for i in rank_share(epoch_cache[epoch][idx], s.rank, s.world)]
                # every sequence supervises its answer tokens incl. EOS; normalise by the global
                # count (outside the OOM retry: a retry on one rank must not repeat a collective)
                n_sup = int(all_reduce_(torch.tensor(float(sum(len(e.input_ids) - e.n_prompt
                                                               for e in batch)))))
                while True:
                    try:
                        loss_sum, tokens = _step(s, batch, micro, torch.tensor(float(n_sup)))
                        break
                    except RuntimeError as exc:
                        if not _is_oom(exc) or micro == 1:
                            raise
                        if sharded:  # a retry on this rank alone would hang the others' gathers
                            raise MedtuneError(
                                f"out of memory at step {step + 1} with FSDP: set "
                                f"train.micro_batch_size below {micro} (a sharded step cannot be "
                                "retried on one rank)") from None
                        optimizer.zero_grad(set_to_none=True)
                        micro = max(1, micro // 2)
                        print(f"out of memory: micro-batch size -> {micro}", file=sys.stderr)
                # one collective for the step's loss, tokens and any rank's stop request
                summed = all_reduce_(torch.tensor([loss_sum, float(tokens), float(stop["flag"])],
                                                  dtype=torch.float64))
                loss = summed[0].item() / max(1, n_sup)
                halt = bool(summed[2].item())  # the same decision on every rank
                if not math.isfinite(loss):
                    raise MedtuneError(
                        f"loss became {loss} at step {step + 1}: training stopped before writing a "
                        "checkpoint (usual causes: fp16 overflow -> use bf16/fp32 compute, or a "
                        "learning rate too high)")
                if s.world > 1 and not sharded:  # FSDP has already summed (and sharded) them
                    all_reduce_grads_(params)
                if tc.max_grad_norm > 0:
                    norm = float(fsdp.full_tensor(torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)))
                    if not math.isfinite(norm):  # finite loss, overflowed backward (fp16)
                        raise MedtuneError(
                            f"gradient norm became {norm} at step {step + 1}: training stopped "
                            "before writing a checkpoint (usual causes: fp16 overflow -> use "
                            "bf16/fp32 compute, or a learning rate too high)")
                lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged with it)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = step + 1
                tok_window += int(summed[1].item())
                elapsed = time.time() - t0  # this process's; tokens/s counts this process's tokens
                bar.update(task, completed=done, loss=loss, lr=lr, tps=tok_window / max(elapsed, 1e-9))
                last = {"step": done, "epoch": round(done / spe, 4), "loss": loss, "lr": lr,
                        "tokens_per_s": tok_window / max(elapsed, 1e-9),
                        "elapsed_s": before + elapsed}
                if done % max(1, tc.log_every) == 0 or done == total:
                    _log(s, last, callbacks)
                if (tc.eval_every and done % tc.eval_every == 0) or done == total:
                    ev = validate(s)
                    if ev:
                        last.update(ev)
                        _log(s, {"step": done, **ev}, callbacks)
                if s.world == 1 and stop["flag"]:  # a request that came in during this step
                    halt = True
                if (tc.save_every and done % tc.save_every == 0) or done == total or halt:
                    # sharded: every rank gathers the full state (collectives), rank 0 writes
                    full = (fsdp.full_trainable_state(s.model),
                            fsdp.full_optimizer_state(s.model, optimizer)) if sharded else None
                    rng = ckpt.rng_states(s.world)  # every rank's dropout stream
                    if s.rank == 0:
                        ckpt.save_checkpoint(s.run_dir, done, s.model, optimizer, scheduler,
                                             {"epoch": epoch, "micro_batch_size": micro,
                                              "config": s.meta["config"],
                                              "data_digest": digest,
                                              "elapsed_s": before + time.time() - t0},
                                             keep=tc.keep_checkpoints, full=full, rng=rng)
                if halt:
                    barrier()  # no rank exits (and gets the others killed) mid-checkpoint
                    raise Interrupted(done)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    # training time over every process that worked on this run (a resume adds to it)
    return {**last, "train_seconds": round(before + time.time() - t0, 2)}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- save
def save(s: Setup, summary: dict[str, Any]) -> Path:
    # sharded (FSDP): every rank gathers the full trainable weights, rank 0 writes them
    full = fsdp.full_trainable_state(s.model) if fsdp.is_sharded(s.model) else None
    if s.rank != 0:
        return s.run_dir
    out = s.run_dir
    # every part is written to a temporary name and renamed; medtune.json, which marks a finished
    # run, comes last: a crash in here leaves a run that `--resume` completes from its last
    # checkpoint, never a half-written adapter
    if s.cfg.lora.enabled:
        with atomic_dir(out / "adapter") as tmp:
            s.model.save_pretrained(str(tmp), safe_serialization=True, state_dict=full)
        with atomic_dir(out / "tokenizer") as tmp:
            s.tokenizer.save_pretrained(str(tmp))
    else:
        with atomic_dir(out / ".model") as tmp:
            unwrap(s.model).save_pretrained(str(tmp), safe_serialization=True, state_dict=full)
            s.tokenizer.save_pretrained(str(tmp))
        for item in sorted((out / ".model").iterdir()):
            os.replace(item, out / item.name)
        shutil.rmtree(out / ".model")
    s.template.save(out)
    write_json(out / "labels.json", {"task": s.cfg.data.task, "labels": s.labels})
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    write_json(out / "medtune.json", {**s.meta, "summary": summary})
    shutil.rmtree(ckpt.previous_run(out), ignore_errors=True)  # the run --overwrite replaced
    return out


def train(cfg: Config, data: str, output: str | Path, *, val: str | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True,
          callbacks: Sequence[Callback] | None = None) -> Path:
    """Setup -> fit -> save. Returns the run directory."""
    s = setup(cfg, data, output, val=val, resume=resume, overwrite=overwrite, progress=progress)
    if s.rank == 0:
        s.template.save(s.run_dir)
        write_json(s.run_dir / "labels.json", {"task": cfg.data.task, "labels": s.labels})
    try:
        summary = fit(s, resume=resume, progress=progress, callbacks=callbacks)
    except Interrupted as stopped:
        kept = ckpt.previous_run(s.run_dir)
        raise MedtuneError(f"interrupted: checkpoint saved at step {stopped.args[0]}; "
                           "continue with --resume" + (f" (the run it replaces is in {kept} until "
                                                       "then)" if kept.exists() else "")) from None
    with library_bars(progress):
        out = save(s, summary)
    barrier()
    end_distributed()
    return out


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return read_json(Path(run_dir) / "medtune.json").get("summary", {})


