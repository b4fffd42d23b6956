"""A per-GPU memory estimate for one trainer stage, from the model's shapes alone (no weights loaded).

Counted, in bytes per GPU: the base weights (dtype, nf4/int8 packing, ZeRO-3/FSDP sharding, offload),
the LoRA adapter with its gradients and optimiser states (ZeRO sharding, optimiser offload), the
activations at the stage's sequence length and micro-batch (with or without activation checkpointing),
the logits and the loss, and DeepSpeed's communication buffers. The CUDA context is listed apart because
PyTorch's allocator (max_memory_allocated) does not see it. It is an estimate: `scripts/bench/` compares
it with measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from finetune.distributed.config import shards_weights, zero_settings
from finetune.recipe import LoraSection

if TYPE_CHECKING:
    from finetune.recipe import Recipe

GIB = 1024**3
CUDA_CONTEXT = 0.5 * GIB  # driver context + cuBLAS/cuDNN workspaces, outside PyTorch's allocator
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + double-quantised absmax per 64-block
LOGPROB_TILE = (4096, 32768)  # tokens x vocabulary per tile of TRL's fused LM head (trl/kernels/chunked_logprob.py)
FUSED_HEAD_STAGES = ("sft",)  # stages whose TRL trainer projects the LM head in tiles (logits never exist whole)
HOST_PER_PROCESS = 2 * GIB  # a training process's own host memory (libraries, data, pinned buffers)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool

    @property
    def linear_params(self) -> int:
        """Weights of the attention and MLP projections (what nf4/int8 quantize)."""
        attention = self.hidden * self.heads * self.head_dim * 2 + self.hidden * self.kv_heads * self.head_dim * 2
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def other_params(self) -> int:
        """Embeddings, the LM head when untied, and the norms (kept in the compute dtype)."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * 2 * self.hidden + self.hidden


def model_shape(config: dict[str, Any] | None) -> Shape | None:
    """The shape from a model's config.json, or None when it is not a decoder-only transformer we know."""
    try:
        heads = config["num_attention_heads"]
        return Shape(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            intermediate=config["intermediate_size"],
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError):
        return None


@dataclass
class Estimate:
    """Bytes per GPU while a stage trains, by part; the loading peak; host memory per node for offload."""

    stage: str
    parts: dict[str, float]
    load_peak: float = 0.0  # the whole quantized model on every GPU before DeepSpeed shards it
    host_per_node: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def training(self) -> float:
        return sum(self.parts.values())

    @property
    def total(self) -> float:
        """The peak: training, or loading when that is higher; with the CUDA context."""
        return max(self.training, self.load_peak + CUDA_CONTEXT)

    @property
    def allocated(self) -> float:
        """What PyTorch's allocator should report as its peak (the total without the CUDA context)."""
        return self.total - CUDA_CONTEXT


def estimate(
    recipe: Recipe, config: Any, world_size: int, gpus_per_node: int, shape: Shape, bf16: bool = True
) -> Estimate:
    """Memory per GPU for one trainer stage of `recipe` on `world_size` processes (`gpus_per_node` per node)."""
    section, model, lora = recipe.distributed, recipe.model, recipe.lora
    zero = zero_settings(section)
    sharded = shards_weights(section)
    quantized = model.quantization != "none"
    fsdp_offload = section.strategy == "fsdp" and section.offload_params == "cpu"
    precision = config.precision if section.mixed_precision == "auto" else section.mixed_precision
    half = precision in ("bf16", "fp16") or (precision == "auto" and bf16)
    act_bytes = 2 if half else 4
    weight_bytes = {"float32": 4, "bfloat16": 2, "float16": 2}.get(model.dtype, 2 if bf16 else 4)
    notes: list[str] = []

    # base weights: quantized projections, the rest in the compute dtype (fp32 after kbit preparation)
    other_bytes = 4 if quantized and not sharded else weight_bytes
    linear_bytes = {"nf4": NF4_BYTES, "int8": 1.0}.get(model.quantization, weight_bytes)
    full = shape.linear_params * linear_bytes + shape.other_params * other_bytes
    layer = shape.linear_params * linear_bytes / max(shape.layers, 1)
    offload_params = (zero is not None and zero.offload_params != "none") or fsdp_offload
    own_shard = 0 if offload_params else full / world_size
    weights = 2 * layer + own_shard if sharded else full  # sharded: own slice + two layers gathered for use
    copies = config.models_in_memory()
    if copies > 1:  # e.g. rlhf: the reward model is a second copy of the base (not sharded: it only scores)
        weights += (copies - 1) * full
        notes.append(
            f"{config.stage_name}: {copies} copies of the base model in memory (the policy and the reward model)"
        )

    # the adapter, its gradients and optimiser states (only LoRA trains)
    trainable = estimate_lora_parameters(_config_dict(shape), lora) or 0
    adapter_bytes = 2 if quantized or (zero is not None and zero.stage == 3) else 4
    optimizer_bytes = _optimizer_bytes(config.optimizer)
    if zero is not None and adapter_bytes == 2:
        optimizer_bytes += 4  # DeepSpeed keeps an fp32 master copy of 16-bit trainable weights
    grad_shard = world_size if (zero is not None and zero.stage >= 2) or section.strategy == "fsdp" else 1
    optimizer_shard = world_size if zero is not None or section.strategy == "fsdp" else 1
    offload_optimizer = (zero is not None and zero.offload_optimizer != "none") or fsdp_offload
    adapter = trainable * adapter_bytes / (world_size if sharded else 1)
    gradients = trainable * adapter_bytes / grad_shard
    optimizer = 0.0 if offload_optimizer else trainable * optimizer_bytes / optimizer_shard

    # activations and logits for one micro-batch
    seq_len = config.sequence_length()
    if seq_len is None:
        seq_len = 1024
        notes.append(f"{config.stage_name}: no sequence length option; assumed 1024 tokens")
    tokens = config.batch_size * seq_len * config.sequences_per_example
    kv_dim = shape.kv_heads * shape.head_dim
    per_layer = tokens * (6 * shape.hidden + 2 * kv_dim + 4 * shape.intermediate) * act_bytes
    if lora.dropout > 0:
        per_layer += tokens * (5 * shape.hidden + shape.intermediate) * act_bytes  # dropout copies of adapter inputs
    if model.attention == "eager":
        per_layer += 2 * tokens * shape.heads * seq_len * act_bytes  # attention scores and probabilities
    checkpointing = config.gradient_checkpointing in (True, "auto")  # auto is on wherever there is a GPU
    activations = (
        (shape.layers * tokens * shape.hidden * act_bytes + per_layer) if checkpointing else shape.layers * per_layer
    )
    if config.kind in FUSED_HEAD_STAGES:  # one fp32 tile of logits and its gradient, and the fp32 hidden states
        rows, columns = LOGPROB_TILE
        logits = min(tokens, rows) * min(shape.vocab, columns) * 4 * 2 + tokens * shape.hidden * 4
    else:
        logits = tokens * shape.vocab * (act_bytes + 8)  # logits, their fp32 copy for the loss, its gradient
        if getattr(config, "reads", None) == "output":  # debias: the adversary's fp32 probabilities and gradient
            logits += tokens * shape.vocab * 8

    parts = {
        "weights": weights,
        "adapter": adapter,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": activations,
        "logits": logits,
    }
    if zero is not None:
        parts["buffers"] = 4 * min(shape.hidden**2, max(trainable, 1)) * 2
    parts["cuda_context"] = CUDA_CONTEXT

    host = 0.0
    if offload_optimizer:
        host += trainable * (optimizer_bytes + 4) / optimizer_shard * gpus_per_node  # states + fp32 gradients
    if offload_params:
        host += full / world_size * gpus_per_node
    if host:
        host += HOST_PER_PROCESS * gpus_per_node
    load_peak = full if quantized and zero is not None and zero.stage == 3 else 0.0
    if load_peak:
        notes.append(
            "nf4 + ZeRO-3: transformers loads the whole quantized model on every GPU before DeepSpeed "
            "shards it (no zero.Init for quantized weights, DeepSpeed #5660)"
        )
    return Estimate(config.stage_name, parts, load_peak, host, notes)


def _optimizer_bytes(name: str) -> float:
    """Optimiser state bytes per trainable parameter."""
    name = name.lower()
    if "8bit" in name:
        return 2
    if name.startswith("sgd") or "adafactor" in name:
        return 0
    return 8  # Adam-family: two fp32 moments


def _config_dict(shape: Shape) -> dict[str, int]:
    return {
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "intermediate_size": shape.intermediate,
    }


def gib(value: float) -> str:
    """Bytes as GiB with two decimals (or MiB below 0.1 GiB)."""
    return f"{value / GIB:.2f} GiB" if value >= 0.1 * GIB or value == 0 else f"{value / 1024**2:.1f} MiB"


def estimate_lora_parameters(config: dict, section: LoraSection) -> int | None:
    """LoRA parameters for a decoder-only transformer config, from its shapes alone."""
    try:
        hidden = config["hidden_size"]
        layers = config["num_hidden_layers"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or hidden // heads
        inter = config["intermediate_size"]
    except (KeyError, TypeError):
        return None
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    names = shapes if section.targets == "all-linear" else [t for t in section.targets if t in shapes]
    per_layer = sum(section.r * (shapes[n][0] + shapes[n][1]) for n in names)
    if section.variant == "dora":
        per_layer += sum(shapes[n][1] for n in names)
    return per_layer * layers
