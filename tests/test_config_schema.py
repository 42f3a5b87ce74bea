"""The config machinery on small stand-in dataclasses: coercion, unknown keys, docs, round-trip."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

import pytest

from lorakit.config import ModelConfig, Schema, apply_overrides, build_config, config_to_dict, config_to_yaml
from lorakit.errors import ConfigError
from lorakit.fielddocs import field_default, field_docs
from lorakit.schema import Config, coerce, from_dict, setting


@dataclass
class Data(Config):
    """Stand-in for lorakit.data.DataConfig."""

    section: ClassVar[str] = "data"

    source: str = setting("rows.jsonl", "Where the rows come from.", nonempty=True)
    max_length: int = setting(512, "tokens per example", ge=2)
    format: Literal["prompt_completion", "text"] = setting("prompt_completion", "How rows are read.")
    columns: dict[str, str] = setting(doc="column mapping", factory=dict)
    limit: int | None = setting(None, "first N rows", ge=1)
    val_fraction: float = setting(0.0, "held-out fraction", ge=0, lt=1)


@dataclass
class Train(Config):
    section: ClassVar[str] = "train"

    lr: float = setting(1e-3, "learning rate", gt=0)
    epochs: int = setting(1, "passes", ge=1)
    bf16: bool = setting(False, "bf16 autocast")
    schedule: str = setting("cosine", "lr shape", choices=lambda: ("constant", "cosine"))
    warmup_steps: int = setting(0, "warmup steps", ge=0)
    warmup_ratio: float = setting(0.0, "warmup fraction", ge=0, lt=1)

    def problems(self):
        return [("warmup_ratio", "set warmup_steps or warmup_ratio, not both")] if self.warmup_steps and \
            self.warmup_ratio else []


@dataclass
class Lora:  # a plain dataclass (not a Config): from_dict coerces its fields
    name: ClassVar[str] = "lora"
    r: int = 8
    alpha: float = 16.0
    targets: str | list[str] = "all-linear"

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"rank must be positive, got {self.r}")


@dataclass
class Full:
    name: ClassVar[str] = "full"


@dataclass(frozen=True)
class Prompt(Config):  # a method that declares its fields with `setting`
    name: ClassVar[str] = "prompt"
    section: ClassVar[str] = "method"

    tokens: int = setting(20, "virtual tokens", gt=0)
    init: Literal["random", "text"] = setting("random", "start of the tokens")
    text: str | None = setting(None, "init text", nonempty=True)

    def problems(self):
        return [("text", "init 'text' needs a text")] if self.init == "text" and self.text is None else []


SCHEMA = Schema(sections={"model": ModelConfig, "data": Data, "train": Train},
                methods={"lora": Lora, "full": Full, "prompt": Prompt})


def build(raw, overrides=()):
    return build_config(apply_overrides(raw, overrides, SCHEMA), SCHEMA)


def test_coerce_cli_strings_to_field_types():
    assert coerce("3e-4", float, "train.lr") == pytest.approx(3e-4)
    assert coerce("8", int, "method.r") == 8 and coerce(8.0, int, "k") == 8
    assert coerce("yes", bool, "k") is True and coerce("off", bool, "k") is False
    assert coerce("null", int | None, "k") is None and coerce("7", int | None, "k") == 7
    assert coerce("q_proj,v_proj", list[str], "k") == ["q_proj", "v_proj"]
    assert coerce("[q_proj, v_proj]", str | list[str], "k") == ["q_proj", "v_proj"]
    assert coerce("all-linear", str | list[str], "k") == "all-linear"
    assert coerce("{act: prompt}", dict[str, str], "k") == {"act": "prompt"}
    assert coerce("text", Literal["prompt_completion", "text"], "k") == "text"


@pytest.mark.parametrize("value, tp, message", [
    ("abc", float, "train.lr: expected float (got 'abc')"),
    ("2.5", int, "train.lr: expected int (got '2.5')"),
    ("maybe", bool, "train.lr: expected bool (got 'maybe')"),
    (True, int, "train.lr: expected int (got True)"),
    (None, int, "train.lr: expected int (got None)"),
    ([0.9], tuple[float, float], "train.lr: expected tuple[float, float] (got [0.9])"),
    ("chat", Literal["prompt_completion", "text"], "train.lr: must be one of prompt_completion, text (got 'chat')"),
])
def test_coerce_rejects_with_key_and_value(value, tp, message):
    with pytest.raises(ConfigError) as info:
        coerce(value, tp, "train.lr")
    assert str(info.value) == message


def test_overrides_build_typed_config():
    cfg = build({"data": {"source": "a.jsonl"}, "method": "lora"},
                [("train.lr", "3e-4"), ("method.r", "4"), ("data.columns", "{act: prompt}"), ("name", "x")])
    assert cfg.train == Train(lr=3e-4)
    assert cfg.method == Lora(r=4)
    assert cfg.data.columns == {"act": "prompt"} and cfg.data.source == "a.jsonl"
    assert cfg.name == "x" and str(cfg.run_dir) == "runs/x"


def test_method_is_picked_by_name_and_defaults_to_lora():
    assert build({}).method == Lora()
    assert build({"method": {"name": "full"}}).method == Full()
    assert build({"method": "lora"}, [("method", "full")]).method == Full()


@pytest.mark.parametrize("raw, overrides, message", [
    ({}, [("data.max_lenght", "3")], "unknown key 'data.max_lenght'; did you mean 'data.max_length'?"),
    ({}, [("trian.lr", "3")], "unknown key 'trian.lr'; did you mean 'train.lr'?"),
    ({"train": {"epoch": 1}}, [], "unknown key 'train.epoch'; did you mean 'train.epochs'?"),
    ({"train": {"learning_rate": 1}}, [], "unknown key 'train.learning_rate'; valid keys: train.bf16, train.epochs, "
                                          "train.lr, train.schedule, train.warmup_ratio, train.warmup_steps"),
    ({"method": {"name": "lora", "rr": 4}}, [], "unknown key 'method.rr' for method 'lora'; did you mean 'method.r'?"),
    ({"method": {"name": "full", "r": 4}}, [], "unknown key 'method.r' for method 'full'; valid keys: method.name"),
    ({"method": {"name": "prompt", "token": 4}}, [],
     "unknown key 'method.token' for method 'prompt'; did you mean 'method.tokens'?"),
    ({"method": "lorra"}, [], "method.name: unknown method 'lorra'; did you mean 'lora'?"),
    ({"outptu_dir": "x"}, [], "unknown key 'outptu_dir'; did you mean 'output_dir'?"),
    ({"data": {"colums": {"prompt": "act"}}}, [], "unknown key 'data.colums'; did you mean 'data.columns'?"),
])
def test_unknown_keys_name_the_closest_valid_key(raw, overrides, message):
    with pytest.raises(ConfigError) as info:
        build(raw, overrides)
    assert str(info.value) == message


def test_class_validation_becomes_config_error():
    with pytest.raises(ConfigError, match=r"^method: rank must be positive, got 0$"):
        build({"method": {"r": 0}})
    with pytest.raises(ConfigError, match=r"cannot set 'train.lr.x': 'train.lr' is not a section"):
        build({"train": {"lr": 1}}, [("train.lr.x", "1")])


def test_yaml_round_trip_is_lossless():
    import yaml

    cfg = build({"data": {"columns": {"act": "prompt"}, "limit": 50}, "method": {"targets": ["q", "v"]}},
                [("train.bf16", "true"), ("name", "r1")])
    text = config_to_yaml(cfg)
    assert list(yaml.safe_load(text)) == ["name", "output_dir", "model", "method", "data", "train"]
    assert yaml.safe_load(text)["method"] == {"name": "lora", "r": 8, "alpha": 16.0, "targets": ["q", "v"]}
    assert build(yaml.safe_load(text)) == cfg
    assert config_to_dict(build(yaml.safe_load(text))) == config_to_dict(cfg)


def test_field_docs_and_defaults_come_from_the_setting():
    docs = field_docs(Data)
    assert docs["source"] == "Where the rows come from."
    assert docs["max_length"] == "tokens per example"
    assert docs["format"] == "How rows are read."
    assert list(docs) == [f.name for f in dataclasses.fields(Data)]
    defaults = {f.name: field_default(f) for f in dataclasses.fields(Data)}
    assert defaults["max_length"] == 512 and defaults["columns"] == {} and defaults["limit"] is None
    assert Data().columns is not Data().columns  # factory: a fresh dict each time
    with pytest.raises(TypeError, match="factory=list"):
        setting([], "a mutable default")


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match=r"^data: expected a mapping of Data fields \(got 'x'\)$"):
        from_dict(Data, "x", "data")


# ----------------------------------------------------------------------------- one check, every path


@pytest.mark.parametrize("section, key, value, message", [
    ("train", "lr", "0", "train.lr: must be > 0 (got 0.0)"),
    ("train", "epochs", "0", "train.epochs: must be >= 1 (got 0)"),
    ("data", "val_fraction", "1", "data.val_fraction: must be in [0, 1) (got 1.0)"),
    ("train", "schedule", "cosin", "train.schedule: must be one of constant, cosine (got 'cosin')"),
    ("data", "source", "", "data.source: must not be empty (got '')"),
    ("data", "format", "chat", "data.format: must be one of prompt_completion, text (got 'chat')"),
    ("data", "limit", "abc", "data.limit: expected int (got 'abc')"),
])
def test_python_built_config_fails_exactly_as_the_yaml_and_cli_path(section, key, value, message):
    cls = {"train": Train, "data": Data}[section]
    with pytest.raises(ConfigError) as from_python:
        cls(**{key: value})
    with pytest.raises(ConfigError) as from_yaml:
        build({section: {key: value}})
    with pytest.raises(ConfigError) as from_cli:
        build({}, [(f"{section}.{key}", value)])
    assert str(from_python.value) == str(from_yaml.value) == str(from_cli.value) == message


def test_python_values_are_coerced_like_yaml_values():
    cfg = Train(lr="3e-4", epochs="2", bf16="yes")
    assert (cfg.lr, cfg.epochs, cfg.bf16) == (pytest.approx(3e-4), 2, True)
    assert isinstance(cfg.lr, float) and cfg == build({}, [("train.lr", "3e-4"), ("train.epochs", "2"),
                                                           ("train.bf16", "yes")]).train
    assert Data(max_length=8.0).max_length == 8 and Data(limit="null").limit is None
    rows = {"prompt": "completion"}
    assert Data(columns=rows).columns is rows  # already typed: kept, not copied


def test_cross_field_problems_and_frozen_configs():
    with pytest.raises(ConfigError, match=r"^train.warmup_ratio: set warmup_steps or warmup_ratio, not both "
                                          r"\(got 0.1\)$"):
        Train(warmup_steps=3, warmup_ratio=0.1)
    assert Prompt(tokens="8").tokens == 8  # frozen: coerced all the same
    with pytest.raises(ConfigError, match=r"^method.tokens: must be > 0 \(got 0\)$"):
        build({"method": {"name": "prompt", "tokens": 0}})
    with pytest.raises(ConfigError, match=r"^method.text: init 'text' needs a text \(got None\)$"):
        Prompt(init="text")


def test_method_keys_are_checked_once(monkeypatch):
    import lorakit.config

    checked = []
    real = lorakit.config.unknown_keys
    monkeypatch.setattr(lorakit.config, "unknown_keys", lambda cls, raw, prefix, *a: checked.append(prefix) or
                        real(cls, raw, prefix, *a))
    assert build({"method": {"name": "prompt", "tokens": "4"}}).method == Prompt(tokens=4)
    assert checked.count("method") == 1
    with pytest.raises(ConfigError, match=r"^unknown key 'method.r' for method 'prompt'; valid keys: method.init, "
                                          r"method.name, method.text, method.tokens$"):
        build({"method": {"name": "prompt", "r": 4}})
    assert checked.count("method") == 2
