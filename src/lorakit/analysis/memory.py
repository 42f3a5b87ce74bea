"""Training-memory estimate: weights, gradients, optimizer state, activations.

    weights      every parameter in its storage dtype (QLoRA: 4-bit NF4 linear layers,
                 0.5 byte + double-quantised block constants, the rest in 16 bits)
    gradients    one per trainable parameter, in the trainable dtype
    optimizer    AdamW keeps m and v per trainable parameter: 8 bytes in fp32, 2 bytes with an
                 8-bit optimizer (Dettmers et al. 2022), 0 without state (plain SGD); mixed
                 precision adds an fp32 master copy (4 bytes) of each 16-bit trainable weight
    activations  what autograd saves for the backward pass, per token and layer, counted op by
                 op for an eager PyTorch decoder with fused (SDPA/flash) attention:
                   attention block  3h (norm in, normed, norm out) + q, k, v after RoPE
                                    + attention output + its reshaped copy (o_proj input)
                   gated MLP        3h + 4i (gate, up, silu(gate), silu(gate) * up);
                   plain MLP        3h + 2i (fc out, activation out)
                   LoRA             + r per target layer (A x)
                 plus the loss: logits, their log-softmax and its gradient, (B, T, V) each.
                 Gradient checkpointing keeps only each layer's input (h per token) and
                 recomputes one layer at a time in the backward pass, after the loss tensors
                 are freed: the peak holds the larger of one layer's activations and the loss's.
Framework overhead (CUDA context, allocator fragmentation, kernels' workspaces) is not counted.
"""
from __future__ import annotations

from dataclasses import dataclass

from lorakit.analysis.params import MethodSpec, target_linears, trainable_count
from lorakit.analysis.shapes import ModelShape
from lorakit.errors import ConfigError

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + fp8 absmax per 64 + fp32 per 256 blocks
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw-8bit": 2.0, "sgd": 0.0}
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
LOSS_COPIES = 3  # logits, log-softmax output, gradient of the logits


@dataclass(frozen=True)
class TrainingSetup:
    """How a run trains: what memory depends on besides the model and the method."""

    batch_size: int = 1
    seq_len: int = 2048
    weight_dtype: str = "bf16"  # storage of the frozen (or all, for full) weights
    trainable_dtype: str = "fp32"  # adapters' weights and gradients (full: the weights' own dtype)
    activation_dtype: str = "bf16"
    optimizer: str = "adamw"  # adamw (fp32 m+v), adamw-8bit, sgd (no state)
    master_weights: bool = False  # fp32 copy of 16-bit trainable weights (mixed-precision full FT)
    gradient_checkpointing: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per component; `total` is their sum."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        """Sum of the four parts."""
        return self.weights + self.gradients + self.optimizer + self.activations


def _bytes(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def weight_bytes(shape: ModelShape, spec: MethodSpec, setup: TrainingSetup) -> float:
    """The model's weights (+ adapter weights) in memory."""
    trainable = trainable_count(shape, spec)
    base = shape.total_params * _bytes(setup.weight_dtype)
    if spec.name == "full":
        return base
    if spec.name == "qlora":
        linear = shape.num_layers * shape.layer_linear_params
        base = linear * NF4_BYTES + (shape.total_params - linear) * 2
    return base + trainable * _bytes(setup.trainable_dtype)


def gradient_bytes(shape: ModelShape, spec: MethodSpec, setup: TrainingSetup) -> float:
    """One gradient per trainable parameter."""
    dtype = setup.weight_dtype if spec.name == "full" else setup.trainable_dtype
    return trainable_count(shape, spec) * _bytes(dtype)


def optimizer_bytes(shape: ModelShape, spec: MethodSpec, setup: TrainingSetup) -> float:
    """Optimizer state (+ fp32 master weights when asked for)."""
    if setup.optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {setup.optimizer!r}; expected one of {', '.join(OPTIMIZER_BYTES)}")
    per_param = OPTIMIZER_BYTES[setup.optimizer] + (4.0 if setup.master_weights else 0.0)
    return trainable_count(shape, spec) * per_param


def layer_activation_elements(shape: ModelShape, spec: MethodSpec) -> int:
    """Elements autograd saves per token in one decoder layer (see the module docstring)."""
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention = 3 * h + 3 * q_dim + 2 * kv_dim + shape.num_heads
    mlp = 3 * h + (4 * i if shape.gated_mlp else 2 * i)
    lora = spec.r * len(target_linears(shape, spec.targets)) if spec.name in ("lora", "qlora", "dora") else 0
    return attention + mlp + lora


def activation_bytes(shape: ModelShape, spec: MethodSpec, setup: TrainingSetup) -> float:
    """Saved activations of one micro-batch, plus the loss's (B, T, V) tensors."""
    tokens = setup.batch_size * (setup.seq_len + (spec.num_virtual_tokens if spec.name == "prompt_tuning" else 0))
    per_layer = layer_activation_elements(shape, spec) * _bytes(setup.activation_dtype)
    loss = LOSS_COPIES * shape.vocab_size * 4  # the loss runs in fp32
    if setup.gradient_checkpointing:
        layer_inputs = shape.num_layers * shape.hidden_size * _bytes(setup.activation_dtype)
        return tokens * (layer_inputs + max(per_layer, loss))
    return tokens * (shape.num_layers * per_layer + loss)


def estimate(shape: ModelShape, spec: MethodSpec, setup: TrainingSetup) -> MemoryEstimate:
    """The memory estimate of training `spec` on `shape` with `setup`."""
    return MemoryEstimate(weights=weight_bytes(shape, spec, setup), gradients=gradient_bytes(shape, spec, setup),
                          optimizer=optimizer_bytes(shape, spec, setup),
                          activations=activation_bytes(shape, spec, setup))
