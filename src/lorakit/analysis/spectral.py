"""Spectra of fine-tuned weights against their base: what a fine-tuning changed, per matrix.

- Singular values of the update dW = W_tuned - W_base: a LoRA update of rank r has at most r
  non-zero ones; full fine-tuning spreads over many.
- Effective rank (Roy & Vetterli 2007): exp of the entropy of the normalised singular values
  p_i = s_i / sum(s); a matrix with k equal singular values has effective rank k.
- Intruder dimensions (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of
  Equivalence", arXiv:2410.21228): among the top-k left singular vectors of W_tuned, those whose
  highest |cosine similarity| with any left singular vector of W_base is below a threshold, i.e.
  new directions that the pre-trained matrix did not have. The paper reports that LoRA introduces
  them and full fine-tuning much less.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SPECTRA_FIGURE = "spectra.png"  # what `lorakit inspect TARGET` writes into TARGET (and `lorakit report` shows)
SPECTRA_TABLE = "spectra.json"  # one summary row per module (`summary_rows`)


@dataclass
class Intruder:
    """One top singular direction of the fine-tuned matrix that the base matrix lacks."""

    index: int  # rank of the singular vector in W_tuned (0 = largest)
    singular_value: float
    max_cosine: float  # highest |cos| with any base singular vector


@dataclass
class ModuleSpectrum:
    """The comparison of one weight matrix."""

    name: str
    shape: tuple[int, int]
    relative_change: float  # ||dW||_F / ||W_base||_F
    delta_singular_values: list[float]  # of dW, descending (all of them)
    effective_rank: float  # of dW
    intruders: list[Intruder] = field(default_factory=list)


def effective_rank(singular_values: torch.Tensor, eps: float = 1e-12) -> float:
    """exp(H(p)) with p = s / sum(s) (Roy & Vetterli 2007); 0 for an all-zero spectrum."""
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def left_singular(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, S) of a matrix in float64: columns of U are the left singular vectors, S descending."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    return u, s  # (d_out, min(d_out, d_in)), (min,)


def intruder_dimensions(base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10,
                        threshold: float = 0.5) -> list[Intruder]:
    """Top-`top_k` singular vectors of `tuned` whose max |cos| with every base singular vector < threshold."""
    u_base, _ = left_singular(base)
    u_tuned, s_tuned = left_singular(tuned)
    k = min(top_k, u_tuned.shape[1])
    cosines = (u_tuned[:, :k].T @ u_base).abs()  # (k, n_base): unit vectors, so dot = cosine
    best = cosines.max(dim=1).values
    return [Intruder(i, float(s_tuned[i]), float(best[i])) for i in range(k) if best[i] < threshold]


def compare_matrices(name: str, base: torch.Tensor, tuned: torch.Tensor, top_k: int = 10,
                     threshold: float = 0.5) -> ModuleSpectrum:
    """The spectral comparison of one (d_out, d_in) weight before and after fine-tuning."""
    base64, tuned64 = base.detach().double(), tuned.detach().double()
    delta = tuned64 - base64
    singular = torch.linalg.svdvals(delta)
    change = float(delta.norm() / base64.norm().clamp_min(1e-30))
    return ModuleSpectrum(name=name, shape=tuple(base.shape), relative_change=change,
                          delta_singular_values=singular.tolist(), effective_rank=effective_rank(singular),
                          intruders=intruder_dimensions(base64, tuned64, top_k, threshold))


def compare_state_dicts(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor], names: list[str],
                        top_k: int = 10, threshold: float = 0.5) -> list[ModuleSpectrum]:
    """`compare_matrices` for every weight in `names` (2-D, present in both, same shape)."""
    out = []
    for name in names:
        if name in base and name in tuned and base[name].dim() == 2 and base[name].shape == tuned[name].shape:
            out.append(compare_matrices(name, base[name], tuned[name], top_k, threshold))
    return out


def summary_rows(spectra: list[ModuleSpectrum]) -> list[dict]:
    """One row per module: name, shape, |dW|/|W|, effective rank of dW, its top singular value and the number of
    intruder dimensions (what `lorakit inspect` prints and writes to SPECTRA_TABLE)."""
    return [{"module": m.name.removesuffix(".weight"), "shape": "x".join(map(str, m.shape)),
             "relative_change": m.relative_change, "effective_rank": m.effective_rank,
             "top_singular_value": m.delta_singular_values[0] if m.delta_singular_values else 0.0,
             "intruders": len(m.intruders)} for m in spectra]
