"""Resumable checkpoints, written atomically and read back without unpickling anything.

Layout of `run_dir/checkpoints/`:

    step-N/trainable.safetensors   trainable weights by parameter name (requires_grad only)
    step-N/optimizer.safetensors   optimizer state tensors, keyed "<param name>/<state key>"
    step-N/optimizer.json          optimizer hyperparameters (param groups, by parameter name)
    step-N/rng.safetensors         torch CPU (and CUDA) generator states
    step-N/state.json              step, data position, halving, python/numpy RNG, loop counters, fp16 loss scaler
    latest                         the name of the newest complete checkpoint ("step-N")

A checkpoint is written into `step-N.tmp-XXXX` and renamed to `step-N` only when complete;
`latest` is replaced with os.replace afterwards; an old checkpoint is renamed to `step-N.old-XXXX`
before it is deleted. So a `step-N` folder is always complete, and a kill at any point leaves the
previous checkpoint, the pointer and a resumable run (`resolve_resume`). A write that fails (disk
full, file too large) is one `CheckpointWriteError` naming the file and the checkpoint still intact.
Files and folders get the permissions the umask asks for (`lorakit.permissions`).
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lorakit.errors import LorakitError
from lorakit.permissions import share

LATEST = "latest"
FILES = ("trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json")
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-\d+\.(tmp|old)-")


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, as plain tensors and JSON-able dicts."""

    weights: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    state: dict[str, Any]


# ---- RNG ---------------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Python and numpy RNG states (JSON-able) and torch generator states (tensors)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{index}"] = state
    return meta, tensors


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """Put back the states captured by `capture_rng`."""
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("cuda_")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])


# ---- weights and optimizer ---------------------------------------------------------------

def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters by name, as contiguous CPU tensors."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `weights` into the model's trainable parameters; names must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    _check_same_names(set(params), set(weights), source)
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def _check_same_names(expected: set[str], found: set[str], source: Path) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise LorakitError(
            f"checkpoint {source} does not fit this model's trainable parameters: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def _param_names(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> list[str]:
    """Names of the optimizer's params in state-dict index order."""
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict, dict]:
    """(tensors, meta) for the optimizer; `names` maps id(param) -> parameter name."""
    state = optimizer.state_dict()
    order = _param_names(optimizer, names)
    tensors, scalars = {}, {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{order[index]}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(order[index], {})[key] = value
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(optimizer: torch.optim.Optimizer, names: dict[int, str], tensors: dict,
                         meta: dict, source: Path) -> None:
    """Inverse of `optimizer_state`, matching parameters by name."""
    order = _param_names(optimizer, names)
    index_of = {name: i for i, name in enumerate(order)}
    saved = [name for group in meta["param_groups"] for name in group["params"]]
    _check_same_names(set(order), set(saved), source)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        name, _, entry = key.rpartition("/")
        state.setdefault(index_of[name], {})[entry] = value
    for name, entries in meta["scalars"].items():
        state.setdefault(index_of[name], {}).update(entries)
    groups = [{**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items() if k != "params"},
               "params": [index_of[n] for n in g["params"]]} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ---- files ---------------------------------------------------------------------------------

class CheckpointWriteError(LorakitError):
    """A checkpoint that could not be written (disk full, file too large, ...); the previous one is intact."""


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reason(error: BaseException) -> str:
    """An OS error's own words ("No space left on device", "File too large")."""
    if isinstance(error, OSError):
        return error.strerror or str(error)
    text = str(error)  # safetensors: "Error while serializing: I/O error: File too large (os error 27)"
    return re.sub(r" \(os error \d+\)$", "", text.rpartition("I/O error: ")[2] or text)


class _FileFailed(Exception):
    """Which checkpoint file the disk refused, and its error."""

    def __init__(self, name: str, error: BaseException) -> None:
        super().__init__(name)
        self.name, self.error = name, error


def _write_files(folder: Path, ckpt: Checkpoint) -> None:
    """The checkpoint's files in `folder`, each synced to disk; _FileFailed names the one that failed."""
    writers = {
        "trainable.safetensors": lambda path: save_file(ckpt.weights, str(path)),
        "optimizer.safetensors": lambda path: save_file(ckpt.optimizer_tensors, str(path)),
        "optimizer.json": lambda path: _write_json(path, ckpt.optimizer_meta),
        "rng.safetensors": lambda path: save_file(ckpt.rng_tensors, str(path)),
        "state.json": lambda path: _write_json(path, ckpt.state),
    }
    for name, write in writers.items():
        try:
            write(folder / name)
            _fsync(folder / name)
        except (OSError, SafetensorError) as error:
            raise _FileFailed(name, error) from error
    share(folder, *(folder / name for name in writers))  # mkdtemp and save_file make 0700/0600


def _write_failed(root: Path, step: int, name: str, error: BaseException) -> CheckpointWriteError:
    intact = read_pointer(root)
    kept = (f"the previous checkpoint {intact} is intact (continue from it with --resume once there is room)"
            if intact is not None and complete(intact) else "no earlier checkpoint exists")
    return CheckpointWriteError(f"could not write checkpoint {root / f'step-{step}'}: {name}: {_reason(error)}; "
                                f"{kept}")


def write_checkpoint(root: Path, step: int, ckpt: Checkpoint, keep: int = 0) -> Path:
    """Write `ckpt` as root/step-<step> atomically, point `latest` at it, prune to `keep` newest.

    Raises CheckpointWriteError when the disk refuses a file; nothing of the new checkpoint stays."""
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    final = root / f"step-{step}"
    try:
        staging = Path(tempfile.mkdtemp(prefix=f"step-{step}.tmp-", dir=root))
    except OSError as error:
        raise _write_failed(root, step, "its folder", error) from error
    try:
        try:
            _write_files(staging, ckpt)
        except _FileFailed as failed:
            raise _write_failed(root, step, failed.name, failed.error) from failed.error
        if final.exists():  # a re-run of the same step after resuming from an older checkpoint
            final.rename(Path(tempfile.mkdtemp(prefix=f"step-{step}.old-", dir=root)) / "old")
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _write_pointer(root, final.name)
    except OSError as error:
        raise _write_failed(root, step, LATEST, error) from error
    prune(root, keep)
    remove_leftovers(root)
    return final


def _write_pointer(root: Path, name: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f"{LATEST}.tmp-", dir=root)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(name + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        share(tmp)  # mkstemp makes 0600
        os.replace(tmp, root / LATEST)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def step_dirs(root: Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def complete(folder: Path) -> bool:
    """Whether `folder` holds every file of a checkpoint."""
    return all((folder / name).is_file() for name in FILES)


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest checkpoints (0 keeps all); never the one `latest` names.

    Each is renamed to a leftover name first, so a kill mid-delete leaves no partial `step-N`."""
    if keep <= 0:
        return
    latest = read_pointer(root)
    for path in step_dirs(root)[:-keep]:
        if path != latest:
            doomed = Path(tempfile.mkdtemp(prefix=f"{path.name}.old-", dir=root)) / "old"
            path.rename(doomed)
            shutil.rmtree(doomed.parent)


def remove_leftovers(root: Path) -> None:
    """Delete half-written (step-N.tmp-*) and replaced (step-N.old-*) folders and pointer files of
    earlier crashes."""
    for path in root.iterdir():
        if _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f"{LATEST}.tmp-"):
            path.unlink(missing_ok=True)


def read_pointer(root: Path) -> Path | None:
    """The checkpoint `root/latest` names, or None when there is no pointer."""
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    return root / pointer.read_text().strip()


def read_checkpoint(folder: Path) -> Checkpoint:
    """Load a checkpoint folder (safetensors and JSON only)."""
    if not (folder / "state.json").is_file():
        raise LorakitError(f"{folder} is not a lorakit checkpoint (no state.json)")
    return Checkpoint(
        weights=load_file(str(folder / "trainable.safetensors")),
        optimizer_tensors=load_file(str(folder / "optimizer.safetensors")),
        optimizer_meta=json.loads((folder / "optimizer.json").read_text()),
        rng_tensors=load_file(str(folder / "rng.safetensors")),
        state=json.loads((folder / "state.json").read_text()),
    )


def newest(root: Path) -> Path | None:
    """The checkpoint to continue under a checkpoints folder `root`: the one `latest` names, else (a kill
    between a checkpoint's rename and its pointer, or a lost pointer) the newest complete step-N folder."""
    named = read_pointer(root)
    if named is not None and complete(named):
        return named
    done = [folder for folder in step_dirs(root) if complete(folder)]
    return done[-1] if done else None


_ATOMIC_LEFTOVER = re.compile(r"^\..+\.tmp-")  # what a kill mid-write leaves of a file written atomically


def holds_a_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds anything of a run, so a fresh run must not start there: absent, empty, or
    holding only the temporary file of a config.yaml whose atomic write was killed, it does not."""
    return run_dir.is_dir() and any(not _ATOMIC_LEFTOVER.match(path.name) for path in run_dir.iterdir())


def resolve_resume(run_dir: Path, resume: bool | str | Path) -> Path | None:
    """The checkpoint folder to resume from: None (fresh), True (run_dir's newest) or a path.

    A path may name a step-N folder, a checkpoints folder, or a run folder. With True, a run that
    stopped before its first checkpoint was complete has nothing to continue: None (the caller starts
    again from step 0 and says so). A path that holds no checkpoint is an error.
    """
    if resume is False or resume is None:
        return None
    start = run_dir if resume is True else Path(resume)
    if resume is not True and not start.exists():
        raise LorakitError(f"resume: {start} does not exist")
    if complete(start):
        return start
    for root in (start, start / "checkpoints"):
        found = newest(root)
        if found is not None:
            return found
    if resume is True:
        return None
    raise LorakitError(f"resume: no checkpoint found in {start} (looked for a step-N folder, checkpoints/latest "
                       "and checkpoints/step-N)")
