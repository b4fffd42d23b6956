"""Choosing the micro-batch and the activation checkpointing from a memory estimate.

A stage's global batch per device (`batch_size` x `gradient_accumulation`) is fixed by the recipe; how it
is split into micro-batches, and which layers recompute their activations, only changes speed and
memory. `choose` tries every split and checkpointing choice, keeps those whose estimate fits the budget,
and picks the cheapest by a simple cost model: recomputing a layer costs half its LoRA step (forward 2N,
input-gradient backward 2N, recompute another 2N), and a micro-batch of few tokens under-fills the GPU.
The estimate comes from `finetune.distributed.memory` (`footprint` turns it into per-token parts);
`scripts/bench/sft_speed.py` prints it beside the measured peak.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from finetune.distributed.config import shards_weights
from finetune.distributed.memory import LOGPROB_TILE, Shape, estimate
from finetune.recipe import Recipe, StageOptions

MODES = ("off", "selective", "full", "offload")
# Tokens per micro-batch at which a LoRA step runs at half its full-GPU speed, for a 2048-wide model (cost model).
# Measured on an H200 (scripts/bench/gpu_owed.sh, 2026-11-29, Llama-3.2-1B shape, seq 2048): micro-batch 1 without
# checkpointing ran at 15.6k tokens/s, plain HF at micro-batch 4 with full checkpointing at 30.3k; solving
# (1 + F/2048) = 1.94 x 1.5 x (1 + F/8192) gives F = 14k. The first guess, 512, made the planner pick micro-batch 1
# and run at half HF's speed. The fixed cost per step (kernel launches, Python) is paid whatever the width, while a
# token's work grows with hidden^2: `fill_tokens` scales F by (2048 / hidden)^2 (a model, not yet measured on 8B).
FILL_TOKENS = 14_000
FILL_WIDTH = 2048
OFFLOAD_COST = 1.1  # host copies of the checkpointed activations, on the compute stream
# Measured activations over memory.py's per-layer formula: the plain transformers + PEFT rows on an H100
# (Llama-3-8B, LoRA r 16, seq 2048: 31 GiB with checkpointing at batch 4, 58 GiB without at batch 2) need ~1.8x
# (fp32 RMSNorm copies, PEFT's per-adapter input casts). scripts/bench/sft_speed.py prints estimate and peak.
ACTIVATION_CALIBRATION = 1.8


@dataclass(frozen=True)
class Footprint:
    """Bytes one stage needs on one GPU: a fixed part and per-token parts that scale with the micro-batch."""

    fixed: float  # weights, adapter, its gradients and optimiser states, buffers, CUDA context
    layer_per_token: float  # activations one decoder layer keeps per token without checkpointing
    boundary_per_token: float  # what a checkpointed layer keeps per token (its input)
    head_per_token: float  # LM head and loss working memory per token
    head_tokens_cap: int | None  # the head works on at most this many tokens at once (None: all)
    layers: int

    def bytes(self, tokens: int, mode: str, every: int = 1) -> float:
        """Peak bytes for a micro-batch of `tokens` tokens with checkpointing `mode` (every `every`-th layer)."""
        one_layer = self.layer_per_token * tokens  # the layer being recomputed or run in full
        if mode == "off":
            activations = self.layers * one_layer
        elif mode == "offload":  # checkpointed inputs live in host memory; two in flight
            activations = 2 * self.boundary_per_token * tokens + one_layer
        else:
            kept = checkpointed_layers(self.layers, mode, every)
            activations = kept * self.boundary_per_token * tokens + (self.layers - kept) * one_layer + one_layer
        head_tokens = tokens if self.head_tokens_cap is None else min(tokens, self.head_tokens_cap)
        return self.fixed + activations + self.head_per_token * head_tokens


@dataclass(frozen=True)
class Choice:
    """A micro-batch split and a checkpointing choice, with its estimated peak and relative cost per token."""

    batch_size: int
    accumulation: int
    checkpointing: str
    every: int
    bytes: float
    cost: float
    fits: bool


def choose(
    footprint: Footprint,
    tokens_per_example: int,
    global_batch: int,
    budget: float,
    modes: tuple[str, ...] = MODES,
    batch_sizes: list[int] | None = None,
    every: int | None = None,
    fill: float = FILL_TOKENS,
) -> Choice:
    """The cheapest (micro-batch, checkpointing) that fits `budget` bytes and keeps `global_batch` examples per step.

    `batch_sizes`: the micro-batches to try (default: every divisor of `global_batch`); `every`: a fixed
    selective stride (default: try them all); `fill`: the cost model's half-speed micro-batch in tokens (see
    `fill_tokens`). When nothing fits, the smallest-memory choice, marked `fits=False`.
    """
    candidates = []
    for batch in batch_sizes or divisors(global_batch):
        tokens = batch * tokens_per_example
        for mode in modes:
            for stride in _strides(mode, footprint.layers, every):
                need = footprint.bytes(tokens, mode, stride)
                cost = recompute_cost(footprint.layers, mode, stride) * (1 + fill / tokens)
                candidates.append(Choice(batch, global_batch // batch, mode, stride, need, cost, need <= budget))
    fitting = [c for c in candidates if c.fits]
    if fitting:  # cheapest; then fewer micro-batches; then less memory
        return min(fitting, key=lambda c: (round(c.cost, 6), c.accumulation, c.bytes))
    return min(candidates, key=lambda c: (c.bytes, c.cost))


def fill_tokens(hidden: int) -> float:
    """The cost model's half-speed micro-batch, in tokens, for a model `hidden` wide (see FILL_TOKENS)."""
    return FILL_TOKENS * (FILL_WIDTH / max(hidden, 1)) ** 2


def recompute_cost(layers: int, mode: str, every: int = 1) -> float:
    """Relative time of a LoRA step: 1 without checkpointing, 1.5 when every layer runs its forward twice."""
    if mode == "off":
        return 1.0
    share = checkpointed_layers(layers, mode, every) / layers
    return (1 + 0.5 * share) * (OFFLOAD_COST if mode == "offload" else 1.0)


def checkpointed_layers(layers: int, mode: str, every: int = 1) -> int:
    """Layers that recompute: all for full/offload, every `every`-th (from the first) for selective."""
    if mode == "off":
        return 0
    if mode == "selective":
        return math.ceil(layers / max(every, 1))
    return layers


def divisors(n: int) -> list[int]:
    """Every divisor of `n`, ascending."""
    return [d for d in range(1, n + 1) if n % d == 0]


def _strides(mode: str, layers: int, every: int | None) -> list[int]:
    if mode != "selective":
        return [1]
    if every is not None:
        return [every]
    return list(range(2, max(layers, 2) + 1))


def footprint(
    recipe: Recipe,
    config: Any,
    shape: Shape,
    world_size: int = 1,
    bf16: bool = True,
    head: str = "full",
    liger: bool = False,
    qlora_upcast: bool = True,
) -> Footprint:
    """Per-token memory parts of a trainer stage, from `finetune.distributed.memory.estimate`.

    `head`: full (whole logits over the vocabulary), fused (TRL's SFTTrainer projects the LM head in tiles, so
    logits never exist whole), or none (a score head: a few numbers per sequence).
    `liger`: Liger's SwiGLU and RMSNorm keep less per layer. `qlora_upcast`: nf4/int8 norms and embeddings
    are upcast to fp32 (PEFT's `prepare_model_for_kbit_training`); without it they stay in the compute dtype.
    """
    one = config.model_copy(update={"batch_size": 1, "gradient_checkpointing": False})
    plain = estimate(recipe, one, world_size, world_size, shape, bf16)
    checkpointed = estimate(
        recipe, one.model_copy(update={"gradient_checkpointing": True}), world_size, world_size, shape, bf16
    )
    tokens = tokens_per_example(config)
    act_bytes = 2 if bf16 and config.precision != "fp32" else 4
    layer = ACTIVATION_CALIBRATION * plain.parts["activations"] / (shape.layers * tokens)
    if liger:  # SwiGLU keeps gate and up, not silu(gate); each RMSNorm keeps its 16-bit input, not an fp32 copy
        layer -= (shape.intermediate + 2 * shape.hidden) * act_bytes
    boundary = max(
        checkpointed.parts["activations"] / tokens - plain.parts["activations"] / (shape.layers * tokens), 0.0
    )
    boundary /= shape.layers
    fixed = plain.training - plain.parts["activations"] - plain.parts["logits"]
    if recipe.model.quantization != "none" and not qlora_upcast and not shards_weights(recipe.distributed):
        kept = {"float32": 4, "bfloat16": 2, "float16": 2}.get(recipe.model.dtype, 2 if bf16 else 4)
        fixed -= shape.other_params * (4 - kept)  # norms and embeddings stay in the compute dtype, not fp32
    if head == "fused":
        rows, columns = LOGPROB_TILE
        per_token, cap = min(shape.vocab, columns) * 4 * 2 + shape.hidden * 4, rows
    elif head == "none":
        per_token, cap = 0.0, None
    else:
        per_token, cap = plain.parts["logits"] / tokens, None
    return Footprint(fixed, layer, boundary, per_token, cap, shape.layers)


def tokens_per_example(config: StageOptions) -> int:
    """Tokens in one training example: its sequence length (1024 when the stage has none) times its sequences."""
    return (config.sequence_length() or 1024) * config.sequences_per_example
