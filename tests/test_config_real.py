"""The config system on the real sections (DataConfig, TrainConfig, the registered methods)."""
from __future__ import annotations

import pytest
import yaml

from lorakit.adapters import METHODS
from lorakit.config import RECIPES_DIR, apply_overrides, build_config, config_to_yaml, load_config, save_config
from lorakit.config import ModelConfig
from lorakit.data import DataConfig
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resolved_config_round_trips_through_yaml(recipe, method, tmp_path):
    overrides = [("method.name", method)] if method != load_config(recipe).method.name else []
    raw = yaml.safe_load((RECIPES_DIR / f"{recipe}.yaml").read_text())
    if overrides:  # switching method: keep only the method's name
        raw["method"] = {"name": method}
    cfg = build_config({**raw, "name": recipe})
    saved = save_config(cfg, tmp_path / "config.yaml")
    again = load_config(saved)
    assert again == cfg
    assert config_to_yaml(again) == saved.read_text()


def test_real_schema_unknown_keys_and_values():
    with pytest.raises(ConfigError, match=r"^unknown key 'data.max_lenght'; did you mean 'data.max_length'\?$"):
        load_config("quickstart", [("data.max_lenght", "3")])
    with pytest.raises(ConfigError, match=r"^unknown key 'train.warmup'; did you mean 'train.warmup_steps'\?$"):
        load_config("quickstart", [("train.warmup", "3")])
    with pytest.raises(ConfigError, match=r"^model.dtype: must be one of fp32, bf16, fp16 \(got 'fp8'\)$"):
        load_config("quickstart", [("model.dtype", "fp8")])
    with pytest.raises(ConfigError, match=r"^train.schedule: must be one of"):
        load_config("quickstart", [("train.schedule", "cosin")])


def test_trust_remote_code_is_off_unless_the_user_turns_it_on():
    assert load_config("quickstart").model.trust_remote_code is False
    assert load_config("bloomz-awesome-prompts").model.trust_remote_code is False
    assert load_config("quickstart", [("model.trust_remote_code", "true")]).model.trust_remote_code is True


@pytest.mark.parametrize("cls, section, key, value, message", [
    (TrainConfig, "train", "lr", "0", "train.lr: must be > 0 (got 0.0)"),
    (TrainConfig, "train", "lr", "fast", "train.lr: expected float (got 'fast')"),
    (TrainConfig, "train", "grad_accum", "0", "train.grad_accum: must be >= 1 (got 0)"),
    (TrainConfig, "train", "warmup_ratio", "1", "train.warmup_ratio: must be in [0, 1) (got 1.0)"),
    (TrainConfig, "train", "betas", "[0.9, 1.0]", "train.betas: must be in [0, 1) (got (0.9, 1.0))"),
    (TrainConfig, "train", "betas", "[0.9]", "train.betas: expected tuple[float, float] (got [0.9])"),
    (TrainConfig, "train", "schedule", "cosin", "train.schedule: must be one of constant, linear, cosine (got 'cosin')"),
    (TrainConfig, "train", "distributed", "zero3", "train.distributed: must be one of auto, ddp, fsdp (got 'zero3')"),
    (DataConfig, "data", "max_length", "1", "data.max_length: must be >= 2 (got 1)"),
    (DataConfig, "data", "limit", "0", "data.limit: must be >= 1 (got 0)"),
    (DataConfig, "data", "truncation", "left", "data.truncation: must be one of prompt, end, drop (got 'left')"),
    (DataConfig, "data", "prompt_template", "Question", "data.prompt_template: must contain '{prompt}' (got 'Question')"),
    (ModelConfig, "model", "name_or_path", "", "model.name_or_path: must not be empty (got '')"),
])
def test_real_sections_fail_the_same_from_python_yaml_and_cli(cls, section, key, value, message, tmp_path):
    with pytest.raises(ConfigError) as from_python:
        cls(**{key: value})
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({section: {key: yaml.safe_load(value) if value else value}}))
    with pytest.raises(ConfigError) as from_yaml:
        load_config(recipe)
    with pytest.raises(ConfigError) as from_cli:
        load_config("quickstart", [(f"{section}.{key}", value)])
    assert str(from_python.value) == str(from_yaml.value) == str(from_cli.value) == message


def test_real_sections_coerce_python_values_like_yaml():
    cfg = TrainConfig(lr="3e-4", epochs="2", betas=[0.8, 0.95], compile="yes")
    assert (cfg.lr, cfg.epochs, cfg.betas, cfg.compile) == (3e-4, 2, (0.8, 0.95), True)
    overrides = [("train.lr", "3e-4"), ("train.epochs", "2"), ("train.betas", "[0.8, 0.95]"), ("train.compile", "yes")]
    assert cfg == build_config(apply_overrides({}, overrides)).train
    assert DataConfig(max_length="64", columns={"prompt": "act"}).max_length == 64
    rows = [{"prompt": "a", "completion": "b"}]
    assert DataConfig(source=rows).source is rows  # rows in memory are taken as they are, not copied
    with pytest.raises(ConfigError, match=r"^data.val_fraction: cannot be combined with data.val_source"):
        DataConfig(val_fraction=0.1, val_split="test")
