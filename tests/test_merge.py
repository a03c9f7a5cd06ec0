"""Merge: adapter folded into an unquantized base; logits checked against base + adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import TINY_NOTES
from medtune.config import ModelConfig, load_config
from medtune.errors import MedtuneError
from medtune.merge import merge
from medtune.tasks import Template
from medtune.train import train


@pytest.fixture(scope="module")
def qlora_run(tiny_base, tmp_path_factory) -> Path:
    """A few NF4 QLoRA steps at a high learning rate, so the adapter is far from zero."""
    d = tmp_path_factory.mktemp("merge")
    labels = ["head" if i in (0, 1, 4, 5) else "body" for i in range(8)]
    pd.DataFrame({"text": TINY_NOTES[:16], "label": labels * 2}).to_csv(d / "t.csv", index=False)
    cfg = load_config(None, [f"model.base={tiny_base}", "model.device=cpu",
                             "model.quantization=nf4", "lora.r=4", "train.batch_size=4",
                             "train.lr=2e-2", "train.warmup_steps=0", "train.max_steps=4",
                             "train.eval_every=0", "train.save_every=0", "train.eval_samples=2"])
    return train(cfg, str(d / "t.csv"), d / "run", val=str(d / "t.csv"), progress=False)


def _probe(tok, template: Template) -> dict[str, torch.Tensor]:
    ids = template.prompt_ids(tok, "pt with headache after fall, evaluate lesion")
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids),
                                                                           dtype=torch.long)}


def test_merged_model_matches_base_plus_adapter(qlora_run, tiny_base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    report = merge(qlora_run, out, source="original")
    assert report["tolerance"] <= 1e-3
    assert report["max_abs_logit_diff_vs_adapter"] < report["tolerance"]
    q_diff = report["max_abs_logit_diff_vs_quantized_training_model"]
    assert isinstance(q_diff, float) and math.isfinite(q_diff) and q_diff > 0  # NF4 rounding

    # a plain HF directory: transformers alone loads it, no medtune, no peft
    tok = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert tok.pad_token_id != tok.eos_token_id
    meta = json.loads((out / "medtune.json").read_text())
    assert meta["kind"] == "merged" and meta["merge"]["dtype"] == "float32"
    assert json.loads((out / "labels.json").read_text())["labels"] == ["body", "head"]
    template = Template.load(out)

    # independent check of the claim: fp32 base + adapter vs the merged weights
    base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, str(qlora_run / "adapter")).eval()
    batch = _probe(tok, template)
    with torch.no_grad():
        want = with_adapter(**batch).logits
        got = merged(**batch).logits
        with with_adapter.disable_adapter():
            plain = with_adapter(**batch).logits
    assert float((want - got).abs().max()) < 1e-3
    assert float((plain - got).abs().max()) > 1e-2  # the adapter really was merged


def test_merge_refuses_a_directory_that_is_not_a_run(tiny_base, tmp_path):
    with pytest.raises(MedtuneError, match="not a finished LoRA run"):
        merge(tiny_base, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MedtuneError, match="not a finished LoRA run"):
        merge(tmp_path, tmp_path / "out")


def test_merge_refuses_to_overwrite_and_rejects_unknown_dtype(qlora_run, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MedtuneError, match="not empty"):
        merge(qlora_run, out)
    assert (out / "keep.txt").read_text() == "x"
    with pytest.raises(MedtuneError, match="dtype"):
        merge(qlora_run, tmp_path / "other", dtype="float8")
    before = sorted(p.name for p in qlora_run.iterdir())
    for out in (qlora_run, qlora_run.parent):  # the run itself, a folder holding it
        with pytest.raises(MedtuneError, match="is or contains the input"):
            merge(qlora_run, out, overwrite=True)
    assert sorted(p.name for p in qlora_run.iterdir()) == before


def test_default_merge_uses_the_dequantized_weights_the_adapter_was_trained_on(qlora_run, tmp_path):
    """Merging into the dequantized NF4 weights reproduces the 4-bit training model more closely
    than merging into the original full-precision checkpoint."""
    deq = merge(qlora_run, tmp_path / "deq")
    orig = merge(qlora_run, tmp_path / "orig", source="original")
    assert deq["source"] == "dequantized" and orig["source"] == "original"
    assert deq["max_abs_logit_diff_vs_adapter"] < deq["tolerance"]
    assert (deq["max_abs_logit_diff_vs_quantized_training_model"]
            < orig["max_abs_logit_diff_vs_quantized_training_model"])
    assert deq["layers_dequantized"] > 0 and orig["layers_dequantized"] == 0


def test_a_dequantized_merge_that_finds_no_quantized_layer_is_refused(qlora_run, tmp_path,
                                                                      monkeypatch):
    import medtune.merge

    monkeypatch.setattr(medtune.merge, "dequantized_weight", lambda module: None)
    with pytest.raises(MedtuneError, match="has no quantized layer medtune can read back"):
        merge(qlora_run, tmp_path / "none")
    assert not (tmp_path / "none").exists()


# ----------------------------------------------------------------------------- in memory
def _training_forward_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits through the autograd path training uses (input that requires grad)."""
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        return model(inputs_embeds=embeds).logits.detach().float()


def test_in_memory_merge_reproduces_the_training_forward(qlora_run):
    import bitsandbytes as bnb

    from medtune.merge import fold_bytes, fold_in_memory
    from medtune.model import load_for_inference

    cpu = ModelConfig(device="cpu")
    loaded = load_for_inference(qlora_run, cpu)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([loaded.template.prompt_ids(tok, "pt with headache after fall")])
    ref = _training_forward_logits(model, ids)
    with model.disable_adapter():
        base_only = _training_forward_logits(model, ids)
    assert float((ref - base_only).abs().max()) > 1e-2  # the adapter matters at this tolerance
    n_quant = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    expected_bytes = sum(m.in_features * m.out_features * 4 for m in model.modules()
                         if isinstance(m, bnb.nn.Linear4bit))
    assert n_quant > 0 and fold_bytes(model) == expected_bytes
    assert fold_in_memory(model) == n_quant
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        folded = model(input_ids=ids).logits.float()
    assert float((folded - ref).abs().max()) < 1e-3  # same function as in training (fp32)

    kept = load_for_inference(qlora_run, cpu).model  # bitsandbytes' eval-mode kernel
    with torch.no_grad():
        kernel = kept(input_ids=ids).logits.float()
    assert float((folded - kernel).abs().max()) < 0.1
    state = next(m for m in kept.modules() if isinstance(m, bnb.nn.Linear4bit)).weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # AVX512-BF16 CPUs repack on eval
        from medtune.merge import fold_blocker

        assert "repacked" in str(fold_blocker(kept))
        with pytest.raises(MedtuneError, match="repacked"):
            fold_in_memory(kept)


def test_in_memory_merge_of_a_partial_adapter_dequantizes_the_other_layers(tiny_base):
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from medtune.merge import fold_bytes, fold_in_memory
    from medtune.model import load_base_model, load_tokenizer

    tok = load_tokenizer(tiny_base)
    base = load_base_model(str(tiny_base), ModelConfig(quantization="nf4", device="cpu"), tok)
    quant = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    expected_bytes = sum(m.in_features * m.out_features * 4 for m in quant)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"],
                                            init_lora_weights=False)).eval()  # random B: B @ A != 0
    ids = torch.tensor([tok("pt with headache after fall")["input_ids"]])
    ref = _training_forward_logits(model, ids)
    assert fold_bytes(model) == expected_bytes  # each 4-bit layer counted once
    assert fold_in_memory(model) == len(quant)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    with torch.no_grad():
        assert float((model(input_ids=ids).logits.float() - ref).abs().max()) < 1e-3


def test_predictor_merges_a_run_on_cpu_unless_told_not_to(qlora_run):
    import bitsandbytes as bnb

    from medtune.config import PredictConfig
    from medtune.errors import ConfigError
    from medtune.predict import Predictor

    texts = ["pt with headache after fall", "renal stone, hematuria", "back pain, radiculopathy"]
    cpu = ModelConfig(device="cpu")
    kept = Predictor.from_path(str(qlora_run), model_cfg=cpu, cfg=PredictConfig(merge="no"))
    merged = Predictor.from_path(str(qlora_run), model_cfg=cpu,  # predict.merge = auto
                                 cfg=PredictConfig(merge_dtype="float32"))
    assert kept.merged_dtype is None and merged.merged_dtype == "float32"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in kept.model.modules())
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.model.modules())
    s_kept, s_merged = kept.scores(texts), merged.scores(texts)  # label log-likelihoods
    assert s_merged.shape == (3, 2) and float((s_kept - s_merged).abs().max()) < 0.05
    with kept.model.disable_adapter():  # the same bound would catch a lost adapter
        assert float((kept.scores(texts) - s_merged).abs().max()) > 0.05
    with pytest.raises(ConfigError, match=r"predict\.merge: unknown"):
        Predictor.from_path(str(qlora_run), model_cfg=cpu, cfg=PredictConfig(merge="maybe"))
    with pytest.raises(ConfigError, match=r"predict\.merge_dtype: unknown 'float16'"):
        Predictor.from_path(str(qlora_run), model_cfg=cpu, cfg=PredictConfig(merge_dtype="float16"))


def test_cast_linear_multiplies_in_bf16_and_returns_float32_with_a_float32_bias():
    from medtune.merge import CastLinear, _plain_linear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 8)
    torch.nn.init.normal_(base.bias, std=1.0)
    x = torch.randn(4, 16)
    layer = _plain_linear(base, base.weight.detach().to(torch.bfloat16), torch.float32)
    assert isinstance(layer, CastLinear) and layer.weight.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, base.bias)
    with torch.no_grad():
        y, ref = layer(x), base(x)
        bf16_product = (x.bfloat16() @ base.weight.bfloat16().T).float()
    assert y.dtype == torch.float32
    assert torch.allclose(y, bf16_product + base.bias, atol=1e-6)  # bias added after the cast
    assert float((y - ref).abs().max()) < 0.1  # bf16 rounding of the product only
    same = _plain_linear(base, base.weight.detach(), torch.float32)
    assert type(same) is torch.nn.Linear
    with torch.no_grad():
        assert torch.allclose(same(x), ref)


def test_bf16_merged_weights_keep_float32_activations_and_the_predictions(qlora_run, monkeypatch):
    import medtune.merge as merge_mod
    from medtune.config import PredictConfig
    from medtune.merge import CastLinear
    from medtune.predict import Predictor

    texts = TINY_NOTES[:8]
    cpu = ModelConfig(device="cpu")
    exact, half = (Predictor.from_path(str(qlora_run), model_cfg=cpu,
                                       cfg=PredictConfig(merge_dtype=d))
                   for d in ("float32", "bfloat16"))
    kept = Predictor.from_path(str(qlora_run), model_cfg=cpu, cfg=PredictConfig(merge="no"))
    assert half.merged_dtype == "bfloat16"
    monkeypatch.setattr(merge_mod, "native_bf16_matmul", lambda: True)  # any CPU: as if native
    scoring, generating = (Predictor.from_path(str(qlora_run), model_cfg=cpu,
                                               cfg=PredictConfig(mode=mode))
                           for mode in ("constrained", "generate"))
    assert scoring.merged_dtype == "bfloat16"
    assert generating.merged_dtype == "float32"  # auto: generation keeps float32 weights
    cast = [m for m in half.model.modules() if isinstance(m, CastLinear)]
    assert cast and all(m.weight.dtype == torch.bfloat16 for m in cast)
    assert not any(isinstance(m, CastLinear) for m in exact.model.modules())
    assert half.model.get_input_embeddings().weight.dtype == torch.float32
    with torch.no_grad():
        assert cast[0](torch.randn(2, cast[0].in_features)).dtype == torch.float32
    s_exact, s_half = exact.scores(texts), half.scores(texts)
    with kept.model.disable_adapter():
        s_base = kept.scores(texts)
    rounding, adapter = (float((s_half - s_exact).abs().max()),
                         float((s_base - s_exact).abs().max()))
    assert rounding < 0.05 < adapter  # bf16 rounding is far smaller than what the adapter adds
    assert torch.equal(s_half.argmax(1), s_exact.argmax(1))


def test_predict_file_says_whether_it_merged(qlora_run, tmp_path):
    from medtune.config import PredictConfig
    from medtune.predict import predict_file

    data = tmp_path / "notes.csv"
    pd.DataFrame({"text": TINY_NOTES[:6]}).to_csv(data, index=False)
    cpu = ModelConfig(device="cpu")
    rows = {}
    for mode in ("auto", "no"):
        out = tmp_path / f"pred-{mode}.csv"
        summary = predict_file(str(qlora_run), str(data), str(out), PredictConfig(merge=mode),
                               model_cfg=cpu, progress=False)
        assert summary["rows"] == 6 and summary["merged_in_memory"] is (mode == "auto")
        assert (summary["merged_dtype"] in ("float32", "bfloat16")) is (mode == "auto")
        rows[mode] = pd.read_csv(out)
    assert list(rows["auto"]["prediction"]) == list(rows["no"]["prediction"])


def test_auto_merge_only_on_cpu_fp32_peft_models_that_fit(qlora_run, tiny_base, monkeypatch):
    from peft import LoraConfig, get_peft_model

    import medtune.merge as merge_mod
    import medtune.predict as predict_mod
    from medtune.merge import fold_blocker
    from medtune.model import load_base_model, load_for_inference, load_tokenizer
    from medtune.predict import merge_in_memory

    cpu = ModelConfig(device="cpu")
    model = load_for_inference(qlora_run, cpu).model
    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(merge_mod, "native_bf16_matmul", lambda native=native: native)
        assert predict_mod.merged_weight_dtype(model, "auto") == expected
        assert predict_mod.merged_weight_dtype(model, "auto", generate=True) == torch.float32
    assert predict_mod.merged_weight_dtype(model, "bfloat16") == torch.bfloat16
    monkeypatch.setattr(merge_mod, "native_bf16_matmul", lambda: True)
    monkeypatch.setattr(predict_mod, "model_device", lambda m: torch.device("cuda"))
    assert predict_mod.merged_weight_dtype(model, "auto") == torch.float32  # the model's own
    assert merge_in_memory(model, "auto") is None  # "on a GPU"
    monkeypatch.undo()

    monkeypatch.setattr(merge_mod, "available_memory", lambda: 1024)  # 1 KiB free
    assert merge_in_memory(model, "auto") is None
    assert merge_in_memory(model, "yes", "float32") == torch.float32  # forced

    tok = load_tokenizer(tiny_base)
    plain = load_base_model(str(tiny_base), ModelConfig(quantization="nf4", device="cpu"), tok)
    assert merge_in_memory(plain, "auto") is None  # no adapter: a 4-bit model stays 4-bit
    base = load_base_model(str(tiny_base), ModelConfig(quantization="none", device="cpu"), tok)
    dora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    assert "Dora" in str(fold_blocker(dora))
    monkeypatch.setattr(merge_mod, "available_memory", lambda: 2**40)
    assert merge_in_memory(dora, "auto") is None
    with pytest.raises(MedtuneError, match="cannot merge the adapter in memory"):
        merge_in_memory(dora, "yes")


def test_a_merged_directory_is_cast_to_bf16_for_scoring_only(qlora_run, tmp_path, monkeypatch):
    import medtune.merge as merge_mod
    from medtune.config import PredictConfig
    from medtune.merge import CastLinear
    from medtune.predict import Predictor, predict_file

    out = tmp_path / "merged"
    merge(qlora_run, out)
    cpu = ModelConfig(device="cpu")
    texts = TINY_NOTES[:8]
    monkeypatch.setattr(merge_mod, "native_bf16_matmul", lambda: True)  # any CPU: as if native
    preds = {name: Predictor.from_path(str(out), model_cfg=cpu, cfg=PredictConfig(**kw))
             for name, kw in {"auto": {}, "float32": {"merge_dtype": "float32"},
                              "no": {"merge": "no"}, "generate": {"mode": "generate"}}.items()}
    half = preds["auto"]
    assert half.weights_dtype == "bfloat16" and half.merged_dtype is None  # cast, not merged
    for name in ("float32", "no", "generate"):
        assert preds[name].weights_dtype is None
        assert not any(isinstance(m, CastLinear) for m in preds[name].model.modules())
    cast = [n for n, m in half.model.named_modules() if isinstance(m, CastLinear)]
    plain = [n for n, m in preds["no"].model.named_modules() if type(m) is torch.nn.Linear]
    assert cast and sorted(cast) == sorted(n for n in plain if "lm_head" not in n)
    head = half.model.get_output_embeddings()
    assert type(head) is torch.nn.Linear and head.weight.dtype == torch.float32
    s_half, s_exact = half.scores(texts), preds["no"].scores(texts)
    assert 0 < float((s_half - s_exact).abs().max()) < 0.05  # bf16 rounding, nothing more
    assert torch.equal(s_half.argmax(1), s_exact.argmax(1))

    data = tmp_path / "notes.csv"
    pd.DataFrame({"text": texts}).to_csv(data, index=False)
    summary = predict_file(half, str(data), str(tmp_path / "pred.csv"), half.cfg, progress=False)
    assert summary["weights_dtype"] == "bfloat16" and summary["merged_in_memory"] is False


def test_merge_requantizes_as_training_did(qlora_run, tiny_base, tmp_path):
    """NF4 codes depend on the dtype the weights were loaded in: a run trained with bf16
    compute (a GPU) must be dequantized from bf16-quantized weights, even on a CPU."""
    import shutil

    from safetensors.torch import load_file

    from medtune.config import ModelConfig
    from medtune.merge import dequantized_weight
    from medtune.model import load_base_model

    bf16_run = tmp_path / "bf16-run"
    shutil.copytree(qlora_run, bf16_run)
    meta = json.loads((bf16_run / "medtune.json").read_text())
    assert meta["compute_dtype"] == "float32"
    (bf16_run / "medtune.json").write_text(json.dumps({**meta, "compute_dtype": "bfloat16"}))
    key, layer = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj"
    merged = {}
    for name, run in (("fp32", qlora_run), ("bf16", bf16_run)):
        merge(run, tmp_path / name)
        merged[name] = load_file(str(tmp_path / name / "model.safetensors"))[key]
    deq = {name: dequantized_weight(load_base_model(
        str(tiny_base), ModelConfig(quantization="nf4", compute_dtype=dtype, device="cpu")
    ).get_submodule(layer)) for name, dtype in (("fp32", "float32"), ("bf16", "bfloat16"))}
    codes_differ = deq["bf16"] - deq["fp32"]
    assert codes_differ.abs().max() > 1e-4  # the two quantizations really differ here
    torch.testing.assert_close(merged["bf16"] - merged["fp32"], codes_differ, atol=1e-6, rtol=0)


def test_merge_names_what_is_wrong_with_its_input(merged_dir, tmp_path):
    (tmp_path / "notes.csv").write_text("text,label\n")
    for source, message in ((tmp_path / "missing", "run directory not found"),
                            (tmp_path / "notes.csv", "is a file, not a run directory"),
                            (merged_dir, "already a merged model")):
        with pytest.raises(MedtuneError, match=message):
            merge(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merge_with_progress_false_shows_no_loading_or_writing_bars(qlora_run, tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    try:
        merge(qlora_run, tmp_path / "quiet", progress=False)
        quiet = capfd.readouterr().err
        merge(qlora_run, tmp_path / "loud")
        loud = capfd.readouterr().err
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()
    assert "Loading weights" in loud and "Writing model shards" in loud
    assert "Loading weights" not in quiet and "Writing model shards" not in quiet


def test_a_damaged_or_unfinished_run_is_one_error_line_everywhere(qlora_run, tmp_path):
    """predict/merge/register/serve on a run whose adapter file is truncated or missing gave a
    SafetensorError or ValueError traceback (register logged it; serve started and answered 503)."""
    import shutil

    from medtune.model import check_model_path, load_for_inference
    from medtune.registry import register

    broken = tmp_path / "broken"
    shutil.copytree(qlora_run, broken)
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    gone = tmp_path / "gone"
    shutil.copytree(qlora_run, gone)
    (gone / "adapter" / "adapter_config.json").unlink()
    missing = tmp_path / "missing"  # config there, weights gone: register logged it
    shutil.copytree(qlora_run, missing)
    (missing / "adapter" / "adapter_model.safetensors").unlink()
    bad_config = tmp_path / "bad_config"
    shutil.copytree(qlora_run, bad_config)
    (bad_config / "adapter" / "adapter_config.json").write_text("{bad")
    for run, message in ((broken, "adapter_model.safetensors: damaged weights file"),
                         (gone, "no adapter/adapter_config.json"),
                         (missing, "adapter: no weights file"),
                         (bad_config, "adapter_config.json: not valid JSON")):
        loaders = [check_model_path, load_for_inference, lambda r: register(r, "never"),
                   lambda r: merge(r, tmp_path / "out")]
        for load in loaders:  # register: refused before any store is touched
            with pytest.raises(MedtuneError, match=message):
                load(run)
        assert not (tmp_path / "out").exists()
    unfinished = tmp_path / "unfinished"  # what an interrupted train leaves
    unfinished.mkdir()
    for name in ("labels.json", "template.json"):
        shutil.copy(qlora_run / name, unfinished / name)
    with pytest.raises(MedtuneError, match="training has not finished"):
        check_model_path(unfinished)
