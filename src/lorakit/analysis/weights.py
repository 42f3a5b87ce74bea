"""Base and fine-tuned weights for `lorakit inspect`, from an adapter, a model or a run folder."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from lorakit.adapters import load_adapter, merge
from lorakit.adapters.match import find_targets
from lorakit.config import read_yaml
from lorakit.errors import LorakitError
from lorakit.models import load_model

ADAPTER_CONFIG = "adapter_config.json"


def _run_output(path: Path) -> tuple[Path, str | None]:
    """A run folder's adapter/ or model/ and its config's base model; other paths unchanged."""
    config = path / "config.yaml"
    for child in ("adapter", "model"):
        if config.is_file() and (path / child).is_dir():
            return path / child, read_yaml(config).get("model", {}).get("name_or_path")
    return path, None


def _adapter_base(folder: Path) -> str | None:
    raw = json.loads((folder / ADAPTER_CONFIG).read_text())
    return raw.get("base_model_name_or_path")


def linear_weight_names(model: torch.nn.Module) -> list[str]:
    """'<module>.weight' for every layer 'all-linear' selects (the output head excluded)."""
    return [f"{name}.weight" for name in find_targets(model, "all-linear")]


def load_pair(target: str | Path, base: str | None = None
              ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[str], str]:
    """(base state dict, fine-tuned state dict, linear weight names, base name) for `target`.

    `target` is an adapter folder (merged onto its base), a full model folder, or a run folder
    of `lorakit train` (its adapter/ or model/); `base` overrides the base model they name.
    """
    folder, run_base = _run_output(Path(target))
    is_adapter = (folder / ADAPTER_CONFIG).is_file()
    base_name = base or run_base or (_adapter_base(folder) if is_adapter else None)
    if base_name is None:
        raise LorakitError(f"{target}: no base model is recorded there; pass --base NAME_OR_PATH")
    base_model = load_model(base_name, dtype="fp32")
    names = linear_weight_names(base_model)
    base_state = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
    if is_adapter:
        tuned_model = merge(load_adapter(base_model, folder))
    else:
        tuned_model = load_model(str(folder), dtype="fp32")
    return base_state, tuned_model.state_dict(), names, base_name
