"""The method configs: what a run config's `method:` section holds, one dataclass per method.

These classes are torch-free, so the CLI lists and checks every field without importing torch.
Each field is declared once with `schema.setting` (default, doc, range); `Config` coerces and
checks it the same way for YAML, the command line and Python. Each class names its
implementation module (`implementation`), which holds the method's whole story and the functions
of `registry.CONTRACT`; `cfg.apply(model)` and `lorakit.apply(model, cfg)` reach it on first use.
A new method is a config class here plus its implementation module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from lorakit import dtypes
from lorakit.adapters.registry import METHODS, implementation, register_method
from lorakit.media import KINDS, MediaSlot
from lorakit.schema import Config, setting

PLACEMENTS = {"attention": ("attention",), "mlp": ("mlp",), "both": ("attention", "mlp")}

__all__ = ["METHODS", "Bottleneck", "DoRA", "Full", "LoRA", "MoLE", "MethodConfig", "Modality", "ModalitySpec",
           "PromptTuning", "QLoRA"]


class MethodConfig(Config):
    """What every method config shares: its registry name, its implementation, its output folder."""

    section: ClassVar[str] = "method"
    name: ClassVar[str]
    implementation: ClassVar[str]  # the module that implements registry.CONTRACT for this method
    output: ClassVar[str] = "adapter"  # the run folder's output: an adapter folder, or (full) a model

    def apply(self, model: Any) -> Any:
        """Apply this method to `model` in place (see the implementation module); returns the model."""
        return implementation(self).apply(self, model)

    def media_slots(self) -> dict[str, MediaSlot]:
        """What the data must reserve for each non-text item a row carries, by modality (none: text only)."""
        return {}


@register_method
@dataclass
class Full(MethodConfig):
    """Full fine-tuning: all weights train (the baseline every adapter method is compared with)."""

    name: ClassVar[str] = "full"
    implementation: ClassVar[str] = "lorakit.adapters.full"
    output: ClassVar[str] = "model"


def _target_problems(targets: str | list[str], target_parameters: list[str]) -> list[tuple[str, str]]:
    specs = [targets] if isinstance(targets, str) else targets
    if not (specs or target_parameters) or not all(specs):
        return [("targets", "must be a module name, a pattern, 'all-linear' or a non-empty list of them")]
    return []


@dataclass
class LowRank(MethodConfig):
    """The fields every low-rank update B A shares (LoRA and its variants, and each expert of MoLE)."""

    r: int = setting(8, "Rank of the update B A; each target layer trains r * (d_in + d_out) numbers (per "
                        "expert for MoLE).", gt=0)
    alpha: float = setting(16.0, "Scale numerator: the update is multiplied by s = alpha / r (alpha / sqrt(r) "
                                 "with rslora).", gt=0)
    targets: str | list[str] = setting(
        "all-linear", "Modules to adapt: names, dotted suffixes, regexes (full match), a list of those, or "
                      "'all-linear' (LoRA: [] adapts parameters only, see target_parameters).")
    rslora: bool = setting(False, "Rank-stabilised scaling s = alpha / sqrt(r) (Kalajdzievski 2023, "
                                  "arXiv:2312.03732).")


@register_method
@dataclass
class LoRA(LowRank):
    """Low-rank adaptation (Hu et al. 2021, arXiv:2106.09685): W' = W + s * B A on target layers."""

    name: ClassVar[str] = "lora"
    implementation: ClassVar[str] = "lorakit.adapters.lora"
    folder_type: ClassVar[str] = "LORA"  # adapter_config.json's peft_type (DoRA folders too: use_dora)

    target_parameters: list[str] = setting(
        factory=list, doc="Parameters to adapt directly, as peft's target_parameters: names or dotted suffixes such "
                          "as 'experts.gate_up_proj', for MoE experts stored as 3-D tensors (one LoRA pair per "
                          "expert); needs dropout 0.")
    dropout: float = setting(0.0, "Dropout probability on the LoRA branch's input (training only); 0 disables it.",
                             ge=0, lt=1)
    bias: Literal["none", "all", "lora_only"] = setting(
        "none", "Biases that train: none, all biases of the model, or only those of the adapted layers.")
    modules_to_save: list[str] = setting(
        factory=list, doc="Modules trained in full (as copies) and saved with the adapter, e.g. ['lm_head'].")
    init: Literal["kaiming", "gaussian"] = setting(
        "kaiming", "Init of A: Kaiming-uniform (peft's default) or Gaussian with std 1/r; B always starts at 0.")

    def problems(self) -> list[tuple[str, str]]:
        """Targets (or target_parameters) must name something; target_parameters is LoRA's alone, without dropout."""
        problems = _target_problems(self.targets, self.target_parameters)
        if not all(self.target_parameters) or not all(self.modules_to_save):
            problems.append(("target_parameters" if not all(self.target_parameters) else "modules_to_save",
                             "must not hold an empty name"))
        if self.target_parameters and self.name != "lora":
            problems.append(("target_parameters", f"is supported by method lora only, not {self.name}"))
        elif self.target_parameters and self.dropout:
            problems.append(("dropout", "must be 0 with target_parameters: dropout on the input of a parameter's "
                                        "product cannot be expressed (peft has the same rule)"))
        return problems


@register_method
@dataclass
class DoRA(LoRA):
    """Weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353): W' = m * (W + s B A) / ||W + s B A||.

    Same fields as LoRA; each target layer also trains d_out magnitudes.
    """

    name: ClassVar[str] = "dora"
    implementation: ClassVar[str] = "lorakit.adapters.lora"  # LoRA's contract with DoRALayer (math: dora.py)


@register_method
@dataclass
class QLoRA(LoRA):
    """LoRA on a base whose linear layers are stored in 4 bits (Dettmers et al. 2023, arXiv:2305.14314)."""

    name: ClassVar[str] = "qlora"
    implementation: ClassVar[str] = "lorakit.adapters.qlora"

    quant_type: Literal["nf4", "fp4"] = setting(
        "nf4", "4-bit data type of the base weights: NormalFloat4 (the paper's, for normally distributed weights) "
               "or FP4.")
    double_quant: bool = setting(True, "Quantise the per-block absmax scales to 8 bits too (saves ~0.37 bits per "
                                       "weight, paper section 3).")
    compute_dtype: str = setting(
        "bf16", f"dtype in which the base weights are dequantised and multiplied: {dtypes.accepted()}; fp16 for "
                "GPUs without bf16. LoRA's A and B stay fp32.", choices=dtypes.CANONICAL)

    def __post_init__(self) -> None:
        object.__setattr__(self, "compute_dtype", dtypes.spelled(self.compute_dtype))  # bfloat16 -> bf16, ...
        super().__post_init__()


@register_method
@dataclass
class PromptTuning(MethodConfig):
    """Prompt tuning: n learned virtual-token embeddings in front of every input; the base is frozen."""

    name: ClassVar[str] = "prompt_tuning"
    implementation: ClassVar[str] = "lorakit.adapters.prompt_tuning"
    folder_type: ClassVar[str] = "PROMPT_TUNING"  # adapter_config.json's peft_type

    num_virtual_tokens: int = setting(20, "n: virtual tokens prepended to each row; n * d numbers train (d = "
                                          "embedding size).", gt=0)
    init_from: Literal["random", "text"] = setting(
        "random", "Start of the virtual tokens: random (normal, with the std of the input embeddings) or the "
                  "embeddings of init_text's tokens, repeated or cut to n (Lester et al.'s text init).")
    init_text: str | None = setting(None, "Text whose token embeddings start the prompt when init_from is 'text'.")
    tokenizer_name_or_path: str | None = setting(
        None, "Tokenizer for init_text (default: the model's own name_or_path).")

    def problems(self) -> list[tuple[str, str]]:
        """Text init needs its text."""
        if self.init_from == "text" and not self.init_text:
            return [("init_text", "must be a non-empty text when init_from is 'text'")]
        return []


@register_method
@dataclass
class Bottleneck(MethodConfig):
    """Houlsby bottleneck adapters after the attention and/or MLP sub-block of each decoder layer."""

    name: ClassVar[str] = "bottleneck"
    implementation: ClassVar[str] = "lorakit.adapters.bottleneck"
    folder_type: ClassVar[str] = "bottleneck"  # adapter_config.json's lorakit_method

    size: int = setting(16, "Bottleneck width: each adapter trains 2 * size * d + size + d numbers (d = hidden "
                            "size).", gt=0)
    placement: Literal["attention", "mlp", "both"] = setting(
        "both", "Which sub-blocks get an adapter after them: attention, mlp, or both (Houlsby's choice).")
    activation: Literal["relu", "gelu", "silu", "tanh"] = setting(
        "relu", "The nonlinearity f between the down- and up-projection.")
    init_scale: float = setting(0.01, "Std of the normal init of W_down (Houlsby: near-zero); W_up and both "
                                      "biases start at 0.", ge=0)


@register_method
@dataclass
class MoLE(LowRank):
    """Mixture of LoRA experts: k LoRA pairs per target layer and a per-token softmax router."""

    name: ClassVar[str] = "mole"
    implementation: ClassVar[str] = "lorakit.adapters.mole"
    folder_type: ClassVar[str] = "mole"  # adapter_config.json's lorakit_method

    num_experts: int = setting(4, "k: LoRA experts per target layer; each layer trains k * r * (d_in + d_out) + "
                                  "k * d_in numbers.", gt=0)
    top_k: int | None = setting(None, "Keep only the top_k gates per token and renormalise them; None mixes all "
                                      "k experts.", ge=1)
    router_init: Literal["zeros", "normal"] = setting(
        "zeros", "Router weights at start: zeros (uniform gates) or normal with std 0.02.")
    aux_loss_weight: float = setting(0.01, "Weight of the load-balancing loss added to the training loss (0 "
                                           "disables it).", ge=0)

    def problems(self) -> list[tuple[str, str]]:
        """Targets must name something; top_k cannot exceed the experts."""
        problems = _target_problems(self.targets, [])
        if self.top_k is not None and self.top_k > self.num_experts:
            problems.append(("top_k", f"must be between 1 and num_experts={self.num_experts}"))
        return problems


@dataclass
class ModalitySpec(Config):
    """One modality of a modality adapter: its encoder (trained from scratch), projector and LoRA."""

    section: ClassVar[str] = "method.modalities"

    kind: Literal["image"] = setting("image", "How an item is read and encoded: image (RGB, resized to image_size "
                                              "squared; a patch embedding and transformer layers).")
    image_size: int = setting(32, "Side of the square each image is resized to, in pixels.", gt=0)
    patch_size: int = setting(8, "Side of a square patch: the encoder sees (image_size / patch_size)^2 patch tokens.",
                              gt=0)
    width: int = setting(64, "Encoder width (patch-token size).", gt=0)
    depth: int = setting(2, "Encoder transformer layers.", ge=0)
    heads: int = setting(4, "Attention heads per encoder layer (width must be a multiple).", gt=0)
    num_tokens: int = setting(16, "Soft tokens each item becomes in the LM's input, in place of its placeholder "
                                  "(at most the number of patches; patches are average-pooled down to it).", gt=0)
    r: int = setting(8, "Rank of this modality's LoRA on the LM, active only for rows that carry the modality; 0: "
                        "no LoRA (the projector's soft tokens alone carry the modality).", ge=0)
    alpha: float = setting(16.0, "LoRA scale numerator: s = alpha / r (alpha / sqrt(r) with rslora).", gt=0)
    targets: str | list[str] = setting("all-linear", "LM modules this modality's LoRA adapts (as LoRA's targets).")
    rslora: bool = setting(False, "Rank-stabilised LoRA scaling s = alpha / sqrt(r).")
    lora_rows: Literal["modality", "all"] = setting(
        "modality", "Rows this modality's LoRA reaches: modality (only rows that carry it: text rows stay the base "
                    "model exactly) or all (a LoRA shared by every row, text rows included: an ablation baseline).")

    def problems(self) -> list[tuple[str, str]]:
        """Patches must tile the image, heads the width, and the soft tokens fit the patches."""
        patches = (self.image_size // self.patch_size) ** 2
        if self.image_size % self.patch_size:
            return [("patch_size", f"must divide image_size={self.image_size}")]
        if self.width % self.heads:
            return [("heads", f"must divide width={self.width}")]
        if self.num_tokens > patches:
            return [("num_tokens", f"must be at most the {patches} patches of a {self.image_size}px image "
                                   f"(patch_size {self.patch_size})")]
        return _target_problems(self.targets, [])

    def slot(self) -> MediaSlot:
        """What the data reserves for one item: num_tokens positions, an RGB image_size^2 array."""
        return MediaSlot(self.num_tokens, (3, self.image_size, self.image_size), self.kind)


@register_method
@dataclass
class Modality(MethodConfig):
    """Per-modality adapters (the Phi-4-multimodal pattern): for each modality an encoder trained from scratch, a
    projector to the LM's hidden size whose soft tokens replace each placeholder (`<image>`), and a LoRA on the
    frozen LM that is active only for rows that carry that modality, so text rows compute the base model exactly."""

    name: ClassVar[str] = "modality"
    implementation: ClassVar[str] = "lorakit.adapters.modality"
    folder_type: ClassVar[str] = "modality"  # adapter_config.json's lorakit_method
    routed: ClassVar[bool] = True  # active per row by what the row carries: named adapters may sit beside it

    modalities: dict[str, ModalitySpec] = setting(
        factory=lambda: {"image": ModalitySpec()},
        doc="Modality name -> its encoder, projector and LoRA settings, e.g. {image: {image_size: 32, num_tokens: 16, "
            "r: 8}}. A name is its placeholder (<image>) and its rows' column (images or image); several "
            f"modalities each get their own encoder and LoRA. Kinds: {', '.join(KINDS)}.")

    def problems(self) -> list[tuple[str, str]]:
        """At least one modality, each named as a placeholder can be."""
        if not self.modalities:
            return [("modalities", "must name at least one modality, e.g. {image: {}}")]
        bad = [name for name in self.modalities if not name.isidentifier() or not name.islower()]
        if bad:
            return [("modalities", f"names must be lowercase identifiers (they become <{bad[0]}> and column "
                                   f"{bad[0]}s), got {bad[0]!r}")]
        return []

    def media_slots(self) -> dict[str, MediaSlot]:
        """Each modality's slot: num_tokens positions per item, and the decoded item's shape."""
        return {name: spec.slot() for name, spec in self.modalities.items()}
