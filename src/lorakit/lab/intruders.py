"""(f)'s intruder dimensions of one run, against a random update of the same spectrum.

Shuttleworth et al. 2024 ("LoRA vs Full Fine-tuning: An Illusion of Equivalence"): an intruder dimension is one of
the fine-tuned matrix's top singular vectors (top 10) whose largest |cosine| with every base singular vector is
below eps (0.5 in the paper). `intruder_record` keeps, per linear layer, those top-10 cosines, so a count at any eps
is read off later (`count`), and the same for a random baseline: the base plus a random matrix with exactly the
update's singular values (random singular vectors, seeded), so intruders that any update of that size and rank
would make are told apart from those of the update's own directions. Cached as intruders.json in the run folder.

The paper's causal test (`causal_record`): scale the singular values of the intruder directions of every layer by
SCALE (0.7) and score the model again, on general text (does forgetting shrink?) and on the test questions (is the
task kept?); the unscaled merged weights are scored by the same code, so the two differ only by the scaling.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch

from lorakit.analysis.spectral import intruder_dimensions
from lorakit.analysis.sweep import row_losses
from lorakit.analysis.weights import load_pair
from lorakit.infer.evaluate import evaluate
from lorakit.infer.metrics import exact_match
from lorakit.models import load_model, load_tokenizer

RECORD_FILE = "intruders.json"
CAUSAL_FILE = "intruders_causal.json"
SCALE = 0.7  # the causal test's factor on the intruders' singular values
TOP_K = 10  # the paper's
EPS = 0.5  # the paper's threshold
ALL = 1.01  # a threshold above any |cosine|: every top-k vector is returned with its cosine


def random_like(delta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random matrix with the singular values of `delta` (d_out, d_in) and random orthonormal singular vectors."""
    singular = torch.linalg.svdvals(delta)
    rank = singular.shape[0]
    u, _ = torch.linalg.qr(torch.randn(delta.shape[0], rank, generator=generator, dtype=delta.dtype))
    v, _ = torch.linalg.qr(torch.randn(delta.shape[1], rank, generator=generator, dtype=delta.dtype))
    return u @ torch.diag(singular) @ v.T


def intruder_record(run_dir: Path, seed: int = 0) -> dict:
    """{"modules": [{name, base_norm, delta_norm, cosines, random_cosines}]} of a finished run (cached)."""
    path = Path(run_dir) / RECORD_FILE
    if path.is_file():
        return json.loads(path.read_text())
    base, tuned, names, _ = load_pair(run_dir)
    generator = torch.Generator().manual_seed(seed)
    modules = []
    for name in names:
        before, after = base[name].double(), tuned[name].double()
        delta = after - before
        noise = random_like(delta, generator)
        modules.append({"name": name, "base_norm": float(before.norm()), "delta_norm": float(delta.norm()),
                        "cosines": [i.max_cosine for i in intruder_dimensions(before, after, TOP_K, ALL)],
                        "random_cosines": [i.max_cosine for i in intruder_dimensions(before, before + noise,
                                                                                     TOP_K, ALL)]})
    record = {"modules": modules}
    path.write_text(json.dumps(record) + "\n")
    return record


def count(record: dict, eps: float = EPS, key: str = "cosines") -> int:
    """Intruder dimensions in all layers at threshold `eps` (key "random_cosines": of the random baseline)."""
    return sum(1 for module in record["modules"] for cosine in module[key] if cosine < eps)


def update_size(record: dict) -> float:
    """||dW||_F / ||W||_F over every linear layer together."""
    modules: Sequence[dict] = record["modules"]
    return math.sqrt(sum(m["delta_norm"] ** 2 for m in modules)) / math.sqrt(sum(m["base_norm"] ** 2 for m in modules))


def scale_intruders(base: torch.Tensor, tuned: torch.Tensor, scale: float = SCALE, eps: float = EPS) -> torch.Tensor:
    """`tuned` with the singular values of its intruder directions (vs `base`) multiplied by `scale` (unchanged,
    bit for bit, when it has none)."""
    intruders = intruder_dimensions(base.double(), tuned.double(), TOP_K, eps)
    if not intruders:
        return tuned
    u, singular, vh = torch.linalg.svd(tuned.double(), full_matrices=False)
    factors = torch.ones_like(singular)
    factors[[intruder.index for intruder in intruders]] = scale
    return ((u * (singular * factors)) @ vh).to(tuned.dtype)


def _scored(state: dict[str, torch.Tensor], test_rows: Sequence[dict], general_rows: Sequence[dict]) -> dict:
    """Test exact match per question and per-row losses of the embedded model carrying `state`."""
    model, tokenizer = load_model("embedded", dtype="fp32"), load_tokenizer("embedded")
    model.load_state_dict(state)
    model.eval()
    answers = evaluate(model, tokenizer, list(test_rows), max_new_tokens=16, batch_size=64)["predictions"]
    return {"correct": [exact_match(a, row["completion"]) for a, row in zip(answers, test_rows)],
            "test": row_losses(model, tokenizer, test_rows), "general": row_losses(model, tokenizer, general_rows)}


def causal_record(run_dir: Path, test_rows: Sequence[dict], general_rows: Sequence[dict]) -> dict:
    """{"before": scores, "after": scores, "scale", "eps"}: the merged run, then with its intruders scaled (cached)."""
    path = Path(run_dir) / CAUSAL_FILE
    if path.is_file():
        return json.loads(path.read_text())
    base, tuned, names, _ = load_pair(run_dir)
    scaled = {**tuned, **{name: scale_intruders(base[name], tuned[name]) for name in names}}
    record = {"scale": SCALE, "eps": EPS, "before": _scored(tuned, test_rows, general_rows),
              "after": _scored(scaled, test_rows, general_rows)}
    path.write_text(json.dumps(record) + "\n")
    return record
