"""The reward stage's training examples: pairs on one prompt and two responses merged, one label per head.

Pairs come from `finetune.data.pairs`; here they become examples that score each response once for all
dimensions (`training_examples`), and (prompt, response) becomes token ids ending where the reward is read
(`encode_response`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from finetune.data.chat import render
from finetune.data.pairs import TOTAL, PreferencePair
from finetune.data.preference import prompt_key


def slot_names(dimensions: Sequence[str]) -> list[str]:
    """The reward model's label slots: one per dimension, plus the weighted total when there are several."""
    return list(dimensions) if len(dimensions) == 1 else [*dimensions, TOTAL]


def training_examples(pairs: Iterable[PreferencePair], dimensions: Sequence[str]) -> list[dict]:
    """Merge pairs on the same prompt and responses into examples with one label per slot.

    An example scores responses `a` and `b` once; `preference[slot]` is +1 when `a` is better on that slot,
    -1 when `b` is, 0 when the slot is unlabelled (masked in the loss); `margin[slot]` goes with it.
    """
    slots = slot_names(dimensions)
    examples: list[dict] = []
    open_examples: dict[tuple, list[dict]] = defaultdict(list)
    for pair in pairs:
        slot = 0 if len(slots) == 1 else slots.index(pair.dimension or TOTAL)
        key = (prompt_key(pair.prompt), frozenset((pair.chosen, pair.rejected)))
        example = next((e for e in open_examples[key] if e["preference"][slot] == 0), None)
        if example is None or len(slots) == 1:
            example = {
                "prompt": pair.prompt,
                "a": pair.chosen,
                "b": pair.rejected,
                "prompt_key": key[0],
                "preference": [0.0] * len(slots),
                "margin": [0.0] * len(slots),
            }
            examples.append(example)
            open_examples[key].append(example)
        example["preference"][slot] = 1.0 if pair.chosen == example["a"] else -1.0
        example["margin"][slot] = pair.margin
    return examples


def encode_response(tokenizer: Any, prompt: list[dict], response: str, seq_len: int) -> tuple[list[int], bool]:
    """Token ids of prompt + response through the chat template, ending at the end-of-turn token the reward is read at.

    Longer sequences lose their beginning (the response and its end stay); returns (ids, truncated).
    """
    text = render(tokenizer, [*prompt, {"role": "assistant", "content": response}]).rstrip()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return (ids[-seq_len:], True) if len(ids) > seq_len else (ids, False)
