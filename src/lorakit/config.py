"""The run configuration: typed dataclasses, YAML round-trip, dotted overrides.

A run config has four sections and two top-level keys:

```yaml
name: my-run              # run folder name (default: the config file's stem)
output_dir: runs          # runs land in output_dir/name
model:  {name_or_path: embedded, dtype: null, device: null, trust_remote_code: false}
method: {name: lora, r: 16, alpha: 32, targets: all-linear}   # `name` picks the method
data:   {...}             # lorakit.data.DataConfig
train:  {...}             # lorakit.train.TrainConfig
```

The `method` section is one mapping whose `name` selects a config class from
`lorakit.adapters.METHODS`; the other keys are that class's fields. `method: lora` is short for
`method: {name: lora}`. Every field can be overridden with a dotted key (`train.lr=3e-4`,
`method.r=8`). The names other tools use for the same settings (`learning_rate`, `lora_r`,
`max_seq_length`, ...; `ALIASES`) are accepted top-level or in their section, with a one-line note
naming lorakit's key. Every unknown key is reported in one `ConfigError`, each with the closest
valid key or alias. The resolved config is written to the run folder as `config.yaml` (atomically)
and loads back unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

import yaml

from lorakit import dtypes
from lorakit.adapters.config import METHODS
from lorakit.data.config import DataConfig
from lorakit.errors import ConfigError
from lorakit.permissions import share
from lorakit.schema import (Config, UnknownKey, closest, from_dict, leaf_keys, problem, setting, to_plain,
                            type_hints, unknown_keys, unknown_keys_error)
from lorakit.train.config import RESUMABLE_CHANGES, TrainConfig

RECIPES_DIR = Path(__file__).parent / "configs"  # recipes shipped with the package


@dataclass
class ModelConfig(Config):
    """Which base model to load, and how."""

    section: ClassVar[str] = "model"

    name_or_path: str = setting(
        "embedded", "Base model: a Hugging Face hub id, a local folder, or 'embedded' (the small model inside "
                    "lorakit).", nonempty=True)
    revision: str | None = setting(
        None, "Hub revision of the base model (a branch, tag or commit hash); null: the default branch. "
              "Recorded with the adapter, so inference loads the same weights.")
    dtype: str | None = setting(
        None, f"Dtype of the base weights: {dtypes.accepted()}; null keeps the checkpoint's own dtype.",
        choices=dtypes.CANONICAL)
    device: str | None = setting(
        None, "Device to train on (cpu, cuda, cuda:1, ...); null picks cuda when available, else cpu.")
    trust_remote_code: bool = setting(
        False, "Run modelling code shipped with a hub model. Off unless you turn it on: it executes that code.")
    init_adapter: str | None = setting(
        None, "An adapter folder (an earlier run's adapter/, PEFT or lorakit format) whose weights the run's adapter "
              "starts from instead of its fresh init, e.g. the SFT adapter a DPO run trains further; the method "
              "section must describe that adapter (the run says what differs). A dpo or ipo run's reference is then "
              "the base plus this adapter (train.reference auto: copy). null: a fresh adapter.")

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", dtypes.spelled(self.dtype))  # an alias (bfloat16, half, ...) -> bf16, fp16
        super().__post_init__()


@dataclass
class RunConfig(Config):
    """Everything one training run needs; see the module docstring for the YAML shape."""

    section: ClassVar[str] = ""  # name and output_dir are top-level keys

    model: ModelConfig = setting(doc="Which base model to load, and how (the model section).")
    method: Any = setting(doc="The adaptation method: an instance of one of lorakit.adapters.METHODS.")
    data: Any = setting(doc="The data section: a lorakit.data.DataConfig.")
    train: Any = setting(doc="The train section: a lorakit.train.TrainConfig.")
    name: str | None = setting(
        None, "Run folder name; null: the config file's stem (quickstart with no config), plus -2, -3, ... "
              "if taken.")
    output_dir: str = setting("runs", "Parent folder of run folders; the run writes to output_dir/name.")

    @property
    def run_dir(self) -> Path:
        """The folder this run writes to."""
        return Path(self.output_dir) / (self.name or "run")


TOP_LEVEL = ("name", "output_dir")  # scalar keys beside the sections
SECTION_ORDER = ("name", "output_dir", "model", "method", "data", "train")
# keys that may differ between a run and its resumption: where the run folder is, the device, and the train
# fields that change its length, checkpoints or display, never its shared steps (train.config.RESUMABLE_CHANGES)
RESUME_FREE_KEYS = frozenset({"name", "output_dir", "model.device", *(f"train.{key}" for key in RESUMABLE_CHANGES)})

# The names transformers (TrainingArguments), peft (LoraConfig), TRL (SFTConfig, ModelConfig, DPOConfig, CPOConfig),
# LLaMA-Factory, axolotl and torchtune give lorakit's settings -> lorakit's key. Accepted top-level (flat configs) or in the key's own
# section (train.learning_rate), in YAML and on the command line; each use prints a note naming the key.
ALIASES: dict[str, str] = {
    # train
    "learning_rate": "train.lr", "lr": "train.lr",
    "num_train_epochs": "train.epochs", "num_epochs": "train.epochs", "epochs": "train.epochs",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.micro_batch_size", "micro_batch_size": "train.micro_batch_size",
    "batch_size": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "lr_scheduler_type": "train.schedule", "lr_scheduler": "train.schedule",
    "warmup_steps": "train.warmup_steps", "num_warmup_steps": "train.warmup_steps",
    "warmup_ratio": "train.warmup_ratio",
    "weight_decay": "train.weight_decay", "adam_epsilon": "train.eps", "max_grad_norm": "train.max_grad_norm",
    "gradient_checkpointing": "train.gradient_checkpointing", "torch_compile": "train.compile",
    "seed": "train.seed",
    "save_steps": "train.save_every", "save_total_limit": "train.keep_checkpoints",
    "logging_steps": "train.log_every", "eval_steps": "train.eval_every",
    # method
    "lora_r": "method.r", "lora_rank": "method.r", "rank": "method.r",
    "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    "target_modules": "method.targets", "lora_target_modules": "method.targets",
    "use_rslora": "method.rslora", "num_virtual_tokens": "method.num_virtual_tokens",
    # data
    "max_seq_length": "data.max_length", "max_seq_len": "data.max_length", "sequence_len": "data.max_length",
    "max_length": "data.max_length",
    "packing": "data.packing", "sample_packing": "data.packing",
    "train_on_inputs": "data.train_on_prompt",
    # model
    "model_name_or_path": "model.name_or_path", "base_model": "model.name_or_path",
    "torch_dtype": "model.dtype", "model_revision": "model.revision", "trust_remote_code": "model.trust_remote_code",
    "adapter_name_or_path": "model.init_adapter", "lora_model_dir": "model.init_adapter",
    # preference tuning (TRL's DPOConfig / CPOConfig)
    "loss_type": "train.objective", "beta": "train.beta", "label_smoothing": "train.label_smoothing",
    "simpo_gamma": "train.simpo_gamma",
    # top level
    "run_name": "name",
}


@dataclass(frozen=True)
class Schema:
    """The classes a run config is built from (swappable so tests can use small stand-ins)."""

    sections: Mapping[str, type]  # section name -> dataclass, e.g. "train" -> TrainConfig
    methods: Mapping[str, type]  # method name -> config dataclass, e.g. "lora" -> LoRA
    default_method: str = "lora"
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # other tools' name -> key (ALIASES)

    def keys(self) -> list[str]:
        """Every valid dotted key (method keys for every method)."""
        keys = list(TOP_LEVEL) + ["method.name"]
        for section, cls in self.sections.items():
            keys += [f"{section}.{name}" for name in type_hints(cls)]
        for cls in self.methods.values():
            keys += [f"method.{name}" for name in type_hints(cls) if f"method.{name}" not in keys]
        return keys

    def spellings(self) -> dict[str, str]:
        """Every accepted alias spelling -> the key it stands for: top-level ('learning_rate') and in the
        key's section ('train.learning_rate'; not where that is the key itself, e.g. train.warmup_ratio)."""
        found = {}
        for alias, key in self.aliases.items():
            section, _, field = key.rpartition(".")
            found[alias] = key
            if section and field != alias:
                found[f"{section}.{alias}"] = key
        return found


def default_schema() -> Schema:
    """The real schema: ModelConfig, lorakit.data.DataConfig, lorakit.train.TrainConfig, METHODS, ALIASES."""
    return Schema(sections={"model": ModelConfig, "data": DataConfig, "train": TrainConfig}, methods=dict(METHODS),
                  aliases=ALIASES)


# ----------------------------------------------------------------------------- raw dict stage


def note(text: str) -> None:
    """A one-line note on stderr (an alias read as lorakit's key), from the first process of a run only."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}", file=sys.stderr)


def _alias_note(spelled: str, key: str) -> None:
    note(f"'{spelled}' read as lorakit's '{key}'")


def _resolve_aliases(raw: dict, schema: Schema) -> None:
    """In place: every alias spelling in `raw` moved to the key it stands for, with a note; an alias and
    its key (or two aliases of one key) given different values is an error."""
    for spelled, key in schema.spellings().items():
        section, _, alias = spelled.rpartition(".")
        holder = raw.get(section) if section else raw
        if not isinstance(holder, dict) or alias not in holder:
            continue
        value = holder.pop(alias)
        target_section, _, field = key.rpartition(".")
        target = raw.setdefault(target_section, {}) if target_section else raw
        if not isinstance(target, dict):
            raise ConfigError(f"cannot read '{spelled}' as '{key}': '{target_section}' is not a section")
        if field in target and target[field] != value:
            raise ConfigError(f"'{spelled}' ({value!r}) and '{key}' ({target[field]!r}) are both given; "
                              f"'{spelled}' is lorakit's '{key}': keep one")
        target[field] = value
        _alias_note(spelled, key)


def _normalise(raw: Mapping | None, schema: Schema | None = None) -> dict:
    """Deep copy of a raw config with `method: lora` expanded to `method: {name: lora}` and aliases
    (`learning_rate: 3e-4`) moved to lorakit's keys (`train: {lr: 3e-4}`)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    raw = copy.deepcopy(dict(raw))
    if isinstance(raw.get("method"), str):
        raw["method"] = {"name": raw["method"]}
    _resolve_aliases(raw, schema or default_schema())
    return raw


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set `raw[a][b] = value` for key 'a.b', creating sections as needed."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed key '{key}'")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part == "method" and depth == 0:
            child = {"name": child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set '{key}': '{'.'.join(parts[:depth + 1])}' is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _other_rows(result: dict, given: Mapping[str, Any]) -> None:
    """A shipped recipe on other rows (data.source given, not the recipe's): the recipe's validation set belongs
    to its own data, so data.val_source goes unless given too, with a note. Its format and columns stay (the rows
    may be the same dataset from elsewhere; rows that do not fit them are a clear error)."""
    data = result.get("data")
    if ("data.source" not in given or not isinstance(data, dict) or given["data.source"] == data.get("source")
            or "val_source" not in data or "data.val_source" in given):
        return
    note(f"data.source is not the recipe's, so its validation set data.val_source={data.pop('val_source')!r} is not "
         "used: no validation unless you give one (data.val_source, data.val_split or data.val_fraction)")


def apply_overrides(raw: Mapping | None, overrides: Iterable[tuple[str, Any]], schema: Schema | None = None,
                    recipe: bool = False) -> dict:
    """A copy of `raw` with each (dotted key, value) override set; values are coerced later. An alias
    ('learning_rate', 'train.learning_rate') overrides the key it stands for, with a note. `recipe`: `raw` is a
    shipped recipe, whose validation set is dropped when data.source names other rows (`_other_rows`)."""
    schema = schema or default_schema()
    result, spellings, given = _normalise(raw, schema), schema.spellings(), {}
    overrides = list(overrides)
    if recipe:
        _other_rows(result, {spellings.get(spelled, spelled): value for spelled, value in overrides})
    for spelled, value in overrides:
        key = spellings.get(spelled, spelled)
        if key != spelled:
            _alias_note(spelled, key)
        if key in given and given[key][1] != value:
            raise ConfigError(f"'{key}' is given twice ({given[key][1]!r} as '{given[key][0]}' and {value!r} as "
                              f"'{spelled}')")
        given[key] = (spelled, value)
        if key == "method":  # `method=full` picks the method
            value = {"name": value} if isinstance(value, str) else value
        set_dotted(result, key, value)
    return result


# ----------------------------------------------------------------------------- typed stage


def _build_method(raw: Any, schema: Schema) -> Any:
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise problem("method", "expected a method name or a mapping with 'name'", raw)
    fields = dict(raw)
    name = str(fields.pop("name", schema.default_method))
    if name not in schema.methods:
        guess = closest(name, schema.methods)
        hint = f"did you mean '{guess}'?" if guess else f"known methods: {', '.join(sorted(schema.methods))}"
        raise ConfigError(f"method.name: unknown method '{name}'; {hint}")
    return from_dict(schema.methods[name], fields, "method", context=f"for method '{name}'", also_valid=["name"])


def unknown_config_keys(raw: Mapping, schema: Schema) -> list[UnknownKey]:
    """Every key of a (normalised) raw config that no field matches: top-level, in each section, and in
    the method section for the method it names."""
    known = set(TOP_LEVEL) | set(schema.sections) | {"method"}
    everything = tuple(schema.keys())
    found = [UnknownKey(leaf, everything) for key, value in raw.items() if key not in known
             for leaf in leaf_keys(value, str(key))]  # a misspelt section is matched by its keys: 'trian.lr'
    for name, cls in schema.sections.items():
        if isinstance(raw.get(name), Mapping):
            found += unknown_keys(cls, raw[name], name)
    method = raw.get("method")
    if isinstance(method, Mapping) and str(method.get("name", schema.default_method)) in schema.methods:
        chosen = str(method.get("name", schema.default_method))
        fields = {k: v for k, v in method.items() if k != "name"}
        found += unknown_keys(schema.methods[chosen], fields, "method", f"for method '{chosen}'", ["name"])
    return found


def build_config(raw: Mapping | None, schema: Schema | None = None) -> RunConfig:
    """Validate a raw (YAML + overrides) mapping into a RunConfig; every unknown key is reported in one
    ConfigError, then the first bad value is."""
    schema = schema or default_schema()
    raw = _normalise(raw, schema)
    unknown = unknown_config_keys(raw, schema)
    if unknown:
        raise unknown_keys_error(unknown, schema.keys(), schema.spellings())
    sections = {name: from_dict(cls, raw.get(name), name) for name, cls in schema.sections.items()}
    top = {key: raw[key] for key in TOP_LEVEL if key in raw}
    return RunConfig(method=_build_method(raw.get("method"), schema), **sections, **top)


def method_name(method: Any) -> str:
    """The registry name of a method config instance (its `name` ClassVar)."""
    return str(getattr(type(method), "name", type(method).__name__.lower()))


def config_to_dict(cfg: RunConfig) -> dict:
    """Plain YAML-safe dict of a RunConfig, method name first in its section."""
    sections = {
        "name": cfg.name,
        "output_dir": cfg.output_dir,
        "model": to_plain(cfg.model),
        "method": {"name": method_name(cfg.method), **to_plain(cfg.method)},
        "data": to_plain(cfg.data),
        "train": to_plain(cfg.train),
    }
    return {key: sections[key] for key in SECTION_ORDER}


# ----------------------------------------------------------------------------- YAML files


def read_yaml(path: str | Path) -> dict:
    """Read a YAML config file into a mapping (empty file -> {})."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, Mapping):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    return data or {}


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text (loads back into an equal RunConfig)."""
    class Dumper(yaml.SafeDumper):
        """Writes strings with line breaks as "a\\n" rather than as folded blocks."""

    def represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
        style = '"' if "\n" in text else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)

    Dumper.add_representer(str, represent_str)
    return yaml.dump(config_to_dict(cfg), Dumper=Dumper, sort_keys=False, allow_unicode=True)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write the resolved config to `path` (a run folder's config.yaml) atomically: a kill leaves the whole
    file, or none and at most a `.config.yaml.tmp-*` file (`lorakit.train.checkpoint.holds_a_run` ignores it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(config_to_yaml(cfg))
            handle.flush()
            os.fsync(handle.fileno())
        share(tmp)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def is_recipe(path: Path) -> bool:
    """Whether `path` is one of the recipes shipped in lorakit/configs/."""
    return Path(path).resolve().parent == RECIPES_DIR.resolve()


def find_recipe(spec: str | Path) -> Path:
    """A config path: an existing file, or the name of a recipe shipped in lorakit/configs/."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{path.stem if path.suffix in ('.yaml', '.yml') else path.name}.yaml"
    if shipped.is_file() and len(path.parts) == 1:
        return shipped
    names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{spec}' is neither a file nor a shipped recipe ({', '.join(names) or 'none'})")


def load_config(path: str | Path | None = None, overrides: Iterable[tuple[str, Any]] = (),
                schema: Schema | None = None) -> RunConfig:
    """Read a YAML config (a path or shipped recipe name; None -> quickstart) and apply overrides."""
    source = find_recipe(path if path is not None else "quickstart")
    raw = apply_overrides(read_yaml(source), overrides)
    cfg = build_config(raw, schema)
    if cfg.name is None:
        cfg = dataclasses.replace(cfg, name=source.stem)
    return cfg
