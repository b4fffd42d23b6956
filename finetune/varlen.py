"""Padding-free attention on a GPU without the flash-attn package: PyTorch's own varlen flash attention
(`torch.nn.attention.varlen`), registered as a transformers attention implementation.

TRL's padding-free collator flattens a micro-batch into one row and sends the sequence boundaries
(`cu_seq_lens_q/k`, `max_length_q/k`) with every forward; transformers hands them to the attention function,
which runs each sequence on its own, in one kernel. Calls without them (padded evaluation batches,
generation) go to SDPA unchanged; the mask is SDPA's, so those stay exact.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

ATTENTION = "wenmai_varlen"


def varlen_kernel() -> Callable | None:
    """PyTorch's varlen attention function, or None where this PyTorch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def use(model: Any) -> None:
    """Register the implementation with transformers and switch `model` (before PEFT wraps it) to it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION, attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION, sdpa_mask)
    model.set_attn_implementation(ATTENTION)


def attention_forward(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention interface: (batch, heads, tokens, dim) inputs, (batch, tokens, heads, dim) output."""
    cu_q = kwargs.get("cu_seq_lens_q")
    if cu_q is None or query.shape[0] != 1:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    cu_k = kwargs.get("cu_seq_lens_k")
    cu_k = cu_q if cu_k is None else cu_k
    max_q = int(kwargs.get("max_length_q") or (cu_q[1:] - cu_q[:-1]).max())
    max_k = int(kwargs.get("max_length_k") or max_q)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (query, key, value))  # (tokens, heads, dim)
    out = run_kernel(varlen_kernel(), q, k, v, cu_q.int(), cu_k.int(), max_q, max_k, scaling, causal)
    return out.unsqueeze(0), None


def run_kernel(
    kernel: Callable,
    q: Any,
    k: Any,
    v: Any,
    cu_q: Any,
    cu_k: Any,
    max_q: int,
    max_k: int,
    scale: float | None,
    causal: bool,
) -> Any:
    """Call `varlen_attn` whichever way this PyTorch spells causality and grouped-query attention."""
    params = _parameters(kernel)
    extra: dict[str, Any] = {}
    if "window_size" in params:  # PyTorch >= 2.12: causal is the window (-1, 0)
        extra["window_size"] = (-1, 0) if causal else (-1, -1)
    elif "is_causal" in params:
        extra["is_causal"] = causal
    elif causal:
        raise RuntimeError("this PyTorch's varlen_attn has no causal mode; set speed.padding_free: off")
    if "enable_gqa" in params and k.shape[1] != q.shape[1]:
        extra["enable_gqa"] = True  # older versions take fewer key/value heads as they are (flash does GQA natively)
    return kernel(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, **extra)


@functools.cache
def _parameters(kernel: Callable) -> frozenset[str]:
    """The kernel's parameter names, read once: `run_kernel` runs in every attention layer of every step."""
    return frozenset(inspect.signature(kernel).parameters)
