"""Training-memory estimate: weights, gradients, optimizer state, activations.

The inputs are a method's count on the model's skeleton (`params.method_count`: its config, the
trainable numbers, the base's size) and the model's sizes (`shapes.ModelShape`):

    weights      every parameter in its storage dtype (QLoRA, `method.name == "qlora"`: the
                 all-linear layers in 4-bit NF4, 0.5 byte + double-quantised block constants,
                 the rest in 16 bits), plus the adapters in the trainable dtype
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
                   LoRA             + r per adapted layer (A x), from the applied skeleton
                                    (DoRA and QLoRA as LoRA; what bottleneck and MoLE
                                    adapters save themselves is not counted)
                 plus the loss: logits, their log-softmax and its gradient, (B, T, V) each.
                 Gradient checkpointing keeps only each layer's input (h per token) and
                 recomputes one layer at a time in the backward pass, after the loss tensors
                 are freed: the peak holds the larger of one layer's activations and the loss's.
Framework overhead (CUDA context, allocator fragmentation, kernels' workspaces) is not counted.

Preference tuning (train.objective dpo or ipo) adds the reference model's memory (`reference_bytes`, one figure
per train.reference choice): adapters_off none (the same weights with the adapter switched off); copy the
initial trainable weights once more (the whole model for full fine-tuning; the adapter for one started from a
trained adapter); precomputed none on the device and about PRECOMPUTED_BYTES_PER_PAIR of host memory per pair,
for one reference pass over the data before training. A micro-batch of B pairs holds 2B rows (its activations
are those of batch 2B); the reference pass runs without gradients and saves no activations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from lorakit import dtypes
from lorakit.analysis.shapes import ModelShape
from lorakit.errors import ConfigError

if TYPE_CHECKING:
    from lorakit.analysis.params import MethodCount

GB = 1e9
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values + fp8 absmax per 64 + fp32 per 256 blocks
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw-8bit": 2.0, "sgd": 0.0}
LOSS_COPIES = 3  # logits, log-softmax output, gradient of the logits
PRECOMPUTED_BYTES_PER_PAIR = 250  # two rows of train/preference.py's table: a 16-byte key and a float, in a dict


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
    return dtypes.BYTES[dtypes.canonical(dtype)]


def weight_bytes(count: MethodCount, setup: TrainingSetup) -> float:
    """The model's weights (+ adapter weights) in memory."""
    base = count.total * _bytes(setup.weight_dtype)
    if count.method.name == "full":
        return base
    if count.method.name == "qlora":
        base = count.linear_params * NF4_BYTES + (count.total - count.linear_params) * 2
    return base + count.trainable * _bytes(setup.trainable_dtype)


def gradient_bytes(count: MethodCount, setup: TrainingSetup) -> float:
    """One gradient per trainable parameter."""
    dtype = setup.weight_dtype if count.method.name == "full" else setup.trainable_dtype
    return count.trainable * _bytes(dtype)


def optimizer_bytes(count: MethodCount, setup: TrainingSetup) -> float:
    """Optimizer state (+ fp32 master weights when asked for)."""
    if setup.optimizer not in OPTIMIZER_BYTES:
        raise ConfigError(f"unknown optimizer {setup.optimizer!r}; expected one of {', '.join(OPTIMIZER_BYTES)}")
    per_param = OPTIMIZER_BYTES[setup.optimizer] + (4.0 if setup.master_weights else 0.0)
    return count.trainable * per_param


def layer_activation_elements(shape: ModelShape, count: MethodCount) -> float:
    """Elements autograd saves per token in one decoder layer (see the module docstring); the LoRA
    branches' r per adapted layer is spread evenly over the layers."""
    h, i = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    attention = 3 * h + 3 * q_dim + 2 * kv_dim + shape.num_heads
    mlp = 3 * h + (4 * i if shape.gated_mlp else 2 * i)
    return attention + mlp + count.rank_sum / shape.num_layers


def activation_bytes(shape: ModelShape, count: MethodCount, setup: TrainingSetup) -> float:
    """Saved activations of one micro-batch, plus the loss's (B, T, V) tensors."""
    virtual = count.method.num_virtual_tokens if count.method.name == "prompt_tuning" else 0
    tokens = setup.batch_size * (setup.seq_len + virtual)
    per_layer = layer_activation_elements(shape, count) * _bytes(setup.activation_dtype)
    loss = LOSS_COPIES * shape.vocab_size * 4  # the loss runs in fp32
    if setup.gradient_checkpointing:
        layer_inputs = shape.num_layers * shape.hidden_size * _bytes(setup.activation_dtype)
        return tokens * (layer_inputs + max(per_layer, loss))
    return tokens * (shape.num_layers * per_layer + loss)


def estimate(shape: ModelShape, count: MethodCount, setup: TrainingSetup) -> MemoryEstimate:
    """The memory estimate of training `count.method` on the model of `shape` with `setup`."""
    return MemoryEstimate(weights=weight_bytes(count, setup), gradients=gradient_bytes(count, setup),
                          optimizer=optimizer_bytes(count, setup), activations=activation_bytes(shape, count, setup))


def reference_bytes(count: MethodCount, setup: TrainingSetup) -> dict[str, float | None]:
    """Device memory a dpo or ipo run's reference model adds, per train.reference choice (None: not available;
    see the module docstring). precomputed also keeps PRECOMPUTED_BYTES_PER_PAIR of host memory per pair."""
    full = count.method.name == "full"
    copy = count.total * _bytes(setup.weight_dtype) if full else count.trainable * _bytes(setup.trainable_dtype)
    return {"adapters_off": None if full else 0.0, "copy": copy, "precomputed": 0.0}
