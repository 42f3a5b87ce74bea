"""The config system on the real sections (DataConfig, TrainConfig, the registered methods)."""
from __future__ import annotations

import pytest
import yaml

from lorakit.adapters import METHODS
from lorakit.config import RECIPES_DIR, build_config, config_to_yaml, load_config, save_config
from lorakit.errors import ConfigError


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
    with pytest.raises(ConfigError, match=r"^model.dtype: must be one of float32, bfloat16, float16; got 'fp8'$"):
        load_config("quickstart", [("model.dtype", "fp8")])
    with pytest.raises(ConfigError, match=r"^train.schedule: must be one of"):
        load_config("quickstart", [("train.schedule", "cosin")])


def test_trust_remote_code_is_off_unless_the_user_turns_it_on():
    assert load_config("quickstart").model.trust_remote_code is False
    assert load_config("bloomz-awesome-prompts").model.trust_remote_code is False
    assert load_config("quickstart", [("model.trust_remote_code", "true")]).model.trust_remote_code is True
