"""`medtune bench train|predict` in a tiny quick mode: result structure, the same data on both
sides, finite losses, constrained predictions inside the label set. No timing assertions: the
machine is shared and timings are what the benchmark reports, not what a test can promise."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from conftest import TINY_LABELS, TINY_NOTES
from medtune.bench import bench_train
from medtune.bench_predict import bench_predict
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.train import train

STEPS, BATCH = 3, 4


@pytest.fixture(scope="module")
def train_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_train")
    return out, bench_train(out, steps=STEPS, batch_size=BATCH, vocab=["embedded"],
                            sides=("medtune", "trl", "trl_fp32", "baseline"), lora_r=8,
                            progress=False)


def test_bench_train_structure_and_same_data_on_both_sides(train_result):
    out, r = train_result
    assert json.loads((out / "bench_train.json").read_text()) == json.loads(json.dumps(r))
    md = (out / "bench_train.md").read_text()
    assert "| embedded |" in md and "medtune / baseline" in md
    (run,) = r["runs"]
    assert run["model"] == "embedded" and run["vocab_size"] >= 256
    ours, theirs = run["sides"]["medtune"], run["sides"]["baseline"]
    for side in (ours, theirs):
        assert side["steps"] == STEPS and len(side["losses"]) == STEPS
        assert all(math.isfinite(x) and x > 0 for x in side["losses"])
        assert side["tokens_per_s"] > 0 and side["peak_mb"] > 0 and side["delta_mb"] >= 0
    # one epoch of the same STEPS x BATCH notes on each side: the same real tokens in total
    assert ours["tokens_total"] == theirs["tokens_total"] > STEPS * BATCH
    # sorting by length then cutting equal batches pads least of any split into equal batches
    assert ours["padded_tokens_total"] <= theirs["padded_tokens_total"]
    assert set(run["vs_baseline"]) == {"tokens_per_s_ratio", "peak_memory_ratio",
                                       "delta_memory_ratio"}
    assert all(v > 0 for v in run["vs_baseline"].values())
    # TRL's SFTTrainer (the original project's stack) saw the same examples, one epoch
    trl = run["sides"]["trl"]
    assert trl["steps"] == STEPS and all(math.isfinite(x) and x > 0 for x in trl["losses"])
    assert trl["tokens_total"] == ours["tokens_total"] and "medtune / trl" in md
    assert run["vs_trl"]["tokens_per_s_ratio"] > 0
    # the memory floor: NF4 + double quant weights, plus LoRA gradients and AdamW moments
    for side in (ours, theirs):
        f = side["footprint"]
        assert f["quantized_bits_per_param"] == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
        assert f["trainable_params"] == ours["footprint"]["trainable_params"] > 0
        assert f["floor_mb"] == pytest.approx(f["weights_mb"] + f["grad_and_optimizer_mb"])
        assert f["grad_and_optimizer_mb"] == pytest.approx(3 * 4 * f["trainable_params"] / 2**20)
        assert side["peak_over_floor"] == pytest.approx(side["peak_mb"] / f["floor_mb"])
    assert "| floor MB | peak / floor |" in md
    # TRL casts a quantized model's LoRA weights to bf16 (2 bytes each); trl_fp32 undoes it
    n = ours["footprint"]["trainable_params"]
    assert trl["footprint"]["grad_and_optimizer_mb"] == pytest.approx(3 * 2 * n / 2**20)
    fp32 = run["sides"]["trl_fp32"]
    assert fp32["footprint"]["grad_and_optimizer_mb"] == pytest.approx(3 * 4 * n / 2**20)
    assert fp32["tokens_total"] == ours["tokens_total"] and "medtune / trl_fp32" in md
    # TRL with float32 LoRA and the plain loop: the same batches, optimizer and learning-rate
    # schedule, so the same losses (TRL's own cosine warm-up started at lr 0: it lagged a step)
    assert fp32["losses"] == pytest.approx(theirs["losses"], rel=1e-4)


def test_bench_refuses_to_overwrite_and_unknown_sides(train_result, tmp_path):
    out, _ = train_result
    with pytest.raises(MedtuneError, match=r"bench_train\.json"):
        bench_train(out, steps=1)
    with pytest.raises(MedtuneError, match="sides"):
        bench_train(tmp_path, sides=("medtune", "deepspeed"))
    with pytest.raises(MedtuneError, match="repeated"):
        bench_train(tmp_path, sides=("medtune", "trl", "medtune"))
    with pytest.raises(MedtuneError, match=r"steps must be >= 3 \(the first 2 are not timed\)"):
        bench_train(tmp_path, steps=2)  # every step would be a warm-up step, timed


def test_arch_presets_have_the_published_sizes():
    from medtune.archs import arch_config, param_count

    assert param_count(arch_config("gemma-2b")) == pytest.approx(2.506e9, rel=1e-3)
    assert param_count(arch_config("llama-2-7b")) == pytest.approx(6.738e9, rel=1e-3)
    one = arch_config("llama-2-7b", layers=1)
    assert (one.num_hidden_layers, one.hidden_size, one.vocab_size) == (1, 4096, 32000)
    with pytest.raises(MedtuneError, match="unknown 'gpt-5'"):
        arch_config("gpt-5")


def test_bench_train_arch_row(tmp_path, monkeypatch, capsys):
    """An --arch row: the preset's shape (a tiny stand-in here), random weights, the
    embedded tokenizer; refused names and vocabularies fail before anything is built."""
    from medtune import archs

    monkeypatch.setitem(archs.ARCHS, "tiny-gemma", {
        "model_type": "gemma", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 32, "tie_word_embeddings": True})
    r = bench_train(tmp_path / "a", steps=3, batch_size=2, vocab="none", arch="tiny-gemma",
                    layers=2, sides="medtune,baseline", lora_r=4, progress=True)
    err = capsys.readouterr().err  # progress in a log: whole lines, no carriage returns
    assert "\rbench" not in err and "bench train [tiny-gemma-2L] steps 3/3" in err
    (run,) = r["runs"]
    assert (run["model"], run["vocab_size"], run["hidden_size"], run["layers"]) == \
        ("tiny-gemma-2L", 4096, 64, 2)
    assert run["sides"]["medtune"]["footprint"]["params"] == run["params"] > 4096 * 64
    assert all(math.isfinite(x) for x in run["sides"]["baseline"]["losses"])
    with pytest.raises(MedtuneError, match="unknown 'nope'"):
        bench_train(tmp_path / "b", arch="nope", progress=False)
    with pytest.raises(MedtuneError, match="neither 'embedded' nor a vocabulary size"):
        bench_train(tmp_path / "c", vocab="gemma-2b", progress=False)
    with pytest.raises(MedtuneError, match="nothing to benchmark"):
        bench_train(tmp_path / "d", vocab="none", progress=False)


def test_bench_predict_constrained_stays_in_label_set(tiny_base, tmp_path, monkeypatch):
    data = tmp_path / "notes.csv"
    labels = ["CT Head", "MRI Brain", "CT Urography", "L-Spine"] * 2
    pd.DataFrame({"id": [f"n{i}" for i in range(32)], "text": TINY_NOTES,
                  "label": labels * 4}).to_csv(data, index=False)
    assert set(labels) == set(TINY_LABELS)
    cfg = load_config(None, [f"model.base={tiny_base}", "model.device=cpu", "lora.r=8",
                             "train.batch_size=8", "train.max_steps=2", "train.eval_every=0",
                             "train.eval_samples=4", "train.save_every=0"])
    run = train(cfg, str(data), tmp_path / "run", progress=False)
    from medtune.predict import Predictor

    loads: list[tuple[str, str, str | None]] = []
    real = Predictor.from_path.__func__

    def spy(cls, path, **kw):
        predictor = real(cls, path, **kw)
        loads.append((predictor.cfg.merge, predictor.cfg.merge_dtype, predictor.merged_dtype))
        return predictor

    monkeypatch.setattr(Predictor, "from_path", classmethod(spy))
    import medtune.merge as merge_mod

    monkeypatch.setattr(merge_mod, "native_bf16_matmul", lambda: True)  # bf16 runs on any CPU
    r = bench_predict(tmp_path / "out", n=20, model=str(run), data=str(data), chunk=10,
                      max_new_tokens=4, progress=False)
    # on CPU medtune merges the LoRA run in memory; the original generation side gets its own
    # unmerged base + adapter, and generation runs once more on the merged copy
    assert r["n"] == 20
    if torch.cuda.is_available():  # auto never merges on a GPU: one load, no extra side
        assert loads == [("auto", "auto", None)] and r["merged_in_memory"] is False
        assert set(r["runs"][0]["sides"]) == {"constrained", "generate"}
        return
    # bf16 merged weights: the same scorer with float32 weights runs as its own side, and the
    # like-for-like generation runs on that float32 copy
    assert loads == [("auto", "auto", "bfloat16"), ("no", "auto", None),
                     ("auto", "float32", "float32")]
    assert r["merged_in_memory"] is True and r["merged_dtype"] == "bfloat16"
    assert r["generate_merged_dtype"] == "float32"
    exact = r["runs"][0]["sides"].pop("constrained_float32")
    assert exact["in_label_set"] == 1.0 and exact["notes_per_s"] > 0
    assert r["runs"][0]["speedup_merge_dtype"] == pytest.approx(
        r["runs"][0]["sides"]["constrained"]["notes_per_s"] / exact["notes_per_s"])
    assert r["runs"][0]["speedup_vs_generate_merged"] == pytest.approx(
        exact["notes_per_s"] / r["runs"][0]["sides"]["generate_merged"]["notes_per_s"])
    assert "the same with float32 weights" in (tmp_path / "out" / "bench_predict.md").read_text()
    check = r["merge_check"]
    assert check["notes"] == 20 and 0.0 <= check["same_prediction"] <= 1.0
    assert 0.0 <= check["max_abs_logprob_diff"] < 0.5
    assert set(r["runs"][0]["sides"]) == {"constrained", "generate", "generate_merged"}
    c, g, gm = (r["runs"][0]["sides"][s] for s in ("constrained", "generate", "generate_merged"))
    assert c["in_label_set"] == 1.0  # a constrained prediction is always one of the labels
    for side in (c, g, gm):
        assert 0.0 <= side["accuracy"] <= 1.0 and side["notes_per_s"] > 0
        assert 0.0 <= side["in_label_set"] <= 1.0
    assert r["runs"][0]["speedup"] == pytest.approx(c["notes_per_s"] / g["notes_per_s"])
    ceiling = r["runs"][0]["prompt_only"]["notes_per_s"]
    assert ceiling > 0 and r["runs"][0]["speedup_ceiling"] == pytest.approx(ceiling / g["notes_per_s"])
    assert json.loads((tmp_path / "out" / "bench_predict.json").read_text())["n"] == 20
    md = (tmp_path / "out" / "bench_predict.md").read_text()
    assert "constrained batch scoring" in md and "Ceiling: reading the prompts alone" in md
    assert "### 1 thread\n" in md and "Ceiling (prompts alone): " in md and "McNemar p = " in md
    assert "against generation on the merged copy (like for like: both with float32 weights)" in md
    assert "label log-probabilities differ from base + adapter's" in md

    # a merged directory: nothing to merge, its float32 linear layers are cast to bf16 instead;
    # the generation side and the float32 side both use the directory as loaded
    from medtune.merge import merge

    merged = merge(run, tmp_path / "merged")
    assert merged["dtype"] == "float32"
    loads.clear()
    r = bench_predict(tmp_path / "out_merged", n=20, model=str(tmp_path / "merged"),
                      data=str(data), chunk=10, max_new_tokens=4, progress=False)
    assert loads == [("auto", "auto", None), ("no", "auto", None), ("auto", "float32", None)]
    assert r["merged_in_memory"] is False and r["weights_dtype"] == "bfloat16"
    assert set(r["runs"][0]["sides"]) == {"constrained", "generate", "constrained_float32"}
    assert r["merge_check"]["notes"] == 20 and r["merge_check"]["max_abs_logprob_diff"] < 0.5
    md = (tmp_path / "out_merged" / "bench_predict.md").read_text()
    assert "linear layers cast to bfloat16" in md and "medtune cast the model's linear layers" in md
    assert "Generation uses the float32 model as loaded" in md


def test_bench_predict_arch_model(tmp_path, monkeypatch, capsys):
    """--arch: a random full-size preset (a tiny stand-in here) read by both sides; generation
    stops after the longest label's tokens; model and arch together are refused."""
    from medtune import archs

    monkeypatch.setenv("MEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(archs.ARCHS, "tiny-llama", {
        "model_type": "llama", "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2,
        "tie_word_embeddings": False})
    before = torch.get_num_threads()
    r = bench_predict(tmp_path / "out", n=8, arch="tiny-llama", layers=1, n_labels=2,
                      n_train=64, base_steps=2, chunk=4, threads=(1, 2), progress=True)
    assert torch.get_num_threads() == before
    err = capsys.readouterr().err  # progress in a log: whole lines, no carriage returns
    assert "\rbench" not in err and err.count("bench predict notes 8/8") == 2
    assert r["model"] == "tiny-llama (1 layer), random weights + QLoRA 5 steps"
    # every side ran at each thread count, on the same notes: the same constrained predictions
    assert r["threads"] == [1, 2] and [run["threads"] for run in r["runs"]] == [1, 2]
    one, two = (run["sides"]["constrained"] for run in r["runs"])
    assert one["in_label_set"] == two["in_label_set"] == 1.0
    assert one["accuracy"] == two["accuracy"]
    for run in r["runs"]:
        pair = run["paired"]
        assert pair["only_constrained"] + pair["only_generate"] <= 8
        gap = (pair["only_constrained"] - pair["only_generate"]) / 8
        assert run["accuracy_gain"] == pytest.approx(gap)
    gen = r["settings"]["generate"]["max_new_tokens"]
    assert 2 <= gen < 16  # the longest label's tokens + EOS, not the default 16
    md = (tmp_path / "out" / "bench_predict.md").read_text()
    assert f"Generation stops after {gen} new tokens" in md
    assert "### 1 thread\n" in md and "### 2 threads\n" in md
    with pytest.raises(MedtuneError, match="model or arch"):
        bench_predict(tmp_path / "x", model="some/run", arch="tiny-llama", progress=False)
    with pytest.raises(MedtuneError, match="unknown 'nope'"):
        bench_predict(tmp_path / "y", arch="nope", progress=False)


def test_paired_counts_mcnemar():
    from medtune.bench_predict import paired_counts

    gold = list("aaaaaaaaaa")
    a = list("aaaaaaaaab")  # 9 right
    b = list("aaaabbbbbb")  # 4 right; a alone gets 5 of them, b alone none
    assert paired_counts(a, b, gold) == {"only_constrained": 5, "only_generate": 0,
                                         "mcnemar_p": pytest.approx(2 / 32)}
    both = paired_counts(a, a, gold)
    assert both["only_constrained"] == both["only_generate"] == 0 and both["mcnemar_p"] == 1.0
    # 3 against 1 discordant: two-sided p = 2 * (C(4,0) + C(4,1)) / 16 = 0.625
    c, d = list("aaabbbbbbb"), list("bbbabbbbbb")
    assert paired_counts(c, d, gold) == {"only_constrained": 3, "only_generate": 1,
                                         "mcnemar_p": pytest.approx(0.625)}


def test_a_failing_side_keeps_its_log_next_to_the_results(tmp_path):
    from medtune.bench import _Worker

    spec = {"name": "broken", "side": "medtune", "overrides": ["model.device=cpu"],
            "data": str(tmp_path / "missing.csv"), "val": None, "labels": [], "steps": 3,
            "threads": 1, "work": str(tmp_path / "run")}
    worker = _Worker(spec, tmp_path, tmp_path / "out")
    try:
        with pytest.raises(MedtuneError, match=r"bench side 'broken' exited 1: .*missing\.csv.*"
                                               r"\(log: .*bench_failed_broken\.log\)"):
            worker.read()
    finally:
        worker.close()
    # the work directory is temporary: the log the error names must outlive it
    assert "missing.csv" in (tmp_path / "out" / "bench_failed_broken.log").read_text()
