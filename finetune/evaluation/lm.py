"""Batched inference for evaluation: log-likelihoods of continuations and greedy generation.

Prompts are rendered through the tokenizer's chat template and batched with left padding (explicit
position ids), longest first, so a padded batch scores exactly what each prompt scores alone. When the
sequences of a call share a long token prefix (the few-shot examples of a subject), it is run once and
its key/value cache reused for every batch. Prompts longer than `max_length` lose their earliest tokens
(few-shot examples first); callers count them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from finetune.data.chat import end_of_turn_ids, render
from finetune.errors import DataError

MIN_SHARED_PREFIX = 32  # tokens; a shorter common prefix is not worth a cache


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    """The chat-template text up to the start of the assistant's reply."""
    return render(tokenizer, messages, add_generation_prompt=True)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text (the template already holds any special tokens it needs)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def too_long(tokenizer: Any, prompt: str, max_length: int) -> bool:
    """Whether a rendered prompt has more tokens than `max_length` (it will lose its earliest ones)."""
    return len(encode(tokenizer, prompt)) > max_length


def choice_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    choices: tuple[str, ...],
    batch_size: int = 8,
    max_length: int = 2048,
    desc: str = "",
    share_prefix: bool = True,
) -> tuple[list[list[float]], int]:
    """For each prompt, the log-likelihood of each choice as the reply's start; and how many were truncated."""
    encoded = [encode(tokenizer, p) for p in prompts]
    continuations = [
        [continuation_ids(tokenizer, p, ids, c) for c in choices] for p, ids in zip(prompts, encoded, strict=True)
    ]
    truncated = sum(len(ids) + max(map(len, row)) > max_length for ids, row in zip(encoded, continuations, strict=True))
    if all(len(c) == 1 for row in continuations for c in row):
        # one forward pass per prompt: the next-token distribution holds every choice
        targets = [[c[0] for c in row] for row in continuations]
        rows = _forward(
            model,
            tokenizer,
            encoded,
            1,
            batch_size,
            max_length,
            desc,
            lambda logprobs, i: logprobs[-1, targets[i]].tolist(),
            share_prefix,
        )
        return rows, truncated
    flat = [ids + c for ids, row in zip(encoded, continuations, strict=True) for c in row]
    lengths = [len(c) for row in continuations for c in row]
    sums = _forward(
        model,
        tokenizer,
        flat,
        max(lengths) + 1,
        batch_size,
        max_length,
        desc,
        lambda logprobs, i: _continuation_sum(logprobs, flat[i], lengths[i]),
        share_prefix,
    )
    k = len(choices)
    return [sums[j : j + k] for j in range(0, len(sums), k)], truncated


def mean_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    replies: list[str],
    batch_size: int = 8,
    max_length: int = 2048,
    desc: str = "",
) -> list[float]:
    """Mean log-probability per token of each fixed reply after its prompt."""
    sequences, lengths = [], []
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = encode(tokenizer, prompt)
        reply_ids = continuation_ids(tokenizer, prompt, ids, reply)
        sequences.append(ids + reply_ids)
        lengths.append(len(reply_ids))
    sums = _forward(
        model,
        tokenizer,
        sequences,
        max(lengths) + 1,
        batch_size,
        max_length,
        desc,
        lambda logprobs, i: _continuation_sum(logprobs, sequences[i], lengths[i]),
    )
    return [s / n for s, n in zip(sums, lengths, strict=True)]


def continuation_ids(tokenizer: Any, prompt: str, prompt_ids: list[int], text: str) -> list[int]:
    """The tokens `text` adds after `prompt`, tokenized in context (as the model would produce them)."""
    full = encode(tokenizer, prompt + text)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return full[len(prompt_ids) :]
    return encode(tokenizer, text)


def stop_token_ids(tokenizer: Any) -> list[int]:
    """EOS and the template's end-of-turn token, so a reply stops where the model learned to stop."""

    try:
        return end_of_turn_ids(tokenizer)
    except DataError:
        return [tokenizer.eos_token_id]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int = 2048,
    desc: str = "",
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Greedy replies (no sampling: the same checkpoint always gives the same answer); `stop_ids` default to the
    tokenizer's end-of-turn ids."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids or stop_token_ids(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
    )
    keep = max(1, max_length - max_new_tokens)
    encoded = [encode(tokenizer, p)[-keep:] for p in prompts]
    replies: list[str] = [""] * len(prompts)
    with torch.inference_mode(), _progress(len(prompts), desc) as bar:
        for batch in _batches(encoded, batch_size):
            ids, mask = _left_pad([encoded[i] for i in batch], tokenizer.pad_token_id)
            output = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for row, i in enumerate(batch):
                text = tokenizer.decode(output[row, ids.shape[1] :], skip_special_tokens=True)
                replies[i] = text.strip().rstrip("\ufffd")  # a reply cut at max_new_tokens may end inside a character
            bar.update(len(batch))
    return replies


# --- helpers -------------------------------------------------------------------------------


def _forward(
    model: Any,
    tokenizer: Any,
    sequences: list[list[int]],
    keep: int,
    batch_size: int,
    max_length: int,
    desc: str,
    pick: Callable[[Any, int], Any],
    share_prefix: bool = True,
) -> list:
    """Run `sequences` in left-padded batches; `pick(logprobs of the last `keep` positions, index)` per sequence."""
    import torch

    sequences = [s[-max_length:] for s in sequences]
    shared = _shared_prefix(sequences, keep) if share_prefix else 0
    results: list = [None] * len(sequences)
    with torch.inference_mode(), _progress(len(sequences), desc) as bar:
        prefix_cache = (
            model(input_ids=torch.tensor([sequences[0][:shared]]), use_cache=True).past_key_values if shared else None
        )
        for batch in _batches(sequences, batch_size):
            ids, mask = _left_pad([sequences[i][shared:] for i in batch], tokenizer.pad_token_id)
            positions = (mask.cumsum(-1) - 1).clamp(min=0) + shared
            cached: dict[str, Any] = {"use_cache": False}
            if prefix_cache is not None:  # the prefix's keys/values, once per row; its mask is all ones
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(batch))
                cached = {"past_key_values": cache, "use_cache": True}
                mask = torch.cat([torch.ones((len(batch), shared), dtype=mask.dtype), mask], dim=1)
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, **cached
            ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(batch):
                results[i] = pick(logprobs[row], i)
            bar.update(len(batch))
    return results


def _shared_prefix(sequences: list[list[int]], keep: int) -> int:
    """Length of the token prefix all sequences share, leaving each at least `keep` tokens of its own."""
    if len(sequences) < 2:
        return 0
    first = sequences[0]
    length = min(len(s) for s in sequences) - keep
    for sequence in sequences[1:]:
        length = min(length, next((j for j, (a, b) in enumerate(zip(first, sequence, strict=False)) if a != b), length))
    return length if length >= MIN_SHARED_PREFIX else 0


def _continuation_sum(logprobs: Any, sequence: list[int], length: int) -> float:
    """Sum of log-probs of the last `length` tokens; logprobs[-1] predicts the token after the sequence."""
    total = 0.0
    for j in range(length):
        token = sequence[len(sequence) - length + j]
        total += float(logprobs[-length - 1 + j, token])
    return total


def _batches(sequences: list[list[int]], batch_size: int) -> list[list[int]]:
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))  # similar lengths share a batch
    return [order[j : j + batch_size] for j in range(0, len(order), batch_size)]


def _left_pad(rows: list[list[int]], pad_id: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc or None, leave=False, disable=None, unit="seq")
