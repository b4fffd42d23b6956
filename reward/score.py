"""Scoring answers with a trained reward model: per dimension and the weighted total, in batches.

    scorer = RewardScorer.from_stage("runs/quickstart-.../reward")
    scorer.score(["《静夜思》的作者是谁？"], ["李白，唐代诗人。"])
    # {"accuracy": [...], "cultural_value": [...], "safety": [...], "fluency": [...], "total": [...]}

Used by the RLHF stage (rewards), the alignment suite, and `wenmai reward score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from finetune.data.pairs import TOTAL
from finetune.data.preference import Prompt, prompt_messages, split_transcript, transcript_messages
from finetune.data.records import MAX_LISTED_PROBLEMS, iter_raw
from finetune.errors import DataError
from reward.data import encode_response
from reward.model import RewardModelCard, find_reward_model, load_reward_model


class RewardScorer:
    """A reward model ready to score (prompt, response) pairs."""

    def __init__(self, model: Any, tokenizer: Any, card: RewardModelCard):
        self.model = model
        self.tokenizer = tokenizer
        self.card = card

    @classmethod
    def from_stage(cls, folder: str | Path, stage: str | None = None) -> RewardScorer:
        """Load from a reward stage folder, its `reward_model/` folder, or a run folder (`stage` picks one of several)."""
        model, tokenizer, card = load_reward_model(find_reward_model(folder, stage))
        return cls(model, tokenizer, card)

    @property
    def dimensions(self) -> list[str]:
        return self.card.names

    def score(
        self, prompts: Sequence[str | list[dict]], responses: Sequence[str], batch_size: int = 8
    ) -> dict[str, list[float]]:
        """Scores per dimension and the weighted total for each (prompt, response); a prompt is text or chat messages."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        rows = [
            encode_response(self.tokenizer, prompt_messages(p), r, self.card.seq_len)[0]
            for p, r in zip(prompts, responses, strict=True)
        ]
        rewards = self._forward(rows, batch_size)
        weights = [d.weight for d in self.card.dimensions]
        totals = [sum(w * x for w, x in zip(weights, row, strict=True)) / sum(weights) for row in rewards]
        scores = {name: [row[i] for row in rewards] for i, name in enumerate(self.dimensions)}
        scores[TOTAL] = totals
        return scores

    def score_transcripts(self, transcripts: Sequence[str], batch_size: int = 8) -> dict[str, list[float]]:
        """Scores for hh-rlhf style transcripts, each split after its last `\\n\\nAssistant:`."""
        split = [split_transcript(t) for t in transcripts]
        return self.score([transcript_messages(p) for p, _ in split], [r for _, r in split], batch_size)

    def _forward(self, rows: list[list[int]], batch_size: int) -> list[list[float]]:
        import torch

        pad_id = self.tokenizer.pad_token_id
        device = next(self.model.parameters()).device
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths together: less padding
        out: list[list[float]] = [[] for _ in rows]
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = [rows[i] for i in order[start : start + batch_size]]
                width = max(len(r) for r in batch)
                ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in batch], device=device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch], device=device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float().cpu()
                for i, row in zip(order[start : start + batch_size], logits.tolist(), strict=True):
                    out[i] = row
        return out


class ScoreInput(BaseModel):
    """A line of `wenmai reward score --input`: `prompt` + `response`, or `messages` ending with the answer."""

    model_config = ConfigDict(extra="allow")
    prompt: Prompt | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None

    @model_validator(mode="after")
    def _one_shape(self) -> ScoreInput:
        if self.messages is not None:
            incomplete = [i for i, m in enumerate(self.messages) if not {"role", "content"} <= m.keys()]
            if incomplete:
                raise ValueError(f"messages[{incomplete[0]}] needs a `role` and a `content`")
            if not self.messages or self.messages[-1]["role"] != "assistant":
                raise ValueError("`messages` must end with the assistant answer to score")
        elif self.prompt is None or self.response is None:
            raise ValueError("give `prompt` and `response`, or `messages` ending with an assistant turn")
        return self

    def as_pair(self) -> tuple[list[dict], str]:
        if self.messages is not None:
            return self.messages[:-1], self.messages[-1]["content"]
        prompt = self.prompt if isinstance(self.prompt, str) else [m.model_dump() for m in self.prompt]
        return prompt_messages(prompt), self.response or ""


def read_score_inputs(path: Path) -> list[dict]:
    """Records to score from a JSONL/JSON/Parquet/CSV file, each checked (file:line on problems)."""

    records, bad = [], []
    for where, raw in iter_raw(Path(path)):
        if isinstance(raw, Exception):
            bad.append(f"{where}: {raw}")
            continue
        try:
            item = ScoreInput.model_validate(raw)
        except ValidationError as err:
            bad.append(f"{where}: " + "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors()))
            continue
        records.append({"raw": raw, "pair": item.as_pair()})
    if bad:
        more = f"\n  ... and {len(bad) - MAX_LISTED_PROBLEMS} more" if len(bad) > MAX_LISTED_PROBLEMS else ""
        raise DataError(f"{len(bad)} bad line(s) in {path}:\n  - " + "\n  - ".join(bad[:MAX_LISTED_PROBLEMS]) + more)
    if not records:
        raise DataError(f"{path}: nothing to score")
    return records


def score_file(
    folder: str | Path, input_path: str | Path, stage: str | None = None, batch_size: int = 8
) -> tuple[list[dict], list[str]]:
    """Score every record of `input_path`: (records with a `scores` mapping added, the score names in order)."""
    model_folder = find_reward_model(folder, stage)
    records = read_score_inputs(Path(input_path))
    scorer = RewardScorer.from_stage(model_folder)
    scores = scorer.score([r["pair"][0] for r in records], [r["pair"][1] for r in records], batch_size)
    names = [*scorer.dimensions, TOTAL]
    return [{**r["raw"], "scores": {n: round(scores[n][i], 5) for n in names}} for i, r in enumerate(records)], names
