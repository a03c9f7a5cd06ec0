"""Measuring a model for the before/after table: load it, predict, time it and size it, in its
own fresh Python process (``measure_isolated``) so that its "peak memory" is its own: on CUDA the
peak allocated after loading, on CPU the child's VmHWM (peak resident set of the process's own
address space). ``ru_maxrss`` is NOT used on Linux: a child inherits the parent's high-water mark
through fork+exec, so under pytest it reads as the test runner's RSS. ``model_memory_mb`` = peak -
resident set just before loading, i.e. what the model and its inference added on top of the
Python/torch runtime.

Bits per parameter come from the weights as loaded, before the first forward (bitsandbytes'
CPU kernels repack 4-bit weights on first use). "quantized layers" counts the bnb layers only:
NF4 + double quant = 4 (packed weight) + 8/64 (uint8 absmax per 64-block) + 32/(64*256) (fp32
absmax of the absmax per 256 blocks) ~= 4.127 bits; 8-bit = 8 + 32/in_features (fp32 scale per
output row). The constant-size lookup tables (``code``: 16 or 256 floats per layer) are left out.
"whole model" adds the unquantized embeddings, norms and head.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from medtune.config import PredictConfig
from medtune.errors import MedtuneError, describe
from medtune.fsutil import atomic_file

LATENCY_SAMPLE = 50  # notes predicted one at a time for p50/p95 latency


def _dir_bytes(path: Path) -> int:
    """Bytes of the files a model needs: hidden files and training checkpoints left out."""
    skip = path / "checkpoints"
    return sum(f.stat().st_size for f in path.rglob("*")
               if f.is_file() and not f.name.startswith(".") and skip not in f.parents)


def _rss_mb(field: str = "VmHWM") -> float:
    """This process's own peak (VmHWM) or current (VmRSS) resident set in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # fallback: KiB on Linux
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS


def _quant_state_bytes(state) -> int:
    """absmax (+ nested absmax and offset) of a bnb 4-bit QuantState; lookup tables left out."""
    total = 0
    for attr in ("absmax", "offset"):
        t = getattr(state, attr, None)
        if t is not None and hasattr(t, "numel"):
            total += t.numel() * t.element_size()
    nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    if nested is not None:
        total += _quant_state_bytes(nested)
    return total


def weight_stats(model) -> dict[str, Any]:
    """Logical parameter count, bytes held by weights and bits/parameter, for the whole model
    and for the quantized (bitsandbytes) layers alone (``None`` when there are none)."""
    logical = nbytes = q_logical = q_bytes = 0
    seen: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            size = p.numel() * p.element_size()
            count = p.numel()
            quant = getattr(p, "quant_state", None)
            if quant is not None and hasattr(module, "in_features"):  # 4-bit: packed storage
                count = module.in_features * module.out_features
                size += _quant_state_bytes(quant)
            scale = getattr(p, "SCB", None)
            if type(p).__name__ == "Int8Params" and scale is not None:  # 8-bit: row scales
                size += scale.numel() * scale.element_size()
            if quant is not None or type(p).__name__ == "Int8Params":
                q_logical += count
                q_bytes += size
            logical += count
            nbytes += size
    return {"params": logical, "weight_mb": nbytes / 2**20,
            "bits_per_param": 8 * nbytes / max(1, logical),
            "quantized_params": q_logical,
            "quantized_bits_per_param": 8 * q_bytes / q_logical if q_logical else None}


def _model_disk_bytes(path: str, meta: dict[str, Any]) -> int:
    size = _dir_bytes(Path(path))
    if meta.get("kind") == "run" and Path(meta.get("base", "")).is_dir():
        size += _dir_bytes(Path(meta["base"]))  # a run needs its base to be usable
    return size


def _import_runtime() -> None:
    import contextlib
    import importlib

    for name in ("transformers", "transformers.models.auto.modeling_auto", "peft",
                 "bitsandbytes"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def measure(model: str, texts: list[str], *, labels: str | None, task: str,
            cfg: PredictConfig, quantization: str | None = None,
            probabilities: bool = False) -> dict[str, Any]:
    """Load ``model``, predict ``texts``, time it and size it (in the calling process).

    ``probabilities``: also return the [N, L] label probabilities (constrained mode only)."""
    import torch

    from medtune.predict import Predictor

    cuda = torch.cuda.is_available()
    _import_runtime()  # so the "before" resident set already holds the libraries
    rss_before = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    pred = Predictor.from_path(model, labels=labels, task=task, cfg=cfg, quantization=quantization)
    load_s = time.perf_counter() - t0
    stats = weight_stats(pred.model)  # before the first forward: kernels may repack weights
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rows = pred.predict_texts(texts)
    batch_s = time.perf_counter() - t0
    lat = []
    for t in texts[:LATENCY_SAMPLE]:
        t1 = time.perf_counter()
        pred.predict_texts([t])
        lat.append(time.perf_counter() - t1)
    probs = (pred.probabilities(texts).tolist()
             if probabilities and cfg.mode == "constrained" else None)
    if cuda:
        peak, kind = torch.cuda.max_memory_allocated() / 2**20, "CUDA max allocated"
        model_mem = peak
    else:
        peak, kind = _rss_mb("VmHWM"), "peak RSS of the measuring process (VmHWM)"
        model_mem = max(0.0, peak - rss_before)
    return {"rows": rows, "labels": pred.labels, "probabilities": probs,
            "latency_s": lat, "batch_seconds": batch_s, "load_seconds": load_s,
            "peak_memory_mb": peak, "model_memory_mb": model_mem, "memory_kind": kind,
            "disk_mb": _model_disk_bytes(model, pred.loaded.meta) / 2**20,
            "quantization": quantization or pred.loaded.meta.get("quantization", "none"),
            # the merged weights' dtype, 'cast to <dtype>' for a model cast at load, None if neither
            "merged_in_memory": pred.merged_dtype or (
                f"cast to {pred.weights_dtype}" if pred.weights_dtype else None),
            **stats}


_CHILD = ("import pickle, sys\n"
          "with open(sys.argv[1], 'rb') as f:\n"
          "    sys.path[:] = pickle.load(f)\n"
          "    from medtune.measure import _child_main\n"
          "    _child_main(f, sys.argv[2])\n")


def _child_main(job, result_path: str) -> None:
    """Entry point of the measuring process: read the job, measure, pickle the answer."""
    import pickle

    try:
        threads, kwargs = pickle.load(job)
        import torch

        torch.set_num_threads(threads)  # a fresh interpreter starts with torch's default
        answer: tuple[str, Any] = ("ok", measure(**kwargs))
    except BaseException as exc:  # report to the parent, one line
        answer = ("error", describe(exc))
    with atomic_file(result_path) as tmp:
        tmp.write_bytes(pickle.dumps(answer))


def measure_isolated(**kwargs: Any) -> dict[str, Any]:
    """``measure`` in a fresh Python process so its peak memory is its own.

    The child is a new interpreter (``python -c``), not a multiprocessing child: it never
    re-imports the caller's main module, so an unguarded script or a notebook works too.
    A child that dies without answering raises MedtuneError with its exit code and the last
    line of its stderr."""
    import pickle
    import subprocess
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="medtune-measure-") as tmp:
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        with open(job, "wb") as fh:
            pickle.dump(list(sys.path), fh)
            pickle.dump((torch.get_num_threads(), kwargs), fh)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(job), str(result)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=env, check=False)
        if not result.is_file():
            lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            raise MedtuneError(f"measuring {kwargs.get('model')}: worker process died (exit code "
                               f"{proc.returncode}{': ' + lines[-1] if lines else ''})")
        status, value = pickle.loads(result.read_bytes())
    if status != "ok":
        raise MedtuneError(f"measuring {kwargs.get('model')}: {value}")
    return value


def summary_row(name: str, m: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """One line of the comparison table from a ``measure`` result and its metrics."""
    from medtune.metrics import latency_stats

    lat = latency_stats(m["latency_s"]) if m["latency_s"] else {"p50_ms": None, "p95_ms": None}
    qbits = m.get("quantized_bits_per_param")
    return {"model": name, "accuracy": round(metrics["accuracy"], 4),
            "macro_f1": round(metrics.get("macro_f1", float("nan")), 4),
            "size_mb": round(m["disk_mb"], 2), "weight_mb": round(m["weight_mb"], 3),
            "params": int(m["params"]), "bits_per_param": round(m["bits_per_param"], 3),
            "quantized_bits_per_param": None if qbits is None else round(qbits, 3),
            "merged_in_memory": m.get("merged_in_memory") or "no",
            "peak_memory_mb": round(m["peak_memory_mb"], 1),
            "model_memory_mb": round(m["model_memory_mb"], 1),
            "latency_p50_ms": rounded(lat["p50_ms"], 2), "latency_p95_ms": rounded(lat["p95_ms"], 2),
            "throughput": round(len(m["rows"]) / max(m["batch_seconds"], 1e-9), 2)}


def rounded(value: float | None, digits: int) -> float | None:
    """``round`` that passes None through."""
    return None if value is None else round(value, digits)
