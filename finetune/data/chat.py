"""Rendering records through the chat template, with labels on assistant tokens only.

No library does this for arbitrary templates: transformers' `return_assistant_tokens_mask` needs
`{% generation %}` markers that most templates lack. We render the conversation, find each assistant
turn's characters by rendering its prefixes (the turn's end token included, so the model learns to
stop), and label the tokens whose characters fall inside those spans.
"""

from __future__ import annotations

from typing import Any

from finetune.errors import DataError

IGNORE_INDEX = -100


def to_messages(record: dict, fmt: str, system_prompt: str | None = None) -> list[dict]:
    """A chat or instruction record as a list of {role, content} messages."""
    if fmt == "chat":
        messages = [{"role": m["role"], "content": m["content"]} for m in record["messages"]]
    elif fmt == "instruction":
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise ValueError(f"format {fmt!r} has no messages")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def render(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(
    tokenizer: Any, messages: list[dict], end_of_turn: str | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) characters of each assistant turn, end-of-turn included.

    `end_of_turn`: the token that ends an assistant turn (the model zoo's `model.end_of_turn`). A template that
    writes none after the assistant's text (GLM-4 starts the next turn with `<|user|>`, which is also what
    generation stops at) gets it counted from the next turn, or appended after the last one, so the model
    learns to stop.
    """
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(
                "the chat template renders a conversation differently from its prefixes (it rewrites earlier turns, "
                "or its generation prompt starts the answer with text the assistant turn lacks, e.g. DeepSeek-R1's "
                "`<think>`), so assistant turns cannot be located; give assistant turns that text (reasoning "
                "models: `<think>...</think>` before the answer) or set `model.chat_template` to a template "
                "without that behaviour"
            )
        end = len(through.rstrip())  # keep the end-of-turn token, drop the newline after it
        if end_of_turn and not _ends_with_added_token(tokenizer, through[:end]):
            if text[end:].startswith(end_of_turn):
                end += len(end_of_turn)
            elif not text[end:].strip():  # the last turn: nothing follows it
                text = text[:end] + end_of_turn + text[end:]
                end += len(end_of_turn)
        spans.append((len(before), max(end, len(before))))
    return text, spans


def tokenize_chat(
    tokenizer: Any, messages: list[dict], assistant_only: bool = True, end_of_turn: str | None = None
) -> dict[str, list[int]]:
    """input_ids and labels; labels are IGNORE_INDEX outside assistant turns when `assistant_only`."""
    text, spans = assistant_spans(tokenizer, messages, end_of_turn)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = list(encoded["input_ids"])
    if not assistant_only:
        return {"input_ids": input_ids, "labels": list(input_ids)}
    labels = [IGNORE_INDEX] * len(input_ids)
    for t, (start, end) in enumerate(encoded["offset_mapping"]):
        if end > start and any(start < s_end and end > s_start for s_start, s_end in spans):
            labels[t] = input_ids[t]
    return {"input_ids": input_ids, "labels": labels}


def tokenize_text(tokenizer: Any, text: str) -> dict[str, list[int]]:
    """Plain text, all tokens learned, EOS appended so the model learns where text ends."""
    input_ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return {"input_ids": input_ids, "labels": list(input_ids)}


def end_of_turn_ids(tokenizer: Any, end_of_turn: str | None = None) -> list[int]:
    """Token ids that end an assistant turn under this template (EOS and the template's own marker).

    `end_of_turn` (the recipe's `model.end_of_turn`) must be the token the template ends an assistant turn with.
    """
    probe = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi there."}]
    try:
        result = tokenize_chat(tokenizer, probe, end_of_turn=end_of_turn)
    except DataError:  # a reasoning template opens the answer with <think>: probe with an (empty) reasoning block
        probe[1]["content"] = "<think>\n\n</think>\n\nHi there."
        result = tokenize_chat(tokenizer, probe, end_of_turn=end_of_turn)
    learned = [i for i, label in zip(result["input_ids"], result["labels"], strict=True) if label != IGNORE_INDEX]
    declared = end_of_turn is not None and learned and tokenizer.convert_tokens_to_ids(end_of_turn) == learned[-1]
    if not learned or not (declared or learned[-1] in set(tokenizer.all_special_ids)):
        raise DataError(
            "the chat template does not end an assistant turn with a special token, so the model would never learn "
            "to stop; set `model.chat_template` to one that does (e.g. `chatml`)"
        )
    if end_of_turn is not None and tokenizer.convert_tokens_to_ids(end_of_turn) != learned[-1]:
        raise DataError(
            f"model.end_of_turn: {end_of_turn!r} is not the token the chat template ends an assistant turn with "
            f"({tokenizer.convert_ids_to_tokens(learned[-1])!r}); fix model.end_of_turn or model.chat_template"
        )
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids | {learned[-1]})


def _ends_with_added_token(tokenizer: Any, text: str) -> bool:
    """Whether `text` ends with one of the tokenizer's special or added tokens (a template's own end-of-turn)."""
    return any(text.endswith(token) for token in tokenizer.get_added_vocab())
