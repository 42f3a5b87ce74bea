"""Mixture of LoRA experts: k LoRA pairs per target layer, mixed per token by a learned router.

    g = softmax(R x)                              (k gates per token; optionally top-k, renormalised)
    h = W x + s * sum_e g_e * B_e (A_e x)

Each expert is a plain LoRA pair (lora_math.lora_branch), so with k = 1 the gate is exactly 1
and the layer equals a LoRA layer with the same A and B. The router R (k x d_in) starts at zero
(uniform gates) or small normal values; every B starts at zero, so the model starts equal to the base.

Load balancing: each layer records the Switch-Transformer auxiliary loss (Fedus et al. 2021,
arXiv:2101.03961) k * sum_e f_e * P_e, where f_e is the fraction of token-slots routed to expert
e and P_e its mean gate probability (1 when perfectly balanced). `auxiliary_loss()` hands it to
the training loop, weighted by aux_loss_weight. The mixture depends on the input, so it cannot
be merged into W. Saved in lorakit's own folder format (see `own_format`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import own_format
from lorakit.adapters.layers import WrappedLayer, adapter_dtype
from lorakit.adapters.config import MoLE
from lorakit.adapters.lora_math import init_lora_A_, lora_branch, scaling
from lorakit.adapters.match import find_targets
from lorakit.adapters.named import NamedDeltas, frozen
from lorakit.adapters.report import trainable_by_module
from lorakit.adapters.state import AdapterState, attach_state, detach_state, ensure_plain, replace_module
from lorakit.errors import AdapterError


def apply(cfg: MoLE, model: nn.Module) -> nn.Module:
    """Wrap each target layer in a MoLELayer, freeze the rest; returns the model."""
    ensure_plain(model)
    paths = find_targets(model, cfg.targets)
    modules = dict(model.named_modules())
    model.requires_grad_(False)
    for path in paths:
        replace_module(model, path, MoLELayer(modules[path], cfg))
    attach_state(model, AdapterState(method=cfg, targets=paths))
    return model


save, load_folder = own_format.save, own_format.load_folder  # lorakit's own folder format (own_format.py)


def named(model: nn.Module, name: str, folder: Path, raw: dict) -> NamedDeltas:
    """A MoLE folder as a named adapter: each target adds its expert mixture of the input to its output."""
    cfg = own_format.method_config(raw, MoLE, folder / own_format.CONFIG_NAME)
    layers = {path: MoLELayer(model.get_submodule(path), cfg) for path in find_targets(model, cfg.targets)}
    params = {f"{path}.{n}": p for path, layer in layers.items()
              for n, p in layer.named_parameters() if n not in ("weight", "bias")}
    own_format.copy_tensors(params, folder)
    frozen(params)
    deltas = {path: (lambda x, y, layer=layer: layer.mixture(x).to(y.dtype)) for path, layer in layers.items()}
    return NamedDeltas(name, deltas, str(folder), list(layers.values()))


def merge(cfg: MoLE, model: nn.Module, **options: Any) -> nn.Module:
    """Refused: the gates depend on each token, so no single weight equals the mixture."""
    raise AdapterError("a mixture of LoRA experts cannot be merged: its router mixes the experts differently "
                       "for every token, which no single base weight can express; keep the adapter or unload it")


def unload(cfg: MoLE, model: nn.Module) -> nn.Module:
    """Put the plain base layers back: the base model as before `apply`."""
    for path, module in list(model.named_modules()):
        if isinstance(module, MoLELayer):
            replace_module(model, path, module.to_plain())
    detach_state(model)
    return model


def count(cfg: MoLE, model: nn.Module) -> dict[str, int]:
    """Trainable numbers per target when `cfg` is applied to `model` (a meta-device skeleton will do):
    `param_count` per target layer, k LoRA pairs plus the router."""
    return trainable_by_module(apply(cfg, model))


class MoLELayer(WrappedLayer):
    """y = base(x) + s * sum_e g_e(x) B_e A_e x; the base `weight`/`bias` keep their names."""

    report_group: ClassVar[str] = "MoLE (base+experts+router)"

    def __init__(self, base: nn.Module, cfg: MoLE) -> None:
        super().__init__()
        kind = self.wrap(base, "MoLE")
        d_in, d_out = kind.dims(base.weight)
        k, r = cfg.num_experts, cfg.r
        factory = dict(device=base.weight.device, dtype=adapter_dtype(base.weight.dtype))
        self.lora_A = nn.Parameter(torch.empty(k, r, d_in, **factory))  # expert e: A_e (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(k, d_out, r, **factory))  # expert e: B_e (d_out, r)
        self.router = nn.Linear(d_in, k, bias=False, **factory)  # weight (k, d_in)
        for expert in range(k):
            init_lora_A_(self.lora_A.data[expert])
        with torch.no_grad():
            nn.init.zeros_(self.router.weight) if cfg.router_init == "zeros" else \
                nn.init.normal_(self.router.weight, std=0.02)
        self.top_k, self.aux_loss_weight = cfg.top_k, cfg.aux_loss_weight
        self.scaling = scaling(cfg.alpha, r, cfg.rslora)
        self.last_balance_loss: torch.Tensor | None = None
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: the base layer alone
        self.train(base.training)

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (..., k): softmax of the router, top-k renormalised if set."""
        probs = F.softmax(self.router(x).float(), dim=-1).to(x.dtype)  # (..., k)
        # dense routing counts each token's top-1 expert for the balance statistic (as Switch does)
        top = probs.topk(self.top_k or 1, dim=-1).indices
        chosen = torch.zeros_like(probs).scatter_(-1, top, 1.0)  # (..., k) of 0/1
        self.last_balance_loss = balance_loss(probs, chosen)
        if self.top_k is None or self.top_k == probs.shape[-1]:
            return probs
        kept = probs * chosen
        return kept / kept.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.kind.forward(x, self.weight, self.bias)  # (..., d_out)
        if not self.adapter_enabled:
            return result
        return (result + self.mixture(x)).to(result.dtype)

    def mixture(self, x: torch.Tensor) -> torch.Tensor:
        """s * sum_e g_e(x) B_e A_e x, in the adapter's dtype: (..., d_in) -> (..., d_out)."""
        x = x if x.dtype == self.lora_A.dtype else x.to(self.lora_A.dtype)
        gates = self.gates(x)  # (..., k)
        total = None
        for expert in range(self.lora_A.shape[0]):
            branch = lora_branch(x, self.lora_A[expert], self.lora_B[expert], self.scaling)  # (..., d_out)
            term = branch * gates[..., expert:expert + 1]
            total = term if total is None else total + term
        return total

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The weighted load-balancing loss of the last forward pass (then forgotten), or None."""
        loss, self.last_balance_loss = self.last_balance_loss, None
        return None if loss is None or not self.aux_loss_weight else self.aux_loss_weight * loss

    def extra_repr(self) -> str:
        k, r, d_in = self.lora_A.shape
        return (f"base={self.base_type.__name__}, experts={k}, r={r}, top_k={self.top_k}, "
                f"scaling={self.scaling:.4g}")


def balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch-style k * sum_e f_e * P_e over all tokens; probs, chosen (..., k); 1 when balanced.

    f_e (the share of routed token-slots that went to e) carries no gradient; P_e does.
    """
    k = probs.shape[-1]
    flat_probs, flat_chosen = probs.reshape(-1, k).float(), chosen.reshape(-1, k).float()
    share = flat_chosen.sum(0) / flat_chosen.sum().clamp(min=1)  # f (k,)
    mean_prob = flat_probs.mean(0)  # P (k,)
    return k * (share * mean_prob).sum()


def param_count(d_in: int, d_out: int, r: int, k: int) -> int:
    """Trainable numbers of one MoLE layer: k LoRA pairs plus the router (k x d_in)."""
    return k * r * (d_in + d_out) + k * d_in
