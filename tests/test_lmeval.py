"""medtune's MCQA accuracy equals lm-eval-harness's log-likelihood scoring, item by item.

The lm-eval task renders medtune's own prompt (plain template, ``Template.prompt_text``, with the
tokenizer's BOS written in front as the plain template's ``prompt_ids`` adds it) and scores the
letters A-D as continuations with no delimiter. Two tiny models: the session's tiny base, and one
whose tokenizer merges " A" into one token, where encoding the prompt and the letter separately
(medtune's old rule) and jointly (lm-eval's rule) give different token sequences.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest

from conftest import _save_tiny
from medtune.config import PredictConfig
from medtune.data import load_labeled
from medtune.measure import measure
from medtune.model import load_tokenizer
from medtune.scoring import score_naive
from medtune.synth import synth_mcqa
from medtune.tasks import default_template
from medtune.tasks.mcqa import LETTERS, format_question

lm_eval = pytest.importorskip("lm_eval")

TASK = "medtune_mcqa_check"


def _mcqa_dir(src, dst):
    """A 'merged'-kind MCQA model directory from a plain HF directory."""
    shutil.copytree(src, dst)
    tok = load_tokenizer(dst)
    default_template("mcqa", tok, LETTERS, "plain").save(dst)
    (dst / "medtune.json").write_text(json.dumps({"kind": "merged", "task": "mcqa"}))
    (dst / "labels.json").write_text(json.dumps({"task": "mcqa", "labels": LETTERS}))
    return dst


def _write_task(model_dir, tmp_path, n: int = 24):
    """The synthetic questions as JSONL (MedMCQA columns + the rendered prompt) and a task YAML."""
    tok = load_tokenizer(model_dir)
    template = default_template("mcqa", tok, LETTERS, "plain")
    limit = 250  # tiny models hold 256 positions: no row may need truncation on either side
    rows = []
    for record in synth_mcqa(3 * n, seed=7).to_dict("records"):
        prompt = tok.bos_token + template.prompt_text(tok, format_question(record))
        if len(tok(prompt + "A", add_special_tokens=False)["input_ids"]) < limit:
            rows.append({**record, "prompt": prompt})
    rows = rows[:n]
    assert len(rows) == n
    data = tmp_path / "mcqa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    validation: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(tmp_path / 'hf_cache'))}\n"
        "validation_split: validation\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"{{prompt}}\"\n"
        "doc_to_choice: [\"A\", \"B\", \"C\", \"D\"]\n"
        "doc_to_target: cop\n"
        "target_delimiter: \"\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return data, tasks, rows


def _lm_eval(model_dir, tasks):
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
        tasks=[TASK], task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
        batch_size=4)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return out["results"][TASK]["acc,none"], samples


def _compare(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data, tasks, rows = _write_task(model_dir, tmp_path)
    acc_lm, samples = _lm_eval(model_dir, tasks)

    df = load_labeled(data, task="mcqa")  # exactly what `medtune evaluate` reads and scores
    m = measure(str(model_dir), list(df["text"]), labels=None, task="mcqa",
                cfg=PredictConfig(top_k=4), probabilities=True)
    preds = [r["prediction"] for r in m["rows"]]
    acc_mt = sum(p == g for p, g in zip(preds, df["label"], strict=True)) / len(preds)

    # lm-eval saw medtune's prompt verbatim, and the letters with no delimiter
    assert [s["arguments"][0][0] for s in samples] == [r["prompt"] for r in rows]
    assert all([a[1] for a in s["arguments"]] == LETTERS for s in samples)
    lm_loglik = [[r[0] for r in s["filtered_resps"]] for s in samples]
    lm_choice = [LETTERS[max(range(4), key=row.__getitem__)] for row in lm_loglik]
    assert preds == lm_choice
    assert acc_mt == pytest.approx(acc_lm, abs=1e-12)
    # same log-likelihoods up to one constant per item (tokens shared by all four choices)
    for probs, ll in zip(m["probabilities"], lm_loglik, strict=True):
        ours = [math.log(p) for p in probs]
        assert [o - ours[0] for o in ours] == pytest.approx([x - ll[0] for x in ll], abs=2e-4)
    return preds, df


def test_mcqa_accuracy_equals_lm_eval(tiny_base, tmp_path, monkeypatch):
    model = _mcqa_dir(tiny_base, tmp_path / "model")
    _compare(model, tmp_path, monkeypatch)


def test_mcqa_matches_lm_eval_when_answer_token_merges(tmp_path, monkeypatch):
    from medtune.base import train_tokenizer

    questions = [format_question(r) for r in synth_mcqa(60, seed=1).to_dict("records")]
    tok = train_tokenizer(questions + [f"Answer: {x}" for x in LETTERS] * 50, vocab_size=448)
    model = _mcqa_dir(_save_tiny(tmp_path / "plain", tok), tmp_path / "model")
    tok = load_tokenizer(model)
    # joint encoding ends in one " A" token; prompt and letter encoded apart do not
    joint = tok("Answer: A", add_special_tokens=False)["input_ids"]
    apart = (tok("Answer: ", add_special_tokens=False)["input_ids"]
             + tok("A", add_special_tokens=False)["input_ids"])
    assert joint != apart and tok.convert_ids_to_tokens(joint[-1:]) == ["ĠA"]

    preds, df = _compare(model, tmp_path, monkeypatch)

    # the separate-encoding rule really scores something else on this tokenizer
    from medtune.predict import Predictor

    p = Predictor.from_path(str(model), task="mcqa")
    texts = list(df["text"])
    old = score_naive(p.model, p.prompts(texts, 1), p.label_ids, tok.pad_token_id)
    assert [LETTERS[i] for i in old.argmax(-1).tolist()] != preds
