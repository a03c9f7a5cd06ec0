"""One side of ``medtune bench train``, run in its own process: ``python -m medtune.bench_baseline
SPEC.json``. A process per side keeps each side's peak memory honest, and the parent alternates
the sides step by step so that a busy machine slows both alike.

Sides (same base, adapter, data, global batch, learning-rate schedule and steps):
  medtune   medtune's own trainer (``medtune.train.fit``): length-grouped batches, LM head only at
            the supervised (answer) positions.
  baseline  the original project's step, as Hugging Face ``Trainer`` / TRL ``SFTTrainer`` (before
            TRL's fused head) ran it: random batches, ``model(labels=...)`` computing the
            [batch, seq, vocab] logits, mean cross-entropy over the answer tokens.
  trl       today's TRL ``SFTTrainer`` (trl>=1 computes the log-probabilities in chunks, without the
            full logits) on the same pre-tokenised examples, random batches. For a quantized
            model it casts the LoRA weights to bf16, on every device.
            It is given the plain loop's AdamW and warm-up + cosine schedule (transformers'
            own warm-up starts at lr 0, a step behind the other sides).
  trl_fp32  the same with the LoRA weights cast back to float32, as medtune and the baseline keep
            them: on a CPU without native bf16 the cast alone slows TRL down.

Protocol: the process prints ``{"ready": ...}`` after loading, then for each step reads one line
(``go``) from stdin, runs the step and prints one JSON line: seconds, tokens (non-padding),
padded tokens and loss. Protocol lines go to the original stdout; everything else the libraries
print goes to stderr. After the last step it prints the peak memory and exits.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from medtune.batching import Example, collate, epoch_batches, steps_per_epoch

_PROTO = sys.stdout


def _send(obj: dict[str, Any]) -> None:
    _PROTO.write(json.dumps(obj) + "\n")
    _PROTO.flush()


def _wait_go() -> None:
    line = sys.stdin.readline()
    if line.strip() != "go":
        raise SystemExit(0)  # parent closed the pipe or asked to stop


# ----------------------------------------------------------------------------- memory
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Memory:
    """Peak resident memory of the training steps: on Linux the kernel's high-water mark (VmHWM),
    reset once loading is done (``/proc/self/clear_refs`` = 5); CUDA: max_memory_allocated."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.start_rss = _status_kb("VmRSS") * 1024
        self.reset_ok = False
        if self.cuda:
            torch.cuda.synchronize()
            self.start_cuda = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            pass  # the peak then includes loading: say so in the result

    def result(self) -> dict[str, Any]:
        peak = _status_kb("VmHWM") * 1024
        out = {"rss_start_mb": self.start_rss / 2**20, "rss_peak_mb": peak / 2**20,
               "rss_delta_mb": max(0, peak - self.start_rss) / 2**20,
               "peak_excludes_loading": self.reset_ok}
        if self.cuda:
            torch.cuda.synchronize()
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
            out["cuda_delta_mb"] = (torch.cuda.max_memory_allocated() - self.start_cuda) / 2**20
        return out


def footprint(model) -> dict[str, Any]:
    """The memory floor of a LoRA training step on ``model``: its weights as stored (4-bit
    layers at their packed size + quantization constants) plus, per trainable parameter, its
    gradient and AdamW's two moments (each the parameter's dtype). Activations not included."""
    from medtune.measure import weight_stats

    w = weight_stats(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = sum(3 * p.numel() * p.element_size() for p in trainable)
    return {"params": w["params"], "trainable_params": sum(p.numel() for p in trainable),
            "weights_mb": w["weight_mb"], "quantized_bits_per_param": w["quantized_bits_per_param"],
            "grad_and_optimizer_mb": state / 2**20, "floor_mb": w["weight_mb"] + state / 2**20}


# ----------------------------------------------------------------------------- sides
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_medtune(spec: dict[str, Any]) -> dict[str, Any]:
    """medtune.train.fit, paused after every step by a metrics callback (log_every=1)."""
    from medtune.config import load_config
    from medtune.train import fit, setup

    cfg = load_config(None, spec["overrides"])
    s = setup(cfg, spec["data"], spec["work"], val=spec["val"], overwrite=True, progress=False)
    lengths = [len(e.input_ids) for e in s.train]
    spe = steps_per_epoch(len(lengths), cfg.train.batch_size)
    mem = Memory(s.device)
    _send({"ready": True, "examples": len(s.train), "device": s.device,
           "footprint": footprint(s.model)})
    state: dict[str, Any] = {"t": 0.0, "tokens": 0.0, "step": 0}  # "step" stays an int

    def on_row(row: dict[str, Any]) -> None:
        if "loss" not in row:
            return
        _sync(s.device)
        seconds = time.perf_counter() - state["t"]
        cumulative = row["tokens_per_s"] * row["elapsed_s"]  # fit's running token count
        epoch, idx = divmod(state["step"], spe)
        batch = epoch_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch,
                              cfg.train.group_by_length)[idx]
        _send({"step": row["step"], "seconds": seconds, "loss": row["loss"],
               "tokens": round(cumulative - state["tokens"]),
               "padded_tokens": len(batch) * max(lengths[i] for i in batch)})
        state["tokens"], state["step"] = cumulative, state["step"] + 1
        if state["step"] < spec["steps"]:
            _wait_go()
            state["t"] = time.perf_counter()

    _wait_go()
    state["t"] = time.perf_counter()
    fit(s, progress=False, callbacks=[on_row])
    return mem.result()


def _load_peft(spec: dict[str, Any]):
    """The same base (same quantization) and the same LoRA adapter as medtune's side, prepared the
    original project's way: peft's ``prepare_model_for_kbit_training`` upcasts the frozen
    embeddings, norms and head to float32 (a no-op on CPU, where the compute dtype is float32)."""
    from medtune.config import load_config
    from medtune.model import attach_lora, load_base_model, load_tokenizer, resolve_device
    from medtune.tasks import default_template
    from medtune.train import _keep_4bit_training_layout

    cfg = load_config(None, spec["overrides"])
    torch.manual_seed(cfg.train.seed)
    tok = load_tokenizer(cfg.model.base)
    quantized = cfg.model.quantization != "none"
    model = attach_lora(load_base_model(cfg.model.base, cfg.model, tok), cfg.lora,
                        quantized=quantized, upcast_frozen=True)
    if quantized:
        _keep_4bit_training_layout(model)
    template = default_template(cfg.data.task, tok, spec["labels"], cfg.model.template)
    return cfg, model, tok, template, resolve_device(cfg.model.device)


def _examples(spec: dict[str, Any], tok, template, max_length: int) -> list[Example]:
    import pandas as pd

    from medtune.batching import encode_examples

    df = pd.read_csv(spec["data"])
    return encode_examples(template, tok, list(df["text"]), list(df["label"]), max_length,
                           spec["labels"])


def _cosine(step: int, warm: int, total: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def run_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    """Random batches; model(labels=...) builds the full [batch, seq, vocab] logits."""
    cfg, model, tok, template, device = _load_peft(spec)
    tc = cfg.train
    data = _examples(spec, tok, template, tc.max_length)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: _cosine(k, tc.warmup_steps, spec["steps"]))
    gen = torch.Generator().manual_seed(tc.seed)  # like Trainer's RandomSampler
    order: list[int] = []
    model.train()
    mem = Memory(device)
    _send({"ready": True, "examples": len(data), "device": device,
           "footprint": footprint(model)})
    for step in range(spec["steps"]):
        if len(order) < tc.batch_size:
            order += torch.randperm(len(data), generator=gen).tolist()
        idx, order = order[:tc.batch_size], order[tc.batch_size:]
        _wait_go()
        t0 = time.perf_counter()
        b = {k: v.to(device) for k, v in collate([data[i] for i in idx], tok.pad_token_id).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=_cuda_bf16(device)):
            loss = model(**b, use_cache=False).loss  # bf16 mixed precision on a GPU, as TRL's side
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()
        _sync(device)
        _send({"step": step + 1, "seconds": time.perf_counter() - t0, "loss": value,
               "tokens": int(b["attention_mask"].sum()), "padded_tokens": b["input_ids"].numel()})
    return mem.result()


def _cuda_bf16(device: str) -> bool:
    """bf16 mixed precision, as the original project ran TRL on a GPU; never on CPU."""
    return device.startswith("cuda") and torch.cuda.is_bf16_supported()


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """TRL SFTTrainer on pre-tokenised prompt/completion examples (completion-only loss)."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    cfg, model, tok, template, device = _load_peft(spec)
    tc = cfg.train
    data = _examples(spec, tok, template, tc.max_length)
    masks = [[0] * e.n_prompt + [1] * (len(e.input_ids) - e.n_prompt) for e in data]
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in data], "completion_mask": masks})
    args = SFTConfig(
        output_dir=str(Path(spec["work"]) / "trl"), per_device_train_batch_size=tc.batch_size,
        max_steps=spec["steps"], learning_rate=tc.lr, lr_scheduler_type="cosine",
        warmup_steps=tc.warmup_steps, weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm,
        logging_steps=1, save_strategy="no", report_to=[], gradient_checkpointing=False,
        use_cpu=not device.startswith("cuda"), bf16=_cuda_bf16(device), fp16=False,
        optim="adamw_torch",
        seed=tc.seed, dataloader_num_workers=0, disable_tqdm=True, max_length=None,
        completion_only_loss=True)
    state: dict[str, Any] = {}

    class Pace(TrainerCallback):
        def on_step_begin(self, args, st, control, **kw):
            _wait_go()
            state["t"] = time.perf_counter()

        def on_step_end(self, args, st, control, **kw):
            _sync(device)
            state["seconds"] = time.perf_counter() - state["t"]

        def on_log(self, args, st, control, logs=None, **kw):
            if logs and "loss" in logs and "seconds" in state:
                _send({"step": st.global_step, "seconds": state.pop("seconds"),
                       "loss": float(logs["loss"]), "tokens": int(state.pop("tokens", 0)),
                       "padded_tokens": int(state.pop("padded", 0))})

    # the schedule of the other sides: transformers' cosine warm-up starts at lr 0 (medtune and the
    # plain loop at lr/warmup), so TRL gets the same optimizer and LambdaLR the plain loop uses
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: _cosine(k, tc.warmup_steps, spec["steps"]))
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         callbacks=[Pace()], optimizers=(opt, sched))
    if spec["side"] == "trl_fp32":  # undo SFTTrainer's bf16 cast of a quantized model's adapter
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # the same Parameter objects the optimizer holds
    step_fn = trainer.training_step

    def counting(model, inputs, *args, **kwargs):  # this step's real and padded token counts
        state["tokens"] = int(inputs["attention_mask"].sum())
        state["padded"] = int(inputs["input_ids"].numel())
        return step_fn(model, inputs, *args, **kwargs)

    trainer.training_step = counting  # (the dataloader runs a batch ahead: count here)
    mem = Memory(device)
    _send({"ready": True, "examples": len(data), "device": device,
           "footprint": footprint(model)})
    trainer.train()
    return mem.result()


SIDES = {"medtune": run_medtune, "baseline": run_baseline, "trl": run_trl, "trl_fp32": run_trl}


def main(argv: list[str]) -> None:
    global _PROTO
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    _PROTO = os.fdopen(os.dup(1), "w")  # protocol channel; library prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(int(spec.get("threads", 1)))
    result = SIDES[spec["side"]](spec)
    _send({"done": True, **result})


if __name__ == "__main__":
    main(sys.argv[1:])
