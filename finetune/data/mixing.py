"""Mixing several training datasets by weight (`datasets: {a: 0.7, b: 0.3}` on an sft stage).

Each dataset is read and tokenized through the one data path (`tokenize_records`: policy, PII, dedup, the
tokenised cache), then a draw takes from each exactly its share of the records (largest remainder), shuffled
together. `datasets.interleave_datasets` picks each record's source at random, so 1,000 records drawn at
0.7/0.3 land on 700 +/- 14 (one standard deviation) for the first; here they land on 700. The strategies keep
its names: `first_exhausted` draws as many as the ratios allow without repeating a record, `all_exhausted`
draws until every record was used, repeating the smaller shares.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetune.data import TokenizedSet, tokenize_records
from finetune.data.card import DataCard, read_card, write_card
from finetune.data.chat import IGNORE_INDEX
from finetune.distributed.ranks import is_main_process
from finetune.recipe import Recipe
from finetune.run_dir import utc_now


class MixShare(BaseModel):
    """One dataset's part of a mixture, as the data card shows it."""

    dataset: str
    weight: float = Field(description="Normalised weight asked for.")
    available: int = Field(description="Sequences the dataset gave after the data layer and tokenising.")
    drawn: int = Field(description="Sequences drawn from it (more than available: records repeat).")
    share: float = Field(description="drawn / all drawn.")


def quotas(weights: dict[str, float], sizes: dict[str, int], strategy: str, samples: int | None) -> dict[str, int]:
    """How many sequences to draw from each dataset: exactly its share of the total (largest remainder)."""
    total = sum(weights.values())
    weights = {n: w / total for n, w in weights.items()}
    if samples is None:
        per_unit = [sizes[n] / w for n, w in weights.items()]
        samples = math.floor(min(per_unit) if strategy == "first_exhausted" else math.ceil(max(per_unit)))
    exact = {n: samples * w for n, w in weights.items()}
    counts = {n: math.floor(x) for n, x in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: samples - sum(counts.values())]:
        counts[name] += 1
    return counts


def mix_rows(
    rows: dict[str, list[Any]], weights: dict[str, float], strategy: str, samples: int | None, seed: int
) -> tuple[list[Any], list[MixShare]]:
    """Draw each dataset's quota (without repeats until a dataset runs out, then again in a new order) and shuffle."""
    rng = random.Random(seed)
    total = sum(weights.values())
    weights = {n: w / total for n, w in weights.items()}
    counts = quotas(weights, {n: len(r) for n, r in rows.items()}, strategy, samples)
    mixed: list[Any] = []
    for name, count in counts.items():
        pool = rows[name]
        drawn: list[Any] = []
        while len(drawn) < count and pool:
            order = rng.sample(range(len(pool)), len(pool))
            drawn += [pool[i] for i in order[: count - len(drawn)]]
        mixed += drawn
    rng.shuffle(mixed)
    total = len(mixed) or 1
    shares = [
        MixShare(
            dataset=n,
            weight=round(w, 6),
            available=len(rows[n]),
            drawn=counts[n] if rows[n] else 0,
            share=round((counts[n] if rows[n] else 0) / total, 6),
        )
        for n, w in weights.items()
    ]
    return mixed, shares


def tokenize_mixture(
    recipe: Recipe,
    weights: dict[str, float],
    tokenizer: Any,
    seq_len: int,
    assistant_only: bool,
    stage_dir: Path | None,
    strategy: str,
    samples: int | None,
    seed: int,
    cache_dir: str | Path | None = None,
) -> TokenizedSet:
    """Tokenize every dataset of the mixture (through the tokenised cache when given) and draw from them by weight;
    the mixture goes on the data card."""
    sets = {n: tokenize_records(recipe, n, tokenizer, seq_len, assistant_only, stage_dir, cache_dir) for n in weights}
    rows, shares = mix_rows({n: s.rows for n, s in sets.items()}, weights, strategy, samples, seed)
    stats: dict[str, Any] = {}
    for one in sets.values():
        for key, value in one.stats.items():
            if isinstance(value, int):
                stats[key] = stats.get(key, 0) + value
    stats["token_cache"] = {n: s.stats.get("token_cache") for n, s in sets.items()}
    stats["sequences"] = len(rows)
    stats["tokens"] = sum(len(r["input_ids"]) for r in rows)
    stats["learned_tokens"] = sum(1 for r in rows for label in r["labels"] if label != IGNORE_INDEX)
    stats["mixture"] = {s.dataset: s.drawn for s in shares}
    if stage_dir is not None and is_main_process():
        record_mixture(Path(stage_dir), shares, strategy)
    return TokenizedSet(rows, stats)


def record_mixture(stage_dir: Path, shares: list[MixShare], strategy: str) -> None:
    """Put the mixture on the stage's data card (JSON and markdown)."""
    card = read_card(stage_dir) or DataCard(stage=stage_dir.name, updated=utc_now())
    card.mixture = {"strategy": strategy, "shares": [s.model_dump() for s in shares]}
    card.updated = utc_now()
    write_card(stage_dir, card)
