"""Configuration: shipped YAML files, unknown keys, bad YAML, dotted overrides and their types."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medtune.config import Config, config_from_dict, field_help, load_config, parse_override
from medtune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (ROOT / "configs").glob("**/*.yaml") if "accelerate" not in p.parts)  # launcher configs


def test_configs_are_shipped():
    assert len(SHIPPED) >= 1 and ROOT / "configs" / "protocol" / "demo.yaml" in SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(ROOT)) for p in SHIPPED])
def test_every_shipped_config_loads_and_names_its_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("#") and "medtune" in first  # each file starts with its command


def test_unknown_key_names_the_key_and_the_closest_valid_one(tmp_path):
    with pytest.raises(ConfigError, match=r"'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1e-4"])
    with pytest.raises(ConfigError, match=r"section 'trian'.*did you mean 'train'"):
        load_config(None, ["trian.lr=1e-4"])
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 1e-4\n  batchsize: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert str(path) in message and "'train.batchsize'" in message
    assert "did you mean 'train.batch_size'" in message and "\n" not in message


def test_bad_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 1e-4\n  batch_size: [8, 16\nlora:\n  r: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(str(path)) and "invalid YAML" in message
    assert "line 4" in message  # where the parser found the unclosed list
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    path.write_bytes(b"\xff\xfe train: bad")  # a traceback (UnicodeDecodeError) before
    with pytest.raises(ConfigError, match=r"broken\.yaml: not UTF-8 text \(byte 0\)"):
        load_config(path)


def test_dotted_overrides_are_coerced_to_field_types():
    cfg = load_config(None, ["train.lr=1e-4", "lora.target_modules=q_proj,v_proj",
                             "model.device=cpu", "train.max_steps=10", "train.epochs=2",
                             "model.gradient_checkpointing=yes", "data.text_column=none",
                             "lora.dropout=0"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.device == "cpu"
    assert cfg.train.max_steps == 10 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.model.gradient_checkpointing is True
    assert cfg.data.text_column is None
    assert cfg.lora.dropout == 0.0
    assert load_config(None, ["lora.target_modules=all-linear"]).lora.target_modules == "all-linear"
    assert parse_override("model.base=/a/b=c") == ("model.base", "/a/b=c")


@pytest.mark.parametrize("override, field", [("train.max_steps=1.5", "train.max_steps"),
                                             ("train.lr=fast", "train.lr"),
                                             ("train.group_by_length=maybe",
                                              "train.group_by_length"),
                                             ("train.batch_size=true", "train.batch_size"),
                                             ("model.device=[1, 2]", "model.device"),
                                             ("train=3", "train"),
                                             ("train.lr", "train.lr")])
def test_bad_override_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_precedence_defaults_then_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# medtune train -c c.yaml\ntrain:\n  lr: 3.0e-4\n  batch_size: 8\n"
                    "lora:\n  target_modules: [q_proj, k_proj]\n")
    cfg = load_config(path, ["train.batch_size=4"])
    assert cfg.train.lr == pytest.approx(3e-4)  # from the file
    assert cfg.train.batch_size == 4  # override wins
    assert cfg.train.epochs == Config().train.epochs  # default kept
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert config_from_dict(cfg.to_dict()) == cfg


def test_every_field_has_help():
    rows = field_help()
    n_fields = sum(len(dataclasses.fields(getattr(Config(), s.name)))
                   for s in dataclasses.fields(Config))
    assert len(rows) == n_fields
    assert all(key.count(".") == 1 and len(help_text) > 10 for key, _, help_text in rows)


@pytest.mark.parametrize("override, message", [
    ("lora.r=0", "lora.r: must be >= 1, got 0"),
    ("train.lr=-1", "train.lr: must be > 0, got -1"),
    ("train.max_steps=-5", "train.max_steps: must be >= 0, got -5"),
    ("data.val_fraction=1", "data.val_fraction: must be >= 0 and < 1, got 1"),
    ("predict.top_p=0", "predict.top_p: must be > 0 and <= 1, got 0"),
    ("predict.min_confidence=7", "predict.min_confidence: must be >= 0 and <= 1, got 7"),
    ("train.lr=nan", "train.lr: must be a finite number, got nan"),
    ("train.max_length=8", "train.max_length: must be >= 16, got 8"),
    ("data.seed=-1", "data.seed: must be >= 0 and <= 4294967295, got -1"),
    ("train.seed=-1", "train.seed: must be >= 0 and <= 4294967295, got -1"),
    ("train.max_steps=inf", "train.max_steps: expected int, got 'inf'"),  # was an OverflowError
    ("train.warmup_steps=1e400", "train.warmup_steps: expected int, got '1e400'"),
])
def test_out_of_range_values_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == message


def test_bounds_hold_in_files_and_accept_the_edges(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  keep_checkpoints: 0\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.keep_checkpoints: must be >= 1, got 0"):
        load_config(path)
    cfg = load_config(None, ["train.max_steps=0", "lora.dropout=0", "predict.top_p=1",
                             "predict.min_confidence=1", "train.eval_samples=0"])
    assert (cfg.train.max_steps, cfg.lora.dropout, cfg.predict.top_p) == (0, 0.0, 1.0)
    # every default is inside its own bounds
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(Config(), section.name)):
            value = getattr(getattr(Config(), section.name), f.name)
            load_config(None, [f"{section.name}.{f.name}={value}"] if isinstance(value, int | float)
                        and not isinstance(value, bool) else [])


def _choice_fields() -> list[tuple[str, tuple[str, ...]]]:
    cfg = Config()
    return [(f"{sec.name}.{f.name}", f.metadata["choices"])
            for sec in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, sec.name)) if f.metadata.get("choices")]


def test_fixed_choice_fields_refuse_unknown_values_at_load(tmp_path):
    fields = dict(_choice_fields())
    assert {"data.task", "model.quantization", "model.template", "train.optimizer",
            "train.scheduler", "predict.mode", "predict.merge", "predict.merge_dtype"} <= set(fields)
    for key, choices in fields.items():
        section, leaf = key.split(".")
        for value in choices:  # every listed value loads
            assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), leaf) == value
        with pytest.raises(ConfigError, match=rf"^{key}: unknown 'bogus' \(choose from "):
            load_config(None, [f"{key}=bogus"])
    path = tmp_path / "c.yaml"  # the same check on a file's value
    path.write_text("predict:\n  mode: Constrained\n")
    with pytest.raises(ConfigError, match=r"predict\.mode: unknown 'Constrained'"):
        load_config(path, [])


def test_unknown_device_is_one_line_error():
    from medtune.errors import MedtuneError
    from medtune.model import resolve_device

    assert resolve_device("cpu") == "cpu"
    with pytest.raises(MedtuneError, match=r"model.device: unknown 'gpu' \(auto, cpu, cuda"):
        resolve_device("gpu")


def test_an_empty_section_and_a_numeric_boolean_are_accepted(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  # max_steps: 3   (every key commented out)\nmodel:\n  device: cpu\n")
    cfg = load_config(path, ["model.gradient_checkpointing=1"])
    assert cfg.model.device == "cpu" and cfg.model.gradient_checkpointing is True
    assert cfg.train.max_steps == load_config().train.max_steps


def test_a_chat_template_asked_of_a_tokenizer_without_one_is_a_config_error(tiny_tokenizer):
    import copy

    from medtune.tasks import default_template

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match=r"model\.template=chat: the base's tokenizer has no"):
        default_template("protocol", plain, ["CT Head"], "chat")
    assert default_template("protocol", plain, ["CT Head"], "auto").kind == "plain"
