"""Load a base causal LM (4-bit NF4 + double quant, 8-bit, or full precision), attach LoRA, and
load run / merged directories for inference.

Compute dtype follows the device: fp32 on CPU (bf16 compute was ~12x slower on this kind of CPU),
bf16 on GPUs that support it, fp16 otherwise. Never hard-coded.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medtune.config import LoraConfig, ModelConfig
from medtune.errors import MedtuneError, describe, first_line
from medtune.fsutil import read_json
from medtune.tasks import Template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# bitsandbytes tries to fetch optional CPU kernels from the hub; there is no hub here.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*kernels.*")
# peft reads transformers' deprecated `is_gradient_checkpointing` on every adapter load
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                        category=FutureWarning)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def resolve_device(name: str = "auto") -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise MedtuneError(f"model.device: unknown '{name}' (auto, cpu, cuda, cuda:N)")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedtuneError(f"model.device={name} but no CUDA device is available")
    return name


def compute_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """fp32 on CPU, bf16 on GPUs with bf16 support, fp16 on older GPUs; or what was requested."""
    if requested != "auto":
        if requested not in DTYPES:
            raise MedtuneError(f"model.compute_dtype: unknown dtype '{requested}' "
                               f"(choose from auto, {', '.join(sorted(set(DTYPES)))})")
        return DTYPES[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_base(base: str) -> str:
    """'embedded' must be resolved by the caller (it needs training notes); paths are checked."""
    if base == "embedded":
        raise MedtuneError("base 'embedded' must be built first (medtune base build)")
    p = Path(base).expanduser()
    if p.exists() and not (p / "config.json").is_file():
        raise MedtuneError(f"{p}: not a Hugging Face model directory (no config.json)")
    return _local_or_hub(base, "base model directory")


def model_dir(path: str | Path, what: str = "model directory") -> Path:
    """``path`` as an existing directory, else one error naming what is wrong with it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise MedtuneError(f"{path}: {what} not found")
    if not p.is_dir():
        raise MedtuneError(f"{path}: is a file, not a {what}")
    return p


def _local_or_hub(name: str | Path, what: str) -> str:
    """An existing local path, or something shaped like a hub id ('org/name'); anything else is
    a missing local path (and gets that message, not the hub's repo-id rules)."""
    p = Path(name).expanduser()
    if p.exists():
        return str(p)
    text = str(name)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return text  # hub id; loading works only where a hub (or its cache) is reachable
    raise MedtuneError(f"{name}: {what} not found")


def load_tokenizer(path: str | Path):
    """Load a tokenizer and make sure it has a pad token distinct from EOS.

    pad == eos teaches a model never to stop (EOS is masked as padding), so a missing or shared pad
    gets its own new token.
    """
    from transformers import AutoTokenizer

    source = _local_or_hub(path, "model or tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:  # no or broken tokenizer files: one line, not a traceback
        why = " ".join(str(exc).split()) or type(exc).__name__
        raise MedtuneError(f"{path}: cannot load its tokenizer ({why[:160]})") from None
    if tok.eos_token_id is None:
        raise MedtuneError(f"{path}: tokenizer has no EOS token")
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<|medtune_pad|>"})
    tok.padding_side = "right"
    # medtune cuts over-long prompts itself (truncate_prompt); transformers' "longer than the
    # specified maximum ... will result in indexing errors" warning does not apply to it
    tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tok


def quantization_config(quantization: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        # bnb_4bit_quant_storage = compute dtype lets FSDP shard 4-bit weights with the others.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                  bnb_4bit_quant_storage=dtype)
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "none":
        return None
    raise MedtuneError(f"model.quantization: unknown value '{quantization}' (nf4, 8bit, none)")


def load_base_model(base: str, cfg: ModelConfig, tokenizer: Any | None = None,
                    quantization: str | None = None):
    """Load ``base`` on the configured device with the configured quantization."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(cfg.device)
    dtype = compute_dtype(device, cfg.compute_dtype)
    quant = quantization if quantization is not None else cfg.quantization
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": cfg.attn_implementation}
    qc = quantization_config(quant, dtype)
    if qc is not None:
        kwargs["quantization_config"] = qc
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if device == "cuda" else "cpu"
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_base(base), **kwargs)
    except (OSError, ValueError) as exc:
        raise MedtuneError(f"{base}: could not load model ({first_line(exc)})") from None
    if qc is None:
        model.to(device)
    if tokenizer is not None and len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(math.ceil(len(tokenizer) / 64) * 64)
    if tokenizer is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them.

    Non-reentrant checkpointing: gradients reach the LoRA weights inside a checkpointed layer
    even though the frozen embeddings' output does not require grad (no input hook needed), and
    torch stops warning about the unset ``use_reentrant``. transformers >= 5.24 names the method
    ``activation_checkpointing_enable``; older 5.x releases only have the deprecated name."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach_lora(model, lora: LoraConfig, *, quantized: bool, upcast_frozen: bool = False):
    """Wrap ``model`` with trainable LoRA adapters; the base stays frozen (peft), as loaded.

    The frozen embeddings, norms and LM head keep the compute dtype. peft's
    ``prepare_model_for_kbit_training`` casts them to float32, which doubles the memory of weights
    that never change: Gemma-2B's 0.5 B embedding parameters go from 1 GiB to 2 GiB on a GPU.
    The LoRA weights are float32 either way (peft's adapter autocast). ``upcast_frozen=True``
    still calls it: the original project's way, kept for the benchmarks' baseline sides."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    if quantized and upcast_frozen:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets = lora.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        # PEFT reads a plain string as a regex over full module paths: 'q_proj' would match none
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    peft_cfg = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=targets,
        use_rslora=lora.rslora, use_dora=lora.dora, task_type="CAUSAL_LM", bias="none",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as exc:  # peft's "Target modules {...} not found in the base model"
        if "target" not in str(exc).lower():
            raise
        raise MedtuneError(f"lora.target_modules={lora.target_modules}: "
                           f"{first_line(exc)}") from None


@dataclass
class Loaded:
    """A model ready for prediction, with the tokenizer, template and labels it was trained with."""

    model: Any
    tokenizer: Any
    template: Template
    labels: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path) / "medtune.json"
    return read_json(p) if p.is_file() else {}


def load_labels(path: str | Path) -> list[str]:
    p = Path(path)
    if p.is_dir():
        p = p / "labels.json"
    if not p.is_file():
        raise MedtuneError(f"{p}: labels file not found")
    data = read_json(p)
    labels = data.get("labels") if isinstance(data, dict) else data
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
        raise MedtuneError(f'{p}: expected a non-empty JSON list of label strings, or '
                           f'{{"labels": [...]}}')
    seen: set[str] = set()
    for i, label in enumerate(labels):
        if label in seen:  # two entries would split one label's probability between them
            raise MedtuneError(f"{p}: label {i + 1} '{label[:60]}' is listed twice")
        seen.add(label)
    return list(labels)


def _trained_labels(path: Path, labels: str | Path | None) -> list[str]:
    """A fine-tuned model's labels; ``labels`` replaces them (e.g. a subset to choose from),
    with a warning when it names labels the model was never trained on."""
    trained = load_labels(path)
    if labels is None:
        return trained
    given, known = load_labels(labels), set(trained)
    new = [lab for lab in given if lab not in known]
    if new:
        print(f"warning: {labels}: {len(new)} of its {len(given)} labels were never trained "
              f"(the model knows {len(trained)}); a fine-tuned model rarely chooses them",
              file=sys.stderr)
    return given


def as_trained(meta: dict[str, Any], cfg: ModelConfig | None = None) -> ModelConfig:
    """``cfg`` for rebuilding a run's quantized base as training built it. NF4 codes and scales
    depend on the dtype the weights were loaded in, so a run trained with bf16 compute (a GPU)
    is quantized from bf16 again, on any device; a compute_dtype set explicitly wins."""
    cfg = cfg or ModelConfig()
    quant = meta.get("quantization", "none")
    dtype = cfg.compute_dtype
    if quant != "none" and dtype == "auto" and meta.get("compute_dtype") in DTYPES:
        dtype = str(meta["compute_dtype"])
    return ModelConfig(**{**cfg.__dict__, "quantization": quant, "compute_dtype": dtype})


def _check_task_labels(task: str, labels: list[str], source: Path) -> None:
    """A plain base's labels file must suit ``--task``: multiple choice picks among the letters
    A-D (a protocol labels file there would score protocol names after an 'Answer:' cue)."""
    from medtune.tasks.mcqa import LETTERS

    letters = set(labels) <= set(LETTERS)
    if task == "mcqa" and set(labels) != set(LETTERS):
        odd = next((lab for lab in labels if lab not in LETTERS), None)
        found = f"lists '{odd[:60]}' (a protocol labels file? use --task protocol)" if odd \
            else f"lists only {', '.join(labels)} (the others could never be answered)"
        raise MedtuneError(f"{source}: --task mcqa answers with the letters "
                           f"{', '.join(LETTERS)}, but this labels file {found}")
    if task == "protocol" and letters:
        print(f"warning: {source}: the labels are option letters ({', '.join(labels)}): for "
              "multiple-choice questions pass --task mcqa", file=sys.stderr)


def check_weights(folder: Path) -> None:
    """Every ``*.safetensors`` file of ``folder`` opens (header and size agree): a truncated or
    damaged file is one error naming it, before a slow load or a registration."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                handle.keys()
        except Exception as exc:  # SafetensorError and OSError: both mean unreadable
            raise MedtuneError(f"{file}: damaged weights file ({describe(exc)})") from None


def check_model_path(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(directory, medtune.json) of a model to load, after the checks that need no loading: a
    missing path, an unfinished run, a run without a readable adapter, a directory that is no
    model at all. For serve and register too, which would otherwise fail later."""
    path = model_dir(path)
    meta = read_meta(path)
    kind = meta.get("kind")
    if kind is None and (path / "labels.json").is_file() and (path / "template.json").is_file() \
            and not (path / "config.json").is_file():  # what train writes before its first step
        raise MedtuneError(f"{path}: a run whose training has not finished (no medtune.json); "
                           "continue it with `medtune train ... --resume` or train it again")
    if kind == "run":
        folder, config = path / "adapter", path / "adapter" / "adapter_config.json"
        if not config.is_file():
            raise MedtuneError(f"{path}: run has no adapter/adapter_config.json (a damaged or "
                               "unfinished run)")
        read_json(config)  # not JSON: one line naming it
    elif not (path / "config.json").is_file():
        raise MedtuneError(f"{path}: not a model directory (expected a medtune run, a merged "
                           "model or a Hugging Face model directory with config.json)")
    else:
        folder = path
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise MedtuneError(f"{folder}: no weights file (*.safetensors) in it: a damaged model")
    check_weights(folder)
    return path, meta


def load_adapter(base, adapter: Path):
    """``base`` with the LoRA adapter saved in ``adapter``; one error line if it cannot be."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter))
    except (ValueError, RuntimeError, KeyError, OSError) as exc:  # shapes, keys, config
        raise MedtuneError(f"{adapter}: cannot load the adapter ({describe(exc)})") from None


def load_for_inference(path: str | Path, cfg: ModelConfig | None = None, *,
                       labels: str | Path | None = None, task: str = "protocol",
                       quantization: str | None = None) -> Loaded:
    """Load a run directory (base + adapter), a merged model, or a plain base (+ ``labels``)."""
    from medtune.tasks import default_template

    cfg = cfg or ModelConfig()
    path, meta = check_model_path(path)
    kind = meta.get("kind")
    if kind == "run":
        tokenizer = load_tokenizer(path / "tokenizer")
        # the configured compute dtype, for speed: on a CPU, fp32 (bf16 there is ~12x slower),
        # though a bf16-trained run's NF4 codes come from bf16 weights. `medtune merge`
        # rebuilds them exactly (as_trained).
        run_cfg = ModelConfig(**{**cfg.__dict__, "quantization": quantization or meta["quantization"]})
        base = load_base_model(meta["base"], run_cfg, tokenizer)
        model = load_adapter(base, path / "adapter")
        template = Template.load(path)
        label_list = _trained_labels(path, labels)
    elif kind == "merged":
        tokenizer = load_tokenizer(path)
        model = load_base_model(str(path), cfg, tokenizer, quantization=quantization or "none")
        template = Template.load(path)
        label_list = _trained_labels(path, labels)
    else:
        own = path / "labels.json"
        if labels is None and not own.is_file():
            if task != "mcqa":
                raise MedtuneError(f"{path}: plain base model: pass --labels labels.json for "
                                   "zero-shot")
            from medtune.tasks.mcqa import LETTERS

            label_list = list(LETTERS)  # multiple choice: always the four letters
        else:  # checked before the (slow) model load
            label_list = load_labels(labels or path)
            _check_task_labels(task, label_list, Path(labels) if labels else own)
        tokenizer = load_tokenizer(path)
        model = load_base_model(str(path), cfg, tokenizer, quantization=quantization or "none")
        template = default_template(task, tokenizer, label_list)
        if task == "protocol":
            template.labels_in_prompt = True  # zero-shot: the model must see the choices
    model.eval()
    return Loaded(model=model, tokenizer=tokenizer, template=template, labels=label_list,
                  meta=meta, path=str(path))


def model_device(model) -> torch.device:
    return next(model.parameters()).device
