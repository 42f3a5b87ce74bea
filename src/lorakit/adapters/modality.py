"""Per-modality adapters (the Phi-4-multimodal pattern): an encoder, a projector and a LoRA per modality, routed by row.

For each modality of `Modality(modalities={name: ModalitySpec})` the frozen causal LM gets

    encoder     an image encoder trained from scratch: a patch embedding (a stride-p convolution), learned
                positions and `depth` pre-norm transformer layers over the (image_size / p)^2 patch tokens
    projector   patch tokens average-pooled to `num_tokens`, then Linear -> GELU -> Linear to the LM's hidden
                size, normalised and scaled by a gain that starts at the token embeddings' RMS: the soft tokens
                that replace the placeholder's reserved positions in the input embeddings
    LoRA        s * B (A x) on its target layers (lora_math.lora_branch), computed only for the rows that carry
                the modality and index-added into theirs: no other row's output is touched

so a text row computes exactly what the base computes in the same batch (bit for bit; tests/test_adapters_modality.py)
and adding a modality never retrains the backbone. A model forward pre-hook takes each modality's batch keys
(lorakit/media.py: `image_values` (B, K, 3, H, W) uint8, `image_positions` (B, K), -1 where a row has no item) out
of the inputs, writes the soft tokens into the embeddings and tells every routed layer which rows carry which
modality. While decoding, `media_rows(model, items per row)` holds each prompt's items: the prompt pass (no KV
cache yet) gets their soft tokens, every step keeps the rows routed; `keep_media_rows` follows rows that leave.
The routing of a forward stays until the next forward (a checkpointed layer recomputed in backward needs it).

Merging is not possible: the LoRA is active for some rows only and the soft tokens are inputs, so no base weight
can hold the adapter. Saved in lorakit's own folder format (own_format.py):

    adapter_config.json         {"lorakit_method": "modality", "lorakit_format": 1, "base_model_name_or_path": ...,
                                 "config": {"modalities": {"image": {<ModalitySpec fields>}}}}
    adapter_model.safetensors   the encoder and projector, "lorakit_modality.branches.image.encoder.patch.weight",
                                "lorakit_modality.branches.image.projector.up.weight", ..., and the LoRA of each
                                target, "model.layers.0.self_attn.q_proj.lora_A.image" (r, d_in), "...lora_B.image"
"""
from __future__ import annotations

import copy
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.adapters import own_format
from lorakit.adapters.config import Modality, ModalitySpec
from lorakit.adapters.layers import WrappedLayer, adapter_dtype
from lorakit.adapters.lora_math import init_lora_A_, lora_branch, scaling
from lorakit.adapters.match import find_targets
from lorakit.adapters.multi import adapter_names, row_plan
from lorakit.adapters.prompt_tuning import cached_length
from lorakit.adapters.report import trainable_by_module
from lorakit.adapters.state import AdapterState, attach_state, detach_state, ensure_plain, get_state, replace_module
from lorakit.errors import AdapterError
from lorakit.media import MediaItem, MediaSlot, positions_key, values_key

CHILD = "lorakit_modality"


@dataclass
class Routing:
    """Which rows carry which modality in the current forward, shared by the model hook and every routed layer."""

    rows: dict[str, torch.Tensor | None] = field(default_factory=dict)  # modality -> its rows (None: every row)
    batch: int = 0
    held: list[list[MediaItem] | None] | None = None  # inside `media_rows`: each row's items (None: a text row)


def apply(cfg: Modality, model: nn.Module) -> nn.Module:
    """Add each modality's encoder, projector and routed LoRA; freeze the base; returns the model."""
    ensure_plain(model)
    if adapter_names(model):  # their hooks sit on the layers this would wrap
        raise AdapterError("load the modality adapter before any named adapter (add_adapter), not after")
    table = model.get_input_embeddings().weight  # (V, d)
    targets = {name: set(find_targets(model, spec.targets)) for name, spec in cfg.modalities.items() if spec.r}
    model.requires_grad_(False)
    routing = Routing()
    modules = dict(model.named_modules())
    paths = [path for path in modules if any(path in found for found in targets.values())]  # model order
    for path in paths:
        layer = RoutedLoRALayer(modules[path], routing)
        for name, spec in cfg.modalities.items():
            if path in targets.get(name, ()):
                layer.add(name, spec, path)
        replace_module(model, path, layer)
    with torch.device(table.device):
        owner = ModalityAdapter(cfg, table, routing)
    setattr(model, CHILD, owner)
    owner.handles = [model.register_forward_pre_hook(_route_and_insert, with_kwargs=True)]
    attach_state(model, AdapterState(method=copy.deepcopy(cfg), targets=[*paths, CHILD]))
    return model


save, load_folder = own_format.save, own_format.load_folder  # lorakit's own folder format (module docstring)


def named(model: nn.Module, name: str, folder: Path, raw: dict) -> Any:
    """Refused: a modality adapter is chosen by what a row carries, not by name."""
    raise AdapterError(f"{folder}: a modality adapter is routed by the items each row carries, not by name; load it "
                       "onto the model with load_adapter (lorakit serve --adapter NAME=FOLDER does so), beside any "
                       "named adapters")


def merge(cfg: Modality, model: nn.Module, **options: Any) -> nn.Module:
    """Refused: see the module docstring."""
    raise AdapterError("a routed modality adapter cannot be merged into the base: its LoRA is active only for rows "
                       "that carry its modality (a merged weight would change text rows too), and its encoder and "
                       "projector make input tokens, not weights; keep the adapter or unload it")


def unload(cfg: Modality, model: nn.Module) -> nn.Module:
    """Remove encoders, projectors, hooks and routed layers: the base model as before `apply`."""
    for path, module in list(model.named_modules()):
        if isinstance(module, RoutedLoRALayer):
            replace_module(model, path, module.to_plain())
    for handle in getattr(model, CHILD).handles:
        handle.remove()
    delattr(model, CHILD)
    detach_state(model)
    return model


def count(cfg: Modality, model: nn.Module) -> dict[str, int]:
    """Trainable numbers when `cfg` is applied to `model` (a meta-device skeleton will do): each modality's encoder
    and projector, and r * (d_in + d_out) per target layer of each modality's LoRA."""
    return trainable_by_module(apply(cfg, model))


def is_modality_folder(folder: str | Path) -> bool:
    """True when `folder` holds a modality adapter (adapter_config.json's lorakit_method is "modality")."""
    try:
        raw = json.loads((Path(folder) / own_format.CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("lorakit_method") == Modality.folder_type


def modality_slots(model: nn.Module) -> dict[str, MediaSlot]:
    """What the model's modality adapter reads, by modality (empty: the model reads text only)."""
    state = get_state(model)
    return state.method.media_slots() if state is not None and isinstance(state.method, Modality) else {}


@contextmanager
def media_rows(model: nn.Module, rows: Sequence[Sequence[MediaItem] | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every forward carries the items rows[i] (None or []: a text row): the prompt pass
    puts their soft tokens in (each item's start counted from the row's first unpadded token), and every forward
    routes the row to the LoRA of the modalities it carries."""
    owner = getattr(model, CHILD, None)
    wanted = {item[0] for items in rows if items for item in items}
    if owner is None:
        if wanted:
            raise AdapterError(f"the prompts carry {', '.join(sorted(wanted))} items, but the model has no modality "
                               "adapter to read them (method: modality)")
        yield model
        return
    unknown = sorted(wanted - set(owner.branches))
    if unknown:
        raise AdapterError(f"the modality adapter reads {', '.join(owner.branches)}, not {unknown[0]}")
    previous = owner.routing.held
    owner.routing.held = [list(items) if items else None for items in rows]
    try:
        yield model
    finally:
        owner.routing.held = previous


def keep_media_rows(model: nn.Module, kept: Sequence[int]) -> None:
    """Inside `media_rows`: the batch shrank to rows `kept` (positions in the current batch)."""
    owner = getattr(model, CHILD, None)
    if owner is not None and owner.routing.held is not None:
        owner.routing.held = [owner.routing.held[i] for i in kept]


# --- the hook ----------------------------------------------------------------------------------------------------

def _route_and_insert(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook: take the batch's items out of the inputs, route their rows, put their soft tokens in."""
    owner: ModalityAdapter = getattr(model, CHILD)
    if args:  # model(input_ids, ...) called positionally
        kwargs, args = {"input_ids": args[0], **kwargs}, args[1:]
    given = {name: (kwargs.pop(values_key(name), None), kwargs.pop(positions_key(name), None))
             for name in owner.branches}
    routing = owner.routing
    routing.rows = {}
    if not owner.adapter_enabled:
        return args, kwargs
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    batch = inputs.shape[0]
    if any(values is not None for values, _ in given.values()):  # a training or evaluation batch
        items = _batch_items(given)
        carried = [{name for row, name, _, _ in items if row == b} for b in range(batch)]
    elif routing.held is not None:  # decoding inside media_rows: the items enter with the prompt pass
        if len(routing.held) != batch:
            raise AdapterError(f"media_rows holds {len(routing.held)} rows but the forward has {batch}")
        carried = [{item[0] for item in row_items or ()} for row_items in routing.held]
        cached = cached_length(kwargs.get("cache", kwargs.get("past_key_values")))
        items = [] if cached else _held_items(routing.held, kwargs.get("attention_mask"), batch)
    else:  # a text batch
        items, carried = [], [set() for _ in range(batch)]
    routing.rows = {**_plan(carried, inputs.device), **dict.fromkeys(owner.everywhere)}  # lora_rows all: every row
    routing.batch = batch
    return args, (_insert(model, owner, kwargs, items) if items else kwargs)


def _plan(carried: list[set[str]], device: torch.device) -> dict[str, torch.Tensor | None]:
    """Modality -> the rows that carry it (None: all of them), by `multi.row_plan`'s grouping."""
    plan = {}
    for name in sorted(set().union(*carried)):
        for _, rows in row_plan([name if name in row else None for row in carried], device):
            plan[name] = rows
    return plan


def _batch_items(given: dict) -> list[tuple[int, str, int, torch.Tensor]]:
    """(row, modality, start, values) of every item in a batch's `{name}_values` / `{name}_positions`."""
    items = []
    for name, (values, positions) in given.items():
        if values is None or positions is None:
            continue
        for row, slot in (positions >= 0).nonzero().tolist():
            items.append((row, name, int(positions[row, slot]), values[row, slot]))
    return items


def _held_items(held: list, mask: torch.Tensor | None, batch: int) -> list[tuple[int, str, int, torch.Tensor]]:
    """The held items of a prompt pass, their starts moved past each row's padding (the first unmasked position)."""
    first = mask.long().argmax(dim=1).tolist() if mask is not None and mask.dim() == 2 else [0] * batch
    return [(row, name, first[row] + start, torch.as_tensor(values))
            for row, row_items in enumerate(held) for name, start, values in row_items or ()]


def _insert(model: nn.Module, owner: ModalityAdapter, kwargs: dict, items: list) -> dict:
    """`kwargs` with inputs_embeds holding each item's soft tokens at its positions (the input ids embedded first)."""
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        embeds = model.get_input_embeddings()(input_ids)  # (B, T, d), what the model would compute itself
    length = embeds.shape[1]
    for name in owner.branches:
        mine = [item for item in items if item[1] == name]
        if not mine:
            continue
        branch = owner.branches[name]
        values = torch.stack([item[3] for item in mine]).to(embeds.device)  # (n, *shape)
        soft = branch(values)  # (n, tokens, d)
        tokens = soft.shape[1]
        starts = torch.tensor([item[2] for item in mine], device=embeds.device)
        if int(starts.min()) < 0 or int(starts.max()) + tokens > length:
            raise AdapterError(f"a {name} item's {tokens} soft tokens do not fit its row of {length} positions "
                               f"(start {int(starts.max())})")
        rows = torch.tensor([item[0] for item in mine], device=embeds.device).repeat_interleave(tokens)
        positions = (starts[:, None] + torch.arange(tokens, device=embeds.device)).reshape(-1)
        embeds = embeds.index_put((rows, positions), soft.reshape(-1, soft.shape[-1]).to(embeds.dtype))
    kwargs["inputs_embeds"] = embeds
    return kwargs


# --- the modules -------------------------------------------------------------------------------------------------

class ModalityAdapter(nn.Module):
    """The model's `lorakit_modality` child: one branch (encoder + projector) per modality, and the routing."""

    def __init__(self, cfg: Modality, table: torch.Tensor, routing: Routing) -> None:
        super().__init__()
        gain = 1.0 if table.is_meta else float(table.detach().float().pow(2).mean().sqrt())  # the embeddings' RMS
        self.branches = nn.ModuleDict({name: ModalityBranch(name, spec, table.shape[1], gain)
                                       .to(adapter_dtype(table.dtype)) for name, spec in cfg.modalities.items()})
        self.routing = routing
        self.everywhere = [name for name, spec in cfg.modalities.items() if spec.lora_rows == "all" and spec.r]
        self.handles: list = []
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: no soft tokens, no LoRA


class ModalityBranch(nn.Module):
    """One modality's encoder and projector: (n, *shape) uint8 items -> (n, num_tokens, hidden) soft tokens."""

    def __init__(self, name: str, spec: ModalitySpec, hidden: int, gain: float) -> None:
        super().__init__()
        self.report_group = f"{name} encoder + projector"
        self.encoder = ImageEncoder(spec)
        self.projector = Projector(spec.width, hidden, spec.num_tokens, gain)
        self.shape = spec.slot().shape

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if tuple(values.shape[1:]) != self.shape:
            raise AdapterError(f"the encoder reads items of shape {self.shape}, got {tuple(values.shape[1:])}")
        return self.projector(self.encoder(values))


class ImageEncoder(nn.Module):
    """Patch embedding, learned positions and pre-norm transformer layers: (n, 3, H, W) uint8 -> (n, P, width)."""

    def __init__(self, spec: ModalitySpec) -> None:
        super().__init__()
        patches = (spec.image_size // spec.patch_size) ** 2
        self.patch = nn.Conv2d(3, spec.width, spec.patch_size, stride=spec.patch_size)
        self.position = nn.Parameter(torch.randn(patches, spec.width) * 0.02)  # (P, width)
        self.blocks = nn.ModuleList(EncoderBlock(spec.width, spec.heads) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.position.dtype) / 127.5 - 1.0  # [0, 255] -> [-1, 1]
        x = self.patch(x).flatten(2).transpose(1, 2) + self.position  # (n, P, width)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class EncoderBlock(nn.Module):
    """x + attention(norm(x)), then x + MLP(norm(x)) (pre-norm, as ViT)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # (n, heads, P, width / heads)
        x = x + self.out(attended.transpose(1, 2).reshape(n, length, width))
        return x + self.mlp(self.norm2(x))


class Projector(nn.Module):
    """(n, P, width) patch tokens -> (n, tokens, hidden): average-pooled to `tokens`, a two-layer MLP, then normalised
    and scaled by a trained gain that starts at the token embeddings' root mean square, so the soft tokens enter
    at the size of the embeddings the frozen LM knows (an unscaled start swamps its attention)."""

    def __init__(self, width: int, hidden: int, tokens: int, gain: float) -> None:
        super().__init__()
        self.tokens = tokens
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, hidden)
        self.gain = nn.Parameter(torch.tensor(float(gain)))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool1d(patches.transpose(1, 2), self.tokens).transpose(1, 2)  # (n, tokens, width)
        soft = self.down(F.gelu(self.up(pooled)))  # (n, tokens, hidden)
        return F.layer_norm(soft, soft.shape[-1:]) * self.gain


class RoutedLoRALayer(WrappedLayer):
    """y = base(x), plus s_m * B_m (A_m x) on the rows that carry modality m (index-added: other rows untouched)."""

    report_group: ClassVar[str] = "modality LoRA (base+A+B)"

    def __init__(self, base: nn.Module, routing: Routing) -> None:
        super().__init__()
        self.kind = self.wrap(base, "modality LoRA")
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()  # modality -> (r, d_in), (d_out, r)
        self.scaling: dict[str, float] = {}
        self.routing = routing
        self.adapter_enabled = True  # False inside adapters.dispatch.adapters_disabled: the base layer alone
        self.train(base.training)

    def add(self, name: str, spec: ModalitySpec, path: str) -> None:
        """Give modality `name` its own LoRA pair here (A Kaiming-uniform, B zero: the layer starts as the base)."""
        d_in, d_out = self.kind.dims(self.weight)
        if spec.r > min(d_in, d_out):
            raise AdapterError(f"method.modalities.{name}.r={spec.r} is larger than min(d_in, d_out) = "
                               f"{min(d_in, d_out)} of module {path!r}")
        factory = dict(device=self.weight.device, dtype=adapter_dtype(self.weight.dtype))
        self.lora_A[name] = nn.Parameter(init_lora_A_(torch.empty(spec.r, d_in, **factory)))
        self.lora_B[name] = nn.Parameter(torch.zeros(d_out, spec.r, **factory))
        self.scaling[name] = scaling(spec.alpha, spec.r, spec.rslora)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.kind.forward(x, self.weight, self.bias)  # (B, T, d_out)
        if not self.adapter_enabled:
            return result
        for name, rows in self.routing.rows.items():
            if name not in self.lora_A:
                continue
            if rows is not None and x.shape[0] != self.routing.batch:
                raise AdapterError(f"a modality LoRA routes whole rows, but {self.base_type.__name__} got an input "
                                   f"of shape {tuple(x.shape)} for a batch of {self.routing.batch} rows")
            A, B = self.lora_A[name], self.lora_B[name]
            part = x if rows is None else x.index_select(0, rows)
            if not torch.is_autocast_enabled(x.device.type):  # under autocast the matmuls cast x themselves
                part = part if part.dtype == A.dtype else part.to(A.dtype)
            delta = lora_branch(part, A, B, self.scaling[name]).to(result.dtype)
            result = result + delta if rows is None else result.index_add(0, rows, delta)
        return result

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{name}: r={A.shape[0]}" for name, A in self.lora_A.items())
        return f"base={self.base_type.__name__}, {ranks}"
