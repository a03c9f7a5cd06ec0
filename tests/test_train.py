"""Training: answer-only loss, EOS/pad handling, length-grouped batches, QLoRA smoke, stopping,
NaN guard. Tiny models from conftest (2 layers, hidden 64); every test runs on CPU in seconds."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import medtune.train as train_mod
from conftest import TINY_LABELS, TINY_NOTES
from medtune.batching import IGNORE, collate, encode_examples, epoch_batches, steps_per_epoch
from medtune.config import Config, ModelConfig, load_config
from medtune.errors import MedtuneError
from medtune.model import load_base_model, load_for_inference, load_tokenizer
from medtune.tasks import default_template
from medtune.train import supervised_loss, train

# the 8 distinct tiny notes, labelled by body region: a 2-label task a tiny model learns fast
HEAD = [TINY_NOTES[i] for i in (0, 1, 4, 5)]
BODY = [TINY_NOTES[i] for i in (2, 3, 6, 7)]


def write_rows(path: Path, notes: list[str], labels: list[str]) -> str:
    pd.DataFrame({"id": [f"r{i}" for i in range(len(notes))], "text": notes,
                  "label": labels}).to_csv(path, index=False)
    return str(path)


def tiny_cfg(base: Path, *overrides: str) -> Config:
    return load_config(None, [f"model.base={base}", "model.device=cpu", "lora.r=8",
                              "train.batch_size=4", "train.warmup_steps=0", "train.eval_every=0",
                              "train.eval_samples=4", "train.log_every=1", "train.save_every=0",
                              *overrides])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread; on a shared 2-core box two threads spin
    (measured here: 1.9 s vs 0.02 s per step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_label_data(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("data2")
    return write_rows(d / "train.csv", (HEAD + BODY) * 2, (["CT Head"] * 4 + ["L-Spine"] * 4) * 2)


@pytest.fixture(scope="module")
def fp32_model(tiny_base):
    tok = load_tokenizer(tiny_base)
    model = load_base_model(str(tiny_base), ModelConfig(quantization="none", device="cpu"), tok)
    return model.eval(), tok


# ----------------------------------------------------------------------------- loss and masking
def test_supervised_loss_matches_hf_loss_and_ignores_prompt_and_pad(fp32_model):
    model, tok = fp32_model
    template = default_template("protocol", tok, TINY_LABELS)
    examples = encode_examples(template, tok, TINY_NOTES[:4], TINY_LABELS, 256)
    batch = collate(examples, tok.pad_token_id)
    assert len({len(e.input_ids) for e in examples}) > 1  # rows really are padded
    with torch.no_grad():
        ce_sum, n = supervised_loss(model, **batch)
        hf_mean = model(**batch).loss  # mean over the same shifted, non-ignored targets
        # reference: each example alone, unpadded, -log p of answer tokens (incl. EOS) only
        naive = 0.0
        for e in examples:
            logp = model(input_ids=torch.tensor([e.input_ids])).logits[0].float().log_softmax(-1)
            naive -= sum(float(logp[t - 1, e.input_ids[t]]) for t in range(e.n_prompt,
                                                                            len(e.input_ids)))
    answers = sum(len(template.answer_ids(tok, lab)) for lab in TINY_LABELS)
    assert n == answers == int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(ce_sum / n, hf_mean.float(), atol=1e-5, rtol=1e-5)
    assert abs(float(ce_sum) - naive) <= 1e-5 * abs(naive) + 1e-5

    # junk in the padded positions changes nothing (right padding, causal attention, no label)
    pad = batch["attention_mask"] == 0
    junk_ids = torch.where(pad, torch.randint_like(batch["input_ids"], 5, 300), batch["input_ids"])
    prompt = torch.zeros_like(pad)
    for i, e in enumerate(examples):
        prompt[i, : e.n_prompt] = True
    with torch.no_grad():
        ce_junk, n_junk = supervised_loss(model, junk_ids, batch["attention_mask"], batch["labels"])
        # supervising the prompt too would change the loss: the mask is doing real work
        with_prompt = batch["labels"].clone()
        with_prompt[prompt] = batch["input_ids"][prompt]
        ce_prompt, n_prompt = supervised_loss(model, batch["input_ids"], batch["attention_mask"],
                                              with_prompt)
    assert n_junk == n and abs(float(ce_junk - ce_sum)) < 1e-4
    assert n_prompt > n and float(ce_prompt) > float(ce_sum) + 1.0


def test_eos_is_last_supervised_token_and_pad_is_not_eos(tiny_tokenizer, tmp_path):
    shared = copy.deepcopy(tiny_tokenizer)
    shared.pad_token = shared.eos_token  # the classic mistake: pad == eos
    shared.save_pretrained(tmp_path / "tok")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "tok").pad_token_id == shared.eos_token_id
    tok = load_tokenizer(tmp_path / "tok")
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.eos_token_id == tiny_tokenizer.eos_token_id
    assert tok.padding_side == "right"

    template = default_template("protocol", tok, TINY_LABELS)
    examples = encode_examples(template, tok, TINY_NOTES[:4], TINY_LABELS, 256)
    batch = collate(examples, tok.pad_token_id)
    for row, e in enumerate(examples):
        supervised = batch["labels"][row][batch["labels"][row] != IGNORE].tolist()
        assert supervised[-1] == tok.eos_token_id
        assert supervised == e.input_ids[e.n_prompt:]
        assert batch["input_ids"][row, len(e.input_ids):].eq(tok.pad_token_id).all()
        assert batch["attention_mask"][row].sum() == len(e.input_ids)
    # EOS must stay a training target (never masked as if it were padding)
    assert any(tok.eos_token_id in batch["labels"][r].tolist() for r in range(len(examples)))


def test_truncation_keeps_the_answer(fp32_model):
    _, tok = fp32_model
    template = default_template("protocol", tok, TINY_LABELS)
    long_note = " ".join(TINY_NOTES) * 4
    (e,) = encode_examples(template, tok, [long_note], ["CT Urography"], 40)
    assert len(e.input_ids) <= 40
    assert e.input_ids[e.n_prompt:] == template.answer_ids(tok, "CT Urography")


# ----------------------------------------------------------------------------- batches
def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


def test_epoch_batches_deterministic_complete_and_less_padded():
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(5, 300, (203,), generator=g).tolist()
    a = epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a == epoch_batches(lengths, 8, seed=3, epoch=1)
    assert a != epoch_batches(lengths, 8, seed=3, epoch=2)
    assert a != epoch_batches(lengths, 8, seed=4, epoch=1)
    for grouped in (True, False):
        batches = epoch_batches(lengths, 8, seed=3, epoch=0, group_by_length=grouped)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(len(lengths)))
        assert len(batches) == steps_per_epoch(len(lengths), 8) == 26
        assert sorted(len(b) for b in batches) == [203 % 8] + [8] * 25  # one short batch
    grouped = _padding(epoch_batches(lengths, 8, 3, 0, True), lengths)
    shuffled = _padding(epoch_batches(lengths, 8, 3, 0, False), lengths)
    assert grouped < 0.3 * shuffled


# ----------------------------------------------------------------------------- QLoRA smoke
def _bits(p: torch.Tensor) -> torch.Tensor:
    """Raw bytes: 4-bit weights are packed bytes stored as float32, some of which read as NaN."""
    return p.data.detach().contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_qlora_steps_change_lora_weights_only(arch, tiny_base_factory, two_label_data, tmp_path,
                                              monkeypatch):
    base = tiny_base_factory(arch)
    seen = {}
    real_setup = train_mod.setup

    def spy_setup(*args, **kwargs):
        s = real_setup(*args, **kwargs)
        seen["setup"] = s
        seen["before"] = {n: _bits(p) for n, p in s.model.named_parameters()}
        return s

    monkeypatch.setattr(train_mod, "setup", spy_setup)
    cfg = tiny_cfg(base, "model.quantization=nf4", "train.max_steps=3", "train.lr=1e-2")
    run = train(cfg, two_label_data, tmp_path / "run", val=two_label_data, progress=False)

    model = seen["setup"].model
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())  # really 4-bit
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    changed = {n for n, p in model.named_parameters()
               if not torch.equal(_bits(p), seen["before"][n])}
    assert {n for n in trainable if "lora_B" in n} <= changed  # zero-initialised B moved
    assert changed <= trainable  # frozen (4-bit and fp32) weights untouched

    meta = json.loads((run / "medtune.json").read_text())
    assert meta["kind"] == "run" and meta["quantization"] == "nf4"
    assert meta["compute_dtype"] == "float32"  # fp32 compute on CPU
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "tokenizer").is_dir() and (run / "template.json").is_file()
    assert json.loads((run / "labels.json").read_text())["labels"] == ["CT Head", "L-Spine"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert "val_accuracy" in meta["summary"]


@pytest.fixture(scope="module")
def scaled_base(tmp_path_factory, tiny_tokenizer) -> Path:
    """Tiny Llama with init std 0.2: with std 0.02 the frozen random LM head caps every logit near
    |h| * |w| ~ 8 * 0.16, so LoRA alone could never make any answer confident."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer
    config = AutoConfig.for_model(
        "llama", vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("scaled_llama")
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_trained_model_generates_label_then_stops(scaled_base, two_label_data, tmp_path):
    cfg = tiny_cfg(scaled_base, "model.quantization=none", "train.max_steps=20", "train.lr=1e-2",
                   "train.scheduler=constant", "lora.dropout=0", "train.log_every=10",
                   "train.eval_samples=16")
    run = train(cfg, two_label_data, tmp_path / "run", val=two_label_data, progress=False)
    loaded = load_for_inference(run, ModelConfig(device="cpu"))
    tok, template = loaded.tokenizer, loaded.template
    for note, label in [(HEAD[0], "CT Head"), (BODY[1], "L-Spine"), (HEAD[3], "CT Head")]:
        prompt = template.prompt_ids(tok, note)
        with torch.no_grad():
            out = loaded.model.generate(input_ids=torch.tensor([prompt]),
                                        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                        max_new_tokens=12, do_sample=False)
        new = out[0, len(prompt):].tolist()
        # exactly the label's tokens, then EOS, then nothing (generation stopped)
        assert new == template.answer_ids(tok, label), tok.decode(new)


# ----------------------------------------------------------------------------- failure modes
def test_nan_loss_stops_with_error_naming_the_step(tiny_base, two_label_data, tmp_path,
                                                   monkeypatch):
    real = train_mod.supervised_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        ce, n = real(*args, **kwargs)
        calls["n"] += 1
        return (ce * float("nan"), n) if calls["n"] >= 3 else (ce, n)

    monkeypatch.setattr(train_mod, "supervised_loss", poisoned)
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=5",
                   "train.save_every=1", "train.keep_checkpoints=5")
    with pytest.raises(MedtuneError, match=r"loss became nan at step 3\b"):
        train(cfg, two_label_data, tmp_path / "run", val=two_label_data, progress=False)
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == ["step-0000001", "step-0000002"]  # nothing written for the bad step
    assert not (tmp_path / "run" / "adapter").exists()


def test_full_finetune_refuses_quantized_base(tiny_base, two_label_data, tmp_path):
    cfg = tiny_cfg(tiny_base, "lora.enabled=false", "model.quantization=nf4")
    with pytest.raises(MedtuneError, match="quantization=none"):
        train(cfg, two_label_data, tmp_path / "run", progress=False)


@pytest.mark.parametrize("override, expected", [("lora.target_modules=q_proj,v_proj",
                                                  {"q_proj", "v_proj"}),
                                                 ("lora.target_modules=q_proj", {"q_proj"})])
def test_target_modules_override_adapts_exactly_those(override, expected, tiny_base):
    from medtune.model import attach_lora

    cfg = load_config(None, ["lora.r=4", override])
    tok = load_tokenizer(tiny_base)
    model = load_base_model(str(tiny_base), ModelConfig(quantization="none", device="cpu"), tok)
    model = attach_lora(model, cfg.lora, quantized=False)
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == expected


def test_overwrite_keeps_the_finished_run_until_the_new_one_is_saved(tiny_base, two_label_data,
                                                                    tmp_path):
    from medtune.model import load_for_inference

    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=2", "train.save_every=1",
                   "train.eval_samples=2")
    run = train(cfg, two_label_data, tmp_path / "run", val=two_label_data, progress=False)
    finished = (run / "adapter" / "adapter_model.safetensors").read_bytes()

    def crash(row):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):  # the new run dies before it is saved
        train(cfg, two_label_data, run, val=two_label_data, progress=False, overwrite=True,
              callbacks=[crash])
    kept = tmp_path / ".run.previous"  # it deleted the finished run before its first step
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == finished
    assert (kept / "medtune.json").is_file() and not (run / "medtune.json").exists()
    with pytest.raises(MedtuneError, match=r"training has not finished.*--resume"):
        load_for_inference(run)  # was "not a model directory"
    with pytest.raises(RuntimeError, match="killed"):  # again: the finished run stays kept
        train(cfg, two_label_data, run, val=two_label_data, progress=False, overwrite=True,
              callbacks=[crash])
    assert (kept / "adapter" / "adapter_model.safetensors").read_bytes() == finished
    train(cfg, two_label_data, run, val=two_label_data, progress=False, overwrite=True)
    assert (run / "medtune.json").is_file() and not kept.exists()  # saved: the old one goes


def test_overwrite_starts_a_clean_run(tiny_base, two_label_data, tmp_path):
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=3", "train.save_every=1",
                   "train.keep_checkpoints=5", "train.eval_samples=2")
    run = train(cfg, two_label_data, tmp_path / "run", val=two_label_data, progress=False)
    with pytest.raises(MedtuneError, match="not empty"):
        train(cfg, two_label_data, run, val=two_label_data, progress=False)
    cfg.train.max_steps = 2
    (run / "model.safetensors").write_bytes(b"a previous full fine-tune's weights")
    train(cfg, two_label_data, run, val=two_label_data, progress=False, overwrite=True)
    assert not (run / "model.safetensors").exists()  # nothing of the old run is left
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]  # two train rows and the final validation, no stale rows
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001",
                                                                      "step-0000002"]
    inside = run / "train.csv"  # --overwrite never deletes the data it trains on
    inside.write_text(Path(two_label_data).read_text())
    with pytest.raises(MedtuneError, match="is or contains the input"):
        train(cfg, str(inside), run, val=two_label_data, progress=False, overwrite=True)
    assert inside.is_file()
    changed = tmp_path / "other.csv"  # resuming on data with another label set is refused
    df = pd.read_csv(two_label_data)
    df.assign(label=[f"new {lab}" for lab in df["label"]]).to_csv(changed, index=False)
    with pytest.raises(MedtuneError, match=r"labels differ from the run's labels\.json"):
        train(cfg, str(changed), run, val=two_label_data, progress=False, resume=True)


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def test_micro_batches_and_oom_fallback_give_the_same_step(tiny_base, two_label_data, tmp_path,
                                                           monkeypatch, capsys):
    common = ("model.quantization=none", "train.max_steps=3", "train.lr=1e-2", "lora.dropout=0",
              "train.eval_samples=2", "train.group_by_length=false")
    whole = _adapter(train(tiny_cfg(tiny_base, *common), two_label_data, tmp_path / "a",
                           val=two_label_data, progress=False))
    split = _adapter(train(tiny_cfg(tiny_base, *common, "train.micro_batch_size=2"),
                           two_label_data, tmp_path / "b", val=two_label_data, progress=False))
    real = train_mod.supervised_loss

    def small_memory(model, input_ids, *args):
        if input_ids.shape[0] > 2 and model.training:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, input_ids, *args)

    monkeypatch.setattr(train_mod, "supervised_loss", small_memory)
    capsys.readouterr()
    oom = _adapter(train(tiny_cfg(tiny_base, *common), two_label_data, tmp_path / "c",
                         val=two_label_data, progress=False))
    assert "micro-batch size -> 2" in capsys.readouterr().err
    for name in whole:
        assert float((whole[name] - split[name]).abs().max()) < 1e-5, name
        assert float((whole[name] - oom[name]).abs().max()) < 1e-5, name
    assert any(float(v.abs().max()) > 1e-3 for k, v in whole.items() if "lora_B" in k)


def test_a_sharded_step_out_of_memory_stops_naming_the_step_instead_of_retrying(
        tiny_base, two_label_data, tmp_path, monkeypatch):
    # under FSDP a retry on one rank would wait forever in the other ranks' collectives
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train_mod, "_step", out_of_memory)
    monkeypatch.setattr(train_mod.fsdp, "is_sharded", lambda model: True)
    with pytest.raises(MedtuneError, match=r"out of memory at step 1 with FSDP: set "
                                           r"train.micro_batch_size below 4"):
        train(tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=2"),
              two_label_data, tmp_path / "run", progress=False)


@pytest.mark.parametrize("mode", ["nf4", "none"])
def test_gradient_checkpointing_gives_the_same_step_without_warnings(mode, tiny_base,
                                                                      two_label_data, tmp_path):
    """Recomputing the layers in backward must change memory, not the update; and it must not
    use the deprecated transformers method or torch's implicit re-entrant checkpoint."""
    import warnings

    common = (f"model.quantization={mode}", "train.max_steps=2", "train.lr=1e-2",
              "lora.dropout=0", "train.eval_samples=2", "train.group_by_length=false")
    plain = _adapter(train(tiny_cfg(tiny_base, *common), two_label_data, tmp_path / "a",
                           val=two_label_data, progress=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = _adapter(train(tiny_cfg(tiny_base, *common, "model.gradient_checkpointing=true"),
                              two_label_data, tmp_path / "b", val=two_label_data,
                              progress=False))
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "checkpointing_enable" in t or "use_reentrant" in t], texts
    for name in plain:
        assert float((plain[name] - ckpt[name]).abs().max()) < 1e-5, name
    assert any(float(v.abs().max()) > 1e-3 for k, v in ckpt.items() if "lora_B" in k)


@pytest.mark.parametrize("lora", ["true", "false"])
def test_gradient_checkpointing_is_on_in_every_decoder_layer(lora, tiny_base, two_label_data,
                                                             tmp_path):
    from medtune.train import setup

    def layers(*extra: str) -> list[bool]:
        cfg = tiny_cfg(tiny_base, "model.quantization=none", f"lora.enabled={lora}", *extra)
        model = setup(cfg, two_label_data, tmp_path / str(len(extra)), val=two_label_data).model
        return [m.gradient_checkpointing for m in model.modules()
                if type(m).__name__.endswith("DecoderLayer")]

    assert layers("model.gradient_checkpointing=true") == [True, True]
    assert layers() == [False, False]


def test_qlora_keeps_frozen_weights_in_the_compute_dtype(tiny_base, two_label_data, tmp_path):
    """bf16 compute (a GPU's; forced here on CPU): embeddings, norms and head stay bf16 instead of
    peft's float32 upcast, the LoRA weights are float32, and the steps still train them."""
    from medtune.measure import weight_stats
    from medtune.model import attach_lora

    cfg = tiny_cfg(tiny_base, "model.quantization=nf4", "model.compute_dtype=bfloat16",
                   "train.max_steps=2", "train.lr=1e-2", "lora.dropout=0", "train.eval_samples=2")
    tok = load_tokenizer(tiny_base)
    ours = attach_lora(load_base_model(str(tiny_base), cfg.model, tok), cfg.lora, quantized=True)
    upcast = attach_lora(load_base_model(str(tiny_base), cfg.model, tok), cfg.lora,
                         quantized=True, upcast_frozen=True)
    frozen = {p.dtype for p in ours.parameters() if not p.requires_grad and p.is_floating_point()}
    trainable = {p.dtype for p in ours.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trainable == {torch.float32}
    assert ours.get_input_embeddings().weight.dtype == torch.bfloat16
    assert upcast.get_input_embeddings().weight.dtype == torch.float32
    assert weight_stats(ours)["weight_mb"] < weight_stats(upcast)["weight_mb"]
    run = train(cfg, two_label_data, tmp_path / "run", val=two_label_data, progress=False)
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert any(float(v.abs().max()) > 1e-3 for k, v in _adapter(run).items() if "lora_B" in k)


def test_bad_input_leaves_no_run_dir_behind(tiny_base, two_label_data, tmp_path):
    """An input error (missing data file, unknown quantization) stops before the run directory
    exists, so the corrected command runs without --overwrite."""
    run = tmp_path / "run"
    with pytest.raises(MedtuneError, match=r"missing\.csv"):
        train(tiny_cfg(tiny_base), str(tmp_path / "missing.csv"), run, progress=False)
    with pytest.raises(MedtuneError, match=r"model\.quantization"):
        train(tiny_cfg(tiny_base, "model.quantization=nf5"), two_label_data, run, progress=False)
    assert not run.exists()
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=1",
                   "train.eval_samples=2")
    assert train(cfg, two_label_data, run, val=two_label_data, progress=False) == run


def test_unknown_lora_target_module_is_one_line_error(tiny_base, two_label_data, tmp_path):
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "lora.target_modules=foo_proj")
    with pytest.raises(MedtuneError, match=r"^lora\.target_modules=") as info:
        train(cfg, two_label_data, tmp_path / "run", progress=False)
    assert "\n" not in str(info.value) and "foo_proj" in str(info.value)
    assert not (tmp_path / "run").exists()


def test_val_fraction_zero_trains_on_every_row_without_validation(tiny_base, two_label_data,
                                                                  tmp_path):
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=2",
                   "data.val_fraction=0", "train.eval_every=1")
    run = train(cfg, two_label_data, tmp_path / "run", progress=False)
    meta = json.loads((run / "medtune.json").read_text())
    assert meta["train_rows"] == 16 and meta["val_rows"] == 0
    assert "val_accuracy" not in (run / "metrics.jsonl").read_text()


def test_a_training_file_too_small_to_leave_training_rows_is_refused_before_writing(
        tiny_base, tmp_path):
    one = write_rows(tmp_path / "one.csv", HEAD[:1], ["CT Head"])  # the row goes to validation
    with pytest.raises(MedtuneError, match=r"one.csv: no training rows left after holding out 1 "
                                           r"for validation \(data.val_fraction="):
        train(tiny_cfg(tiny_base), one, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # the same command, corrected, needs no --overwrite


def test_metrics_log_the_learning_rate_each_step_used_and_warn_of_endless_warmup(
        tiny_base, two_label_data, tmp_path, capsys):
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=4", "train.lr=0.01",
                   "train.warmup_steps=2", "train.scheduler=linear", "train.log_every=1",
                   "train.eval_every=0", "train.eval_samples=0")
    run = train(cfg, two_label_data, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    # warmup (step+1)/2, then linear decay: the rates steps 1-4 used (the next step's were logged)
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([0.005, 0.01, 0.01, 0.005])
    assert "warmup_steps" not in capsys.readouterr().err
    train(tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=2",
                   "train.warmup_steps=5", "train.eval_samples=0"), two_label_data,
          tmp_path / "run2", progress=False)
    assert ("warning: train.warmup_steps=5 >= the run's 2 steps: the learning rate never "
            "reaches train.lr") in capsys.readouterr().err


@pytest.mark.parametrize("task", ["protocol", "mcqa"])
def test_an_over_long_prompt_is_cut_in_training_exactly_as_prediction_cuts_it(fp32_model, task):
    from medtune.scoring import label_rows
    from medtune.tasks.mcqa import LETTERS

    _, tok = fp32_model
    labels = LETTERS if task == "mcqa" else TINY_LABELS
    template = default_template(task, tok, labels)
    long_note = " ".join(TINY_NOTES) * 4
    shortest = min(labels, key=lambda lab: len(template.answer_ids(tok, lab)))
    seen: list[list[int]] = []

    def record(fn, prompts):  # label_rows' batching hook: keep the prompts, score nothing
        seen.extend(prompts)
        return [torch.zeros(len(labels)) for _ in prompts]

    label_rows(None, tok, template, [long_note], labels,
               [template.answer_ids(tok, lab) for lab in labels], 40, record, {})
    (e,) = encode_examples(template, tok, [long_note], [shortest], 40, labels)
    assert len(e.input_ids) <= 40 and len(seen) == 1
    assert e.input_ids[:e.n_prompt] == seen[0]  # the model trains on the prompt it is scored on


def test_progress_false_shows_no_library_bars_on_load_or_save(tiny_base, two_label_data, tmp_path,
                                                              capfd):
    """The Python API with progress=False (e.g. under TorchDistributor, once per process): no
    "Loading weights" / "Writing model shards" bars; progress=True keeps them (the control)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()  # as without HF_HUB_DISABLE_PROGRESS_BARS
    try:
        cfg = tiny_cfg(tiny_base, "lora.enabled=false", "model.quantization=none",
                       "train.max_steps=1")
        train(cfg, two_label_data, tmp_path / "quiet", val=two_label_data, progress=False)
        quiet = capfd.readouterr().err
        train(cfg, two_label_data, tmp_path / "loud", val=two_label_data, progress=True)
        loud = capfd.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    assert "Loading weights" in loud and "Writing model shards" in loud
    assert "Loading weights" not in quiet and "Writing model shards" not in quiet
    assert hf_logging.is_progress_bar_enabled() == was


def test_a_relative_base_is_recorded_absolute_so_the_run_loads_from_anywhere(
        tiny_base, two_label_data, tmp_path, monkeypatch):
    from medtune.predict import Predictor

    monkeypatch.chdir(tiny_base.parent)
    cfg = tiny_cfg(tiny_base.name, "model.quantization=none", "train.max_steps=1")
    run = train(cfg, two_label_data, tmp_path / "run", progress=False)
    assert json.loads((run / "medtune.json").read_text())["base"] == str(tiny_base.resolve())
    monkeypatch.chdir(tmp_path)  # where the base's relative name means nothing
    assert Predictor.from_path(str(run)).predict_texts(["chest pain"])[0]["prediction"] in (
        "CT Head", "L-Spine")


def test_rows_with_a_blank_text_or_label_are_skipped_with_a_counted_warning(
        tiny_base, two_label_data, tmp_path, capsys):
    df = pd.read_csv(two_label_data)
    df.loc[0, "text"] = " "
    df.loc[[1, 2], "label"] = ""
    data = tmp_path / "gaps.csv"
    df.to_csv(data, index=False)
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=1",
                   "data.val_fraction=0")
    run = train(cfg, str(data), tmp_path / "run", progress=False)
    assert json.loads((run / "medtune.json").read_text())["train_rows"] == len(df) - 3
    err = capsys.readouterr().err
    assert (f"warning: {data}: 3 of {len(df)} rows skipped (1 with an empty 'text', 2 with an "
            "empty 'label')") in err
    df["text"] = " "  # all of them: it said "no training rows left after holding out 0"
    df.to_csv(data, index=False)
    with pytest.raises(MedtuneError, match=rf"none of its {len(df)} rows can be trained on "
                                           rf"\({len(df)} with an empty 'text'\)"):
        train(cfg, str(data), tmp_path / "run2", progress=False)
    assert not (tmp_path / "run2").exists()


def test_only_rank_0_saves_the_finished_run(tiny_base, two_label_data, tmp_path, monkeypatch):
    import dataclasses

    seen = {}
    real_setup = train_mod.setup

    def spy_setup(*args, **kwargs):
        seen["setup"] = real_setup(*args, **kwargs)
        return seen["setup"]

    monkeypatch.setattr(train_mod, "setup", spy_setup)
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.max_steps=1")
    train(cfg, two_label_data, tmp_path / "run", progress=False)
    other = dataclasses.replace(seen["setup"], rank=1, world=2, run_dir=tmp_path / "rank1")
    other.run_dir.mkdir()
    assert train_mod.save(other, {"steps": 1}) == other.run_dir
    assert list(other.run_dir.iterdir()) == []  # rank 1 writes nothing
    assert (tmp_path / "run" / "medtune.json").is_file()  # rank 0 did


def test_a_batch_the_processes_cannot_share_is_refused_before_anything_is_written(
        tiny_base, two_label_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "init_distributed", lambda device: (0, 3))  # rank 0 of 3
    cfg = tiny_cfg(tiny_base, "model.quantization=none", "train.batch_size=4")
    with pytest.raises(MedtuneError, match=r"train.batch_size=4 must be divisible by 3 processes"):
        train(cfg, two_label_data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # a corrected rerun needs no --overwrite


def test_errors_of_the_other_ranks_say_which_rank(monkeypatch):
    from medtune.cli import _rank_prefix

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _rank_prefix() == ""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert _rank_prefix() == ""  # rank 0 reads as a single process
    monkeypatch.setenv("RANK", "1")
    assert _rank_prefix() == "[rank 1] "
