"""Load a base model and its tokenizer: a hub id, a local folder, or the embedded model.

`load_model("embedded")` gives the small Llama-architecture model that lorakit pre-trained on
generated country facts (see `lorakit.lab`); it ships inside the package and loads with no
network. Weights are read with safetensors only, and remote code runs only when the caller asks.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import struct
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import datasets
import torch
from huggingface_hub import constants as hub_constants
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

from lorakit import dtypes
from lorakit.errors import LorakitError

# The assets that ship inside lorakit (src/lorakit/embedded/): the model, and the datasets of its lab
EMBEDDED_NAME = "embedded"
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "embedded" / "model"
EMBEDDED_DATA_DIR = EMBEDDED_DIR.parent / "data"
EMBEDDED_DATASETS = {
    "embedded-train": EMBEDDED_DATA_DIR / "sft_train.jsonl",
    "embedded-eval": EMBEDDED_DATA_DIR / "sft_eval.jsonl",
    "embedded-general": EMBEDDED_DATA_DIR / "general.jsonl",
    "embedded-pref-train": EMBEDDED_DATA_DIR / "pref_train.jsonl",  # preference rows (lab/preference.py)
    "embedded-pref-eval": EMBEDDED_DATA_DIR / "pref_eval.jsonl",
}


def dataset_path(name: str) -> Path:
    """The file of an embedded dataset name ('embedded-train', ...); any other name as a path."""
    return EMBEDDED_DATASETS.get(name, Path(name))



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
    """A dtype spelling (fp32, bf16, fp16 or an alias: lorakit.dtypes), a torch.dtype or None (keep the checkpoint's
    dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return dtypes.to_torch(dtype)


HUB_PROBE_TIMEOUT_S = 3.0  # a hub that has not answered a HEAD request by then is treated as offline


@functools.lru_cache(maxsize=None)
def hub_unreachable(endpoint: str) -> str | None:
    """Why the hub at `endpoint` cannot be reached (None when it answers, with any HTTP status).

    One HEAD request with a short timeout, asked once per process: without it, an offline machine (or a
    hub that accepts connections and never answers) costs a minute of retries per file before the same
    error."""
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (OSError, ValueError) as error:  # URLError, timeouts, refused or unresolvable hosts
        reason = getattr(error, "reason", error)
        return f"the hub at {endpoint} did not answer within {HUB_PROBE_TIMEOUT_S:g} s ({reason})"
    return None


def _hub_files_only(local: bool) -> tuple[bool, str | None]:
    """(local_files_only, why the hub is offline) for a load: a local folder, HF_HUB_OFFLINE, or an
    unreachable hub reads only files on disk (the hub cache included), so a cached model still loads."""
    if local or hub_constants.HF_HUB_OFFLINE:
        return True, None
    reason = hub_unreachable(hub_constants.ENDPOINT)
    return reason is not None, reason


@contextlib.contextmanager
def _offline_hub(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (HF_HUB_OFFLINE) while loading from an unreachable hub: transformers
    does not pass local_files_only to every file it looks for (e.g. adapter_config.json)."""
    if not offline:
        yield
        return
    before = hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = before


def _load_error(kind: str, name: str, local: bool, error: Exception, offline: str | None = None) -> LorakitError:
    if local:
        return LorakitError(f"could not load the {kind} from {name}: {error}")
    cause = f"{offline}, and it is not in the local cache" if offline else str(error)
    return LorakitError(
        f"could not load the {kind} {name!r}: it is not a local folder, and loading it from the "
        f"Hugging Face hub failed (no network, or no such repository?): {cause}")


def load_model(name_or_path: str | Path, *, dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None,
               trust_remote_code: bool = False, revision: str | None = None):
    """Load a causal LM ("embedded", a local folder or a hub id) from safetensors weights."""
    where, local = resolve(name_or_path)
    torch_dtype = to_dtype(dtype)
    files_only, offline = _hub_files_only(local)
    try:
        with _offline_hub(offline is not None):
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch_dtype if torch_dtype is not None else "auto",
                use_safetensors=True, local_files_only=files_only,
                trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, EnvironmentError) as error:
        raise _load_error("model", str(name_or_path), local, error, offline) from error
    if device is not None:
        model = model.to(device)
    return model


def load_tokenizer(name_or_path: str | Path, trust_remote_code: bool = False, revision: str | None = None):
    """Load the tokenizer that belongs to a model ("embedded", a local folder or a hub id)."""
    where, local = resolve(name_or_path)
    files_only, offline = _hub_files_only(local)
    try:
        with _offline_hub(offline is not None):
            tokenizer = AutoTokenizer.from_pretrained(
                where, local_files_only=files_only, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError, EnvironmentError) as error:
        raise _load_error("tokenizer", str(name_or_path), local, error, offline) from error
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; it is never trained on
    return tokenizer


def quiet_progress_bars() -> None:
    """Hide the loaders' own progress bars (weight loading, dataset splits), for clean CLI output."""
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()


__all__ = ["EMBEDDED_DIR", "EMBEDDED_NAME", "load_model", "load_tokenizer", "quiet_progress_bars",
           "resolve", "to_dtype"]
