"""Load a base model and its tokenizer: a hub id, a local folder, or the embedded model.

`load_model("embedded")` gives the small Llama-architecture model that lorakit pre-trained on
generated country facts (see `lorakit.lab`); it ships inside the package and loads with no
network. Weights are read with safetensors only, and remote code runs only when the caller asks.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from lorakit.errors import LorakitError

# The assets that ship inside lorakit (src/lorakit/embedded/): the model, and the datasets of its lab
EMBEDDED_NAME = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded" / "model"
EMBEDDED_DATA_DIR = EMBEDDED_DIR.parent / "data"
EMBEDDED_DATASETS = {
    "embedded-train": EMBEDDED_DATA_DIR / "sft_train.jsonl",
    "embedded-eval": EMBEDDED_DATA_DIR / "sft_eval.jsonl",
    "embedded-general": EMBEDDED_DATA_DIR / "general.jsonl",
}


def dataset_path(name: str) -> Path:
    """The file of an embedded dataset name ('embedded-train', ...); any other name as a path."""
    return EMBEDDED_DATASETS.get(name, Path(name))

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve(name_or_path: str | Path) -> tuple[str, bool]:
    """Turn a model name into (path or hub id, local_files_only). "embedded" -> the package folder."""
    text = str(name_or_path)
    if text == EMBEDDED_NAME:
        if not (EMBEDDED_DIR / "config.json").is_file():
            raise LorakitError(f"the embedded model is missing from {EMBEDDED_DIR}; "
                               "reinstall lorakit or rebuild it with `lorakit pretrain --out DIR`")
        return str(EMBEDDED_DIR), True
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LorakitError(f"model path {path} is a file; pass the folder that holds config.json")
        return str(path), True
    return text, False


def portable_name(name_or_path: str | Path) -> str:
    """The base model as a name that resolves from any directory: "embedded" and hub ids as given, a local
    folder as its absolute path."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    return text if text == EMBEDDED_NAME or not path.exists() else str(path.resolve())


FINGERPRINT_SAMPLES = 4  # 64-byte samples read from each weight file's data, spread evenly


def fingerprint(name_or_path: str | Path) -> dict | None:
    """A cheap identity of a model's weights: a hash of every safetensors header (tensor names, dtypes,
    shapes, offsets) and of a few 64-byte samples of each file's data. Reads kilobytes, not gigabytes.
    None when the weights are not local safetensors files (a hub id not in the cache, a model built in Python)."""
    path, _ = resolve(name_or_path)
    folder = Path(path)
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            digest.update(json.dumps(header, sort_keys=True).encode())
            size = file.stat().st_size - 8 - length
            for k in range(FINGERPRINT_SAMPLES):
                handle.seek(8 + length + max(0, size - 64) * k // max(1, FINGERPRINT_SAMPLES - 1))
                digest.update(handle.read(64))
    return {"method": "safetensors-headers+samples-v1", "files": len(files), "sha256": digest.hexdigest()}


def to_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept "bf16", "float32", a torch.dtype or None (keep the checkpoint's dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LorakitError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _load_error(kind: str, name: str, local: bool, error: Exception) -> LorakitError:
    if local:
        return LorakitError(f"could not load the {kind} from {name}: {error}")
    return LorakitError(
        f"could not load the {kind} {name!r}: it is not a local folder, and loading it from the "
        f"Hugging Face hub failed (no network, or no such repository?): {error}")


def load_model(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None,
               trust_remote_code: bool = False, revision: str | None = None):
    """Load a causal LM ("embedded", a local folder or a hub id) from safetensors weights."""
    where, local = resolve(name_or_path)
    torch_dtype = to_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            where, dtype=torch_dtype if torch_dtype is not None else "auto",
            use_safetensors=True, local_files_only=local,
            trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, EnvironmentError) as error:
        raise _load_error("model", str(name_or_path), local, error) from error
    if device is not None:
        model = model.to(device)
    return model


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, revision: str | None = None):
    """Load the tokenizer that belongs to a model ("embedded", a local folder or a hub id)."""
    where, local = resolve(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            where, local_files_only=local, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, EnvironmentError) as error:
        raise _load_error("tokenizer", str(name_or_path), local, error) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; it is never trained on
    return tokenizer


def quiet_progress_bars() -> None:
    """Hide the loaders' own progress bars (weight loading, dataset splits), for clean CLI output."""
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


__all__ = ["EMBEDDED_DIR", "EMBEDDED_NAME", "load_model", "load_tokenizer", "quiet_progress_bars",
           "resolve", "to_dtype"]
