"""The embedded base: tokenizer + tiny Llama built locally, a plain HF directory, cached, seeded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medtune.base import CHAT_TEMPLATE, BaseSpec, build_base
from medtune.errors import MedtuneError
from medtune.synth import synth_protocol

TINY = dict(vocab_size=384, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2,
            seq_len=32, batch_size=4, steps=5)


@pytest.fixture(scope="module")
def notes() -> list[str]:
    return list(synth_protocol(60, seed=1)["text"])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_build_saves_a_plain_hf_model_and_reuses_the_cache(notes, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    path = build_base(notes, spec=BaseSpec(**TINY), progress=False)
    assert path.parent == tmp_path / "cache" / "bases"

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    ids = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}
    assert None not in ids and len(ids) == 3
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt.startswith(tok.bos_token) and prompt.endswith("<|assistant|>\n")
    with torch.no_grad():
        out = model(input_ids=torch.tensor([tok(notes[0])["input_ids"][:20]]))
    assert out.logits.shape[-1] == model.config.vocab_size
    info = json.loads((path / "medtune_base.json").read_text())
    assert info["kind"] == "embedded-base" and info["notes"] == 60 and info["spec"]["steps"] == 5

    # same inputs: the cached directory comes back untouched, no retraining
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    again = build_base(notes, spec=BaseSpec(**TINY), progress=False)
    assert again == path and (path / "model.safetensors").stat().st_mtime_ns == stamp
    # different inputs: a different cache entry
    other = build_base(notes[:-1], spec=BaseSpec(**TINY), progress=False)
    assert other != path and other.parent == path.parent


def test_build_is_deterministic_per_seed(notes, tmp_path):
    a = weights(build_base(notes, tmp_path / "a", BaseSpec(**TINY, seed=3), progress=False))
    b = weights(build_base(notes, tmp_path / "b", BaseSpec(**TINY, seed=3), progress=False))
    c = weights(build_base(notes, tmp_path / "c", BaseSpec(**TINY, seed=4), progress=False))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    vocab_a = json.loads((tmp_path / "a" / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_b = json.loads((tmp_path / "b" / "tokenizer.json").read_text())["model"]["vocab"]
    assert vocab_a == vocab_b


def test_build_pretraining_lowers_the_loss(notes, tmp_path):
    spec = BaseSpec(**{**TINY, "steps": 40})
    info = json.loads((build_base(notes, tmp_path / "m", spec, progress=False)
                       / "medtune_base.json").read_text())
    # an untrained model (uniform guess) costs ln(384) = 5.95 nats per token; 40 steps get < 5
    assert info["final_loss"] < math.log(384) - 0.75


def test_build_needs_enough_notes(tmp_path):
    with pytest.raises(MedtuneError, match="at least 20"):
        build_base(["a note"] * 5 + ["  "] * 30, tmp_path / "x", BaseSpec(**TINY), progress=False)
    assert not (tmp_path / "x").exists()


def test_processes_building_the_same_cached_base_take_turns(notes, tmp_path, monkeypatch, capsys):
    # a parallel sweep on the same notes: one builds, the other waits and reuses it (both built,
    # and the second's directory swap could fail the first reader)
    import threading
    import time

    import medtune.base as base_mod

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    real, calls = base_mod._build, []

    def slow_build(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(base_mod, "_build", slow_build)
    paths: list[Path] = []
    jobs = [threading.Thread(target=lambda: paths.append(
        build_base(notes, spec=BaseSpec(**TINY), progress=False))) for _ in range(2)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(60)
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert "waiting for another process building the base" in capsys.readouterr().err


def test_the_base_learns_no_identifier_the_notes_repeat(notes, tmp_path):
    # an MRN and a doctor's name in every note: byte-level BPE made whole tokens of them
    marked = [f"{n} MRN 99887766, seen by Dr. Quxworth." for n in notes]

    def vocab(path: Path) -> set[str]:
        return set(json.loads((path / "tokenizer.json").read_text())["model"]["vocab"])

    kept = vocab(build_base(marked, tmp_path / "raw", BaseSpec(**TINY), progress=False, scrub=False))
    assert {"Ġ99887766", "ĠQuxworth"} & kept  # the control: unscrubbed, they are tokens
    clean = vocab(build_base(marked, tmp_path / "clean", BaseSpec(**TINY), progress=False))
    assert not any("99887766" in t or "Quxworth" in t or "Qux" in t for t in clean)
    assert any("NAME" in t for t in clean)  # it learned the scrubbed notes: "[NAME]" in each
