"""The config machinery on small stand-in dataclasses: coercion, unknown keys, docs, round-trip."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from lorakit.config import ModelConfig, Schema, apply_overrides, build_config, config_to_dict, config_to_yaml
from lorakit.errors import ConfigError
from lorakit.fielddocs import field_docs
from lorakit.schema import coerce, from_dict


@dataclass
class Data:
    """Stand-in for lorakit.data.DataConfig."""

    source: str = "rows.jsonl"
    """Where the rows come from."""
    max_length: int = 512  # tokens per example
    # How rows are read.
    format: Literal["prompt_completion", "text"] = "prompt_completion"
    columns: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    val_fraction: float = field(default=0.0, metadata={"help": "held-out fraction"})


@dataclass
class Train:
    lr: float = 1e-3
    epochs: int = 1
    bf16: bool = False


@dataclass
class Lora:
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


SCHEMA = Schema(sections={"model": ModelConfig, "data": Data, "train": Train}, methods={"lora": Lora, "full": Full})


def build(raw, overrides=()):
    return build_config(apply_overrides(raw, overrides), SCHEMA)


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
    ("abc", float, "train.lr: expected float, got 'abc'"),
    ("2.5", int, "train.lr: expected int, got '2.5'"),
    ("maybe", bool, "train.lr: expected bool, got 'maybe'"),
    (True, int, "train.lr: expected int, got True"),
    ("chat", Literal["prompt_completion", "text"], "train.lr: must be one of prompt_completion, text; got 'chat'"),
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
    ({"train": {"learning_rate": 1}}, [], "unknown key 'train.learning_rate'; valid keys: train.bf16, train.epochs, train.lr"),
    ({"method": {"name": "lora", "rr": 4}}, [], "unknown key 'method.rr' for method 'lora'; did you mean 'method.r'?"),
    ({"method": {"name": "full", "r": 4}}, [], "unknown key 'method.r' for method 'full'; valid keys: method.name"),
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


def test_field_docs_from_docstrings_comments_and_metadata():
    docs = field_docs(Data)
    assert docs["source"] == "Where the rows come from."
    assert docs["max_length"] == "tokens per example"
    assert docs["format"] == "How rows are read."
    assert docs["val_fraction"] == "held-out fraction"
    assert docs["limit"] == ""


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ConfigError, match=r"^data: expected a mapping of Data fields, got 'x'$"):
        from_dict(Data, "x", "data")
