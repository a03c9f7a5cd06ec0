"""`medtune bench train|predict`: side-by-side benchmarks against the original project's way.

train    medtune's trainer step vs TRL's SFTTrainer + peft QLoRA (the original project's stack)
         and vs a plain loop with random batches and full-vocabulary logits (the original step
         before TRL's chunked head), same base, adapter, data, global batch and steps, in
         one run: each side in its own process (honest peak memory), stepped alternately (a busy
         machine slows both alike). One row per vocabulary: the embedded base's own, and
         randomly initialised copies with a realistic vocabulary (32,000 like Llama-2-7B,
         256,000 like Gemma-2B) but the embedded base's small hidden size, so they run on a CPU.
             tokens/s = non-padding tokens of the measured steps / their summed step time
predict  see ``medtune.bench_predict``.

Both write ``<output>/bench_<kind>.json`` and ``.md`` and print the table.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medtune.errors import MedtuneError
from medtune.fsutil import check_output_file, write_json, write_text
from medtune.progress import bench_progress

WARMUP = 2  # first steps of each side not timed (allocator and kernel warm-up)


def _machine() -> dict[str, Any]:
    import os
    import platform

    import torch

    info: dict[str, Any] = {"cpus": os.cpu_count(), "torch": torch.__version__,
                            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _outputs(output: str | Path, kind: str, overwrite: bool) -> tuple[Path, Path]:
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise MedtuneError(f"{out}: exists and is not a directory")
    paths = out / f"bench_{kind}.json", out / f"bench_{kind}.md"
    for p in paths:
        check_output_file(p, overwrite)
    return paths


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _as_list(value: str | Sequence[Any]) -> list[Any]:
    """'embedded,32000' (a CLI string) or a sequence -> list."""
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


# ----------------------------------------------------------------------------- train bench
def _bench_bases(work: Path, vocab: Sequence[int | str], labels: list[str], seed: int,
                 arch: Sequence[str] = (), layers: int = 0) -> dict[str, Path]:
    """The embedded architecture (its tokenizer trained on unlabelled synthetic notes, random
    weights: speed and memory do not depend on them), copies with a larger vocabulary and
    full-size presets (``medtune.archs``). All share the tokenizer, so every side of every row
    sees the same token ids."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from medtune.archs import arch_base, arch_config
    from medtune.base import BaseSpec, build_base
    from medtune.synth import synth_unlabelled

    for name in arch:  # unknown names fail before anything is built
        arch_config(name, layers=layers)
    embedded = build_base(synth_unlabelled(2000, seed=seed), work / "base-embedded",
                          BaseSpec(steps=0, seed=seed), extra_vocab_texts=labels, progress=False)
    bases = {}
    for v in vocab:
        if str(v) == "embedded":
            bases["embedded"] = embedded
            continue
        if not str(v).isdigit():
            raise MedtuneError(f"vocab: '{v}' is neither 'embedded' nor a vocabulary size "
                               "(full-size models: arch)")
        size = int(v)
        if size % 64:
            raise MedtuneError(f"vocab: {size} is not a multiple of 64")
        config = AutoConfig.from_pretrained(embedded)
        if size < config.vocab_size:
            raise MedtuneError(f"vocab: {size} is smaller than the tokenizer's {config.vocab_size}")
        config.vocab_size = size
        path = work / f"base-{size}"
        AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
        AutoTokenizer.from_pretrained(embedded).save_pretrained(path)
        bases[str(size)] = path
    for name in arch:
        bases[name + (f"-{layers}L" if layers else "")] = arch_base(
            name, work / f"base-{name}", embedded, layers)
    return bases


class _Worker:
    """A bench_baseline process for one side; ``step()`` runs one step and returns its record."""

    def __init__(self, spec: dict[str, Any], work: Path, keep: Path):
        path = work / f"{spec['name']}.json"
        path.write_text(json.dumps(spec), encoding="utf-8")
        self.log = work / f"{spec['name']}.log"
        self.keep = keep  # where a failed side's log is copied (the work dir is temporary)
        self.name = spec["name"]
        with open(self.log, "w") as err:
            cmd = [sys.executable, "-m", "medtune.bench_baseline", str(path)]
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, text=True, bufsize=1)

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            text = self.log.read_text(errors="replace")
            tail = text.strip().splitlines()[-1:] or ["?"]
            self.keep.mkdir(parents=True, exist_ok=True)
            kept = self.keep / f"bench_failed_{self.name}.log"
            write_text(kept, text)
            raise MedtuneError(f"bench side '{self.name}' exited {self.proc.returncode}: "
                               f"{tail[0][:300]} (log: {kept})")
        return json.loads(line)

    def finish(self) -> dict[str, Any]:
        """The side's end record (peak memory), once its process has exited: its shutdown
        must not run inside another side's timed step."""
        end = self.read()
        self.proc.wait()
        return end

    def step(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _summarise(records: list[dict[str, Any]], end: dict[str, Any], cuda: bool,
               footprint: dict[str, Any] | None = None) -> dict[str, Any]:
    timed = records[WARMUP:] if len(records) > WARMUP else records
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    padded = sum(r["padded_tokens"] for r in timed)
    out = {"steps": len(records), "timed_steps": len(timed),
           "tokens_per_s": tokens / max(seconds, 1e-9),
           "step_s_median": statistics.median(r["seconds"] for r in timed),
           "padding_fraction": 1 - tokens / max(1, padded),
           "final_loss": records[-1]["loss"], "losses": [r["loss"] for r in records],
           "tokens_total": sum(r["tokens"] for r in records),
           "padded_tokens_total": sum(r["padded_tokens"] for r in records),
           "peak_mb": end.get("cuda_peak_mb") if cuda else end.get("rss_peak_mb"),
           "delta_mb": end.get("cuda_delta_mb") if cuda else end.get("rss_delta_mb"),
           "memory": {k: v for k, v in end.items() if k != "done"}}
    if footprint:  # the floor: weights as stored + LoRA gradients + AdamW moments
        out["footprint"] = footprint
        out["floor_mb"] = footprint["floor_mb"]
        out["peak_over_floor"] = out["peak_mb"] / max(footprint["floor_mb"], 1e-9)
    return out


def bench_train(output: str | Path, *, steps: int = 20,
                vocab: str | Sequence[int | str] = ("embedded", 32000),
                arch: str | Sequence[str] = (), layers: int = 0, batch_size: int = 16,
                quantization: str = "nf4", lora_r: int = 64, lora_alpha: int = 16, lr: float = 2e-4,
                sides: str | Sequence[str] = ("medtune", "trl", "trl_fp32", "baseline"),
                device: str = "auto", threads: int = 1, seed: int = 0, overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Train steps/s, tokens/s and peak memory: medtune's step vs the original project's.

    vocab: 'embedded' and/or vocabulary sizes (multiples of 64) of random models with the
    embedded base's small hidden size. arch: full-size presets (``medtune.archs``: gemma-2b,
    llama-2-7b), random weights, with ``layers`` decoder layers if > 0. sides: 'medtune',
    'baseline' (full logits, random batches), 'trl' (today's TRL SFTTrainer, which casts a
    quantized model's LoRA weights to bf16) and 'trl_fp32' (the same, LoRA in float32). Each side
    sees steps x batch_size synthetic notes: the same notes, one epoch."""
    from medtune.synth import synth_protocol

    json_path, md_path = _outputs(output, "train", overwrite)
    vocab, sides, arch = _as_list(vocab), _as_list(sides), _as_list(arch)
    vocab = [v for v in vocab if str(v) != "none"]
    if not vocab and not arch:
        raise MedtuneError("nothing to benchmark: give a vocab and/or an arch")
    unknown = sorted(set(sides) - {"medtune", "baseline", "trl", "trl_fp32"})
    if unknown or not sides or len(set(sides)) != len(sides):
        raise MedtuneError(f"sides: unknown {unknown} or repeated (medtune, baseline, trl, "
                           "trl_fp32, each once)")
    if steps <= WARMUP or batch_size < 1:  # the first WARMUP steps of each side are not timed
        raise MedtuneError(f"steps must be >= {WARMUP + 1} (the first {WARMUP} are not timed) "
                           "and batch_size >= 1")
    results: dict[str, Any] = {"kind": "train", "machine": _machine(), "steps": steps,
                               "batch_size": batch_size, "quantization": quantization,
                               "lora_r": lora_r, "lr": lr, "sides": list(sides),
                               "arch": list(arch), "layers": layers, "runs": []}
    with tempfile.TemporaryDirectory(prefix="medtune-bench-") as tmp:
        work = Path(tmp)
        df = synth_protocol(steps * batch_size, seed=seed)
        df.to_csv(work / "train.csv", index=False)
        df.head(8).to_csv(work / "val.csv", index=False)
        labels = sorted(set(df["label"]))
        bases = _bench_bases(work, vocab, labels, seed, arch, layers)
        for name, base in bases.items():
            run = _train_pair(work, name, base, labels, sides, keep=json_path.parent,
                              steps=steps, batch_size=batch_size,
                              quantization=quantization, lora_r=lora_r, lora_alpha=lora_alpha,
                              lr=lr, device=device, threads=threads, seed=seed, progress=progress)
            results["runs"].append(run)
            write_json(json_path.with_suffix(".partial.json"), results)  # kept if a later row fails
    results["machine"]["load_avg_1m_end"] = _machine().get("load_avg_1m")
    md = _train_markdown(results)
    write_json(json_path, results)
    json_path.with_suffix(".partial.json").unlink(missing_ok=True)
    write_text(md_path, md)
    print(md)
    return results


def _train_pair(work: Path, name: str, base: Path, labels: list[str], sides: Sequence[str], *,
                steps: int, batch_size: int, quantization: str, lora_r: int, lora_alpha: int,
                lr: float, device: str, threads: int, seed: int, progress: bool,
                keep: Path) -> dict[str, Any]:
    """One row: every side stepped alternately. ``keep``: where a failed side's log goes."""
    from transformers import AutoConfig

    overrides = [f"model.base={base}", f"model.quantization={quantization}",
                 f"model.device={device}", f"lora.r={lora_r}", f"lora.alpha={lora_alpha}",
                 "lora.dropout=0", f"train.lr={lr}", f"train.batch_size={batch_size}",
                 f"train.max_steps={steps}", f"train.warmup_steps={min(2, steps)}",
                 "train.eval_every=0", "train.eval_samples=0", "train.save_every=0",
                 "train.log_every=1", "train.keep_checkpoints=1", f"train.seed={seed}",
                 "train.optimizer=adamw"]  # the optimizer of the other sides, also on CUDA
    workers = []
    try:
        for side in sides:
            spec = {"name": f"{name}-{side}", "side": side, "overrides": overrides,
                    "data": str(work / "train.csv"), "val": str(work / "val.csv"),
                    "labels": labels, "steps": steps, "threads": threads,
                    "work": str(work / f"run-{name}-{side}")}
            workers.append(_Worker(spec, work, keep))
        ready = [w.read() for w in workers]
        records: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
        finished: dict[str, dict[str, Any]] = {}
        with bench_progress(f"bench train [{name}] steps", disable=not progress) as bar:
            task = bar.add_task("steps", total=steps)
            for k in range(steps):
                order = list(zip(sides, workers, strict=True))
                for side, w in order if k % 2 == 0 else order[::-1]:  # ABBA: no side always first
                    records[side].append(w.step())
                    if k == steps - 1:  # its wrap-up and exit, before the next side's last step
                        finished[side] = w.finish()
                bar.update(task, completed=k + 1)
        ends = [finished[side] for side in sides]
    finally:
        for w in workers:
            w.close()
    cuda = ready[0].get("device", "cpu").startswith("cuda")
    config = AutoConfig.from_pretrained(base)
    run: dict[str, Any] = {"model": name, "vocab_size": config.vocab_size,
                           "hidden_size": config.hidden_size, "layers": config.num_hidden_layers,
                           "device": ready[0].get("device"), "memory_kind":
                           "cuda max_memory_allocated" if cuda else "process peak RSS",
                           "params": ready[0].get("footprint", {}).get("params"),
                           "sides": {s: _summarise(records[s], e, cuda, r.get("footprint"))
                                     for s, e, r in zip(sides, ends, ready, strict=True)}}
    if "medtune" in sides:
        ours = run["sides"]["medtune"]
        for other in [s for s in sides if s != "medtune"]:
            theirs = run["sides"][other]
            run[f"vs_{other}"] = {
                "tokens_per_s_ratio": ours["tokens_per_s"] / max(theirs["tokens_per_s"], 1e-9),
                "peak_memory_ratio": ours["peak_mb"] / max(theirs["peak_mb"], 1e-9),
                "delta_memory_ratio": ours["delta_mb"] / max(theirs["delta_mb"], 1e-9)}
    return run


def _train_markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    head = (f"## medtune bench train\n\n{r['steps']} steps x batch {r['batch_size']} "
            f"({r['quantization']} base, LoRA r={r['lora_r']}), first {WARMUP} steps of each side "
            f"not timed; sides stepped alternately, each in its own process. Machine: "
            f"{m.get('cpus')} CPUs{', ' + m['gpu'] if m.get('gpu') else ''}, load average "
            f"{m.get('load_avg_1m')} -> {m.get('load_avg_1m_end')}.\n\n")
    rows = []
    for run in r["runs"]:
        for side, s in run["sides"].items():
            rows.append([run["model"], run["vocab_size"], side, s["tokens_per_s"],
                         s["step_s_median"], s["padding_fraction"], s["peak_mb"], s["delta_mb"],
                         s.get("floor_mb", "-"), s.get("peak_over_floor", "-"), s["final_loss"]])
    table = _md_table(["model", "vocab", "side", "tokens/s", "step s (median)", "padding",
                       "peak MB", "train delta MB", "floor MB", "peak / floor", "final loss"],
                      rows)
    ratios = []
    for run in r["runs"]:
        for key, v in run.items():
            if key.startswith("vs_"):
                ratios.append(f"- {run['model']}: medtune / {key[3:]}: tokens/s x"
                              f"{v['tokens_per_s_ratio']:.2f}, peak memory x"
                              f"{v['peak_memory_ratio']:.2f}, memory added by training x"
                              f"{v['delta_memory_ratio']:.2f}")
    note = ("\nMemory: " + (r["runs"][0]["memory_kind"] if r["runs"] else "") + "; 'train delta' = "
            "peak during the steps minus the resident size once the model was loaded. 'floor' = "
            "the weights as stored (NF4 + double quantization ~4.127 bits per quantized "
            "parameter, the rest at their dtype) + the LoRA gradients + AdamW's two moments; "
            "activations and the runtime (on CPU: Python, torch) come on top.\n")
    return head + table + "\n" + "\n".join(ratios) + "\n" + note
