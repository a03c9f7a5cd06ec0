"""Configuration: one dataclass per concern, YAML files, dotted overrides (``train.lr=1e-4``).

Every field carries a help string (``medtune config show --fields`` lists them). Unknown keys
are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtune.errors import ConfigError


def _f(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, choices: tuple[str, ...] = ()) -> Any:
    """A config field with help text and, for numbers, the bounds a value must respect; for
    a string with a fixed set of values, those ``choices``."""
    meta = {"help": help, "choices": choices,
            "bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
                       if v is not None}}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


_BOUND_TEXT = {"ge": (">=", float.__ge__), "gt": (">", float.__gt__), "le": ("<=", float.__le__),
               "lt": ("<", float.__lt__)}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _check_bounds(key: str, value: Any, bounds: dict[str, float]) -> None:
    """One line naming the key when a number is out of its field's bounds."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if not all(_BOUND_TEXT[k][1](float(value), float(limit)) for k, limit in bounds.items()):
        rule = " and ".join(f"{_BOUND_TEXT[k][0]} {_number(bounds[k])}" for k in bounds)
        raise ConfigError(f"{key}: must be {rule}, got {value:g}")


@dataclass
class DataConfig:
    task: str = _f("protocol", "Task family: 'protocol' (text -> label) or 'mcqa' (multiple choice).",
                   choices=("protocol", "mcqa"))
    text_column: str | None = _f(None, "Text column; detected among common names when unset.")
    label_column: str | None = _f(None, "Label column; detected among common names when unset.")
    min_count: int = _f(50, "Protocol task: drop labels with fewer examples than this before "
                            "splitting (MCQA keeps all four letters).", ge=0)
    val_fraction: float = _f(0.1, "Fraction of rows for the validation split (0: none; "
                              "train then runs without validation).", ge=0, lt=1)
    test_fraction: float = _f(0.1, "Fraction of rows for the test split.", ge=0, lt=1)
    seed: int = _f(0, "Seed for splitting and shuffling.", ge=0, le=2**32 - 1)
    max_field_bytes: int = _f(1_000_000, "Reject any field larger than this many bytes.", ge=1)
    scrub_phi: bool = _f(False, "Replace PHI in notes with typed placeholders before training.")
    cop_base: int = _f(0, "MCQA: how the answer column counts options: 0 (0-3, as MedMCQA) or 1 "
                          "(1-4); letters A-D are read either way.", ge=0, le=1)


@dataclass
class ModelConfig:
    base: str = _f("embedded", "Base model: 'embedded', a local HF directory, or a hub id.")
    quantization: str = _f("nf4", "Base weights: 'nf4' (4-bit NF4 + double quant), '8bit' or 'none'.",
                           choices=("nf4", "8bit", "none"))
    compute_dtype: str = _f("auto", "'auto' (fp32 on CPU, bf16 on Ampere+, fp16 on older GPUs), "
                                    "'float32', 'bfloat16' or 'float16'.",
                            choices=("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"))
    device: str = _f("auto", "'auto', 'cpu' or 'cuda'.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward to save memory.")
    template: str = _f("auto", "Prompt template: 'auto' (the base's chat template if it has one), 'chat' or 'plain'.",
                       choices=("auto", "chat", "plain"))
    attn_implementation: str = _f("sdpa", "Attention kernel passed to transformers ('sdpa', 'eager').")


@dataclass
class LoraConfig:
    enabled: bool = _f(True, "Train LoRA adapters; false means full fine-tuning (needs quantization=none).")
    r: int = _f(64, "LoRA rank (original radiology project: 64).", ge=1)
    alpha: int = _f(16, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with rslora).", gt=0)
    dropout: float = _f(0.1, "Dropout on the LoRA input.", ge=0, lt=1)
    target_modules: str | list[str] = _f(  # noqa: RUF009
        "all-linear", "Modules to adapt: 'all-linear' or a list of names.")
    rslora: bool = _f(False, "Rank-stabilized LoRA scaling (alpha/sqrt(r)).")
    dora: bool = _f(False, "Weight-decomposed LoRA (DoRA).")
    plus_ratio: float = _f(0.0, "LoRA+: learning rate of the B matrices = train.lr x this (0 = off; 16 is typical).",
                           ge=0)


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "Passes over the training data (fractions allowed).", gt=0)
    max_steps: int = _f(0, "Stop after this many optimizer steps (0: use epochs).", ge=0)
    batch_size: int = _f(16, "Examples per optimizer step, over all processes (each takes its share).", ge=1)
    micro_batch_size: int = _f(0, "Examples per forward pass; 0 = batch_size. Halved on OOM.", ge=0)
    lr: float = _f(2e-4, "Peak learning rate.", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay.", ge=0)
    scheduler: str = _f("cosine", "'cosine', 'linear' or 'constant' after warmup.",
                        choices=("cosine", "linear", "constant"))
    warmup_steps: int = _f(10, "Linear warmup steps.", ge=0)
    max_grad_norm: float = _f(1.0, "Gradient clipping norm (0 disables).", ge=0)
    max_length: int = _f(256, "Truncate prompts so prompt + answer fit in this many tokens.", ge=16)
    group_by_length: bool = _f(True, "Batch examples of similar length to cut padding.")
    optimizer: str = _f("auto", "'auto' (paged 8-bit AdamW on CUDA, AdamW on CPU), 'adamw', "
                                "'adamw8bit' or 'paged_adamw8bit'.",
                        choices=("auto", "adamw", "adamw8bit", "paged_adamw8bit"))
    eval_every: int = _f(50, "Validate every N steps (0: only at the end).", ge=0)
    eval_samples: int = _f(200, "Validation examples used for loss and label accuracy (0: no validation).", ge=0)
    save_every: int = _f(50, "Write a checkpoint every N steps (0: only at the end).", ge=0)
    keep_checkpoints: int = _f(2, "Keep the newest K complete checkpoints.", ge=1)
    log_every: int = _f(5, "Append to metrics.jsonl every N steps.", ge=1)
    seed: int = _f(0, "Seed for initialisation, dropout and data order.", ge=0, le=2**32 - 1)
    fsdp: bool = _f(False, "Shard weights, LoRA and optimizer state over processes (FSDP2, one unit per "
                           "decoder layer); needs torchrun / accelerate launch. See docs/DISTRIBUTED.md.")


@dataclass
class PredictConfig:
    mode: str = _f("constrained", "'constrained' (score each label) or 'generate' (free text).",
                   choices=("constrained", "generate"))
    batch_size: int = _f(0, "Notes per batch; 0 = automatic.", ge=0)
    top_k: int = _f(3, "Alternatives reported per row.", ge=0)
    min_confidence: float = _f(0.0, "Abstain (flag for human review) below this label probability.", ge=0, le=1)
    max_new_tokens: int = _f(16, "Generation mode: new tokens per note.", ge=1)
    temperature: float = _f(0.0, "Generation mode: 0 = greedy.", ge=0)
    top_p: float = _f(1.0, "Generation mode: nucleus sampling threshold.", gt=0, le=1)
    chunk_rows: int = _f(2048, "Rows read and written per chunk (bounded memory on big inputs).", ge=1)
    merge: str = _f("auto", "Merge a run's LoRA adapter (and dequantize its 4-/8-bit base) in memory "
                           "before predicting: same outputs up to float rounding, faster on CPU. "
                           "'auto' = on CPU when the merged weights fit in a quarter of free memory; "
                           "'yes'; 'no' = keep base + adapter as trained.",
                    choices=("auto", "yes", "no"))
    merge_dtype: str = _f("auto", "Weights of the layers merged in memory (and, for a model "
                                 "without adapter such as a merged directory, of its linear layers "
                                 "unless merge='no'). 'auto' = bfloat16 for constrained scoring of "
                                 "a float32 model on a CPU with native bf16 matmul (AVX512-BF16 or "
                                 "AMX), else the model's dtype; activations between layers keep "
                                 "the model's dtype. 'float32' or 'bfloat16' to force one.",
                          choices=("auto", "float32", "bfloat16"))


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _closest(name: str, options: list[str]) -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_null and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        if isinstance(value, str) and "," in value:  # 'q_proj,v_proj': a list where one is allowed
            candidates.sort(key=lambda a: typing.get_origin(a) is not list)
        errors = []
        for arg in candidates:
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0] if args else str, key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # the override "=1" arrives as a number
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = float(value)
            if tp is int:
                if number != int(number):
                    raise ValueError
                return int(number)
            return number
        except (TypeError, ValueError, OverflowError):  # OverflowError: inf or 1e400 for an int
            raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}") from None
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if isinstance(value, bool):  # YAML reads yes/no/on/off/true/false as booleans
            return "yes" if value else "no"
        return str(value)
    return value


def set_key(cfg: Config, key: str, value: Any, name: str | None = None) -> None:
    """Set dotted ``key`` with the same coercion and checks as a file or override value (for
    CLI options that map to config keys). ``name``: how an error names it ('--min-confidence')."""
    try:
        _apply(cfg, key, value)
    except ConfigError as exc:
        if name is None:
            raise
        raise ConfigError(str(exc).replace(key, name, 1)) from None


def _apply(obj: Any, key: str, value: Any) -> None:
    """Set dotted ``key`` (e.g. 'train.lr') on the nested dataclass ``obj``."""
    parts = key.split(".")
    target = obj
    path: list[str] = []
    for part in parts[:-1]:
        names = [f.name for f in dataclasses.fields(target)]
        if part not in names or not dataclasses.is_dataclass(getattr(target, part)):
            sections = [n for n in names if dataclasses.is_dataclass(getattr(target, n))]
            raise ConfigError(f"unknown config section '{'.'.join([*path, part])}'"
                              f"{_closest(part, sections)}")
        target = getattr(target, part)
        path.append(part)
    hints = typing.get_type_hints(type(target))
    names = [f.name for f in dataclasses.fields(target)]
    leaf = parts[-1]
    if leaf not in names:
        valid = [".".join([*path, n]) for n in names]
        if not path:  # a bare key: suggest the full dotted key it most likely meant
            valid += [k for k, _, _ in field_help()]
            leaf_of = {k.rsplit(".", 1)[-1]: k for k, _, _ in field_help()}
            if key in leaf_of:
                raise ConfigError(f"unknown config key '{key}' (did you mean '{leaf_of[key]}'?)")
        raise ConfigError(f"unknown config key '{key}'{_closest(key, valid)}")
    if dataclasses.is_dataclass(getattr(target, leaf)):
        if value is None:  # a section whose keys are all commented out
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings")
        for sub, sub_value in value.items():
            _apply(obj, f"{key}.{sub}", sub_value)
        return
    value = _coerce(value, hints[leaf], key)
    spec = next(f for f in dataclasses.fields(target) if f.name == leaf)
    _check_bounds(key, value, spec.metadata.get("bounds", {}))
    choices = spec.metadata.get("choices") or ()
    if choices and value not in choices:
        raise ConfigError(f"{key}: unknown '{value}' (choose from {', '.join(choices)})")
    setattr(target, leaf, value)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse 'train.lr=1e-4' into ('train.lr', 0.0001) using YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then dotted overrides, in that order."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where} invalid YAML ({getattr(exc, 'problem', exc)})") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        for section, values in raw.items():
            try:
                _apply(cfg, str(section), values)
            except ConfigError as exc:
                raise ConfigError(f"{path}: {exc}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        _apply(cfg, key, value)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = Config()
    for section, values in data.items():
        _apply(cfg, section, values)
    return cfg


def field_help(cfg: Config | None = None) -> list[tuple[str, Any, str]]:
    """(dotted key, current value, help) for every field."""
    cfg = cfg or Config()
    rows = []
    for section in dataclasses.fields(cfg):
        sub = getattr(cfg, section.name)
        for f in dataclasses.fields(sub):
            rows.append((f"{section.name}.{f.name}", getattr(sub, f.name), f.metadata.get("help", "")))
    return rows
