"""Preference data as pairs, the one home of what the reward, DPO-family and RLHF stages share.

Every preference format becomes `PreferencePair`s (prompt conversation, chosen, rejected, the dimension
it judges or None for the weighted total, and a margin):
- `pairs` records are pairs already (hh-rlhf transcripts are split by the data path);
- `ratings` become pairs per dimension by comparing responses to the same prompt (`ratings_to_pairs`);
- `tiers` become every cross-tier pair (`tiers_to_pairs`).
Pairs are then deduplicated (`deduplicate`) and held out by prompt (`hold_out`, `split_by_prompt`), so no
prompt is in both the training and the evaluation set.
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetune.data import load_records
from finetune.data.preference import prompt_key, prompt_messages
from finetune.errors import DataError
from finetune.recipe import Recipe, RewardDimension, reward_dimensions

TOTAL = "total"


class PreferencePair(BaseModel):
    """One judgement: `chosen` is better than `rejected` as an answer to `prompt` (on `dimension`, or overall)."""

    prompt: list[dict[str, str]] = Field(..., description="The conversation answered, as chat messages.")
    chosen: str
    rejected: str
    dimension: str | None = Field(None, description="The dimension judged; None means the weighted total.")
    margin: float = Field(0.0, ge=0, description="How much better: a score difference, a tier distance, or given.")


@dataclass
class PairSet:
    """The pairs of one dataset and what happened on the way (counts for the stage summary)."""

    pairs: list[PreferencePair]
    stats: dict[str, Any] = field(default_factory=dict)


def load_pairs(recipe: Recipe, name: str, stage_dir: Path | None = None, on: str | None = None) -> PairSet:
    """The recipe's dataset `name` (pairs, ratings or tiers) as preference pairs, with counts.

    Records pass the data layer first (policy, PII scrubbing); given a stage folder, its data card is written there.
    `on` is what the pairs judge: None, every dimension (the reward stage); `total`, ratings compared on the
    weighted total (DPO); a dimension name, ratings compared on it and other dimensions' pairs left out.
    """
    section = recipe.data[name]
    records = load_records(recipe, name, stage_dir)
    report = records.report
    stats: dict[str, Any] = {"records": len(records.records), "skipped_bad_records": len(records.skipped)}
    if report is not None:
        stats.update(
            excluded_by_policy=sum(report.excluded.values()),
            duplicates_removed=sum(report.duplicates.values()),
            pii_masked=sum(report.pii_found.values()) if report.pii_action == "mask" else 0,
        )
    if section.record_format == "pairs":
        pairs = pairs_from_records(records.records)
    elif section.record_format == "ratings":
        dimensions = reward_dimensions(recipe)
        pairs = ratings_to_pairs(records.records, dimensions, on=on, where=section.location)
        stats["ties_dropped"] = _tie_counts(records.records, [d.name for d in dimensions])
        stats["rater_agreement"] = rater_agreement(records.records, [d.name for d in dimensions])
    elif section.record_format == "tiers":
        pairs = tiers_to_pairs(records.records, section.tier_order or [])
    else:
        raise DataError(
            f"dataset {name!r} has format {section.record_format!r}; preference data is pairs, ratings or tiers"
        )
    if on not in (None, TOTAL):
        kept = [p for p in pairs if p.dimension in (None, on)]
        stats["other_dimension_pairs_left_out"] = len(pairs) - len(kept)
        pairs = kept
    stats["pairs"] = pair_counts(pairs)
    return PairSet(pairs, stats)


def pairs_from_records(records: Iterable[dict]) -> list[PreferencePair]:
    """`pairs` records (already checked and split by the data path) as PreferencePairs."""
    return [
        PreferencePair(
            prompt=prompt_messages(r["prompt"]),
            chosen=r["chosen"],
            rejected=r["rejected"],
            dimension=r.get("dimension"),
            margin=r.get("margin") or 0.0,
        )
        for r in records
    ]


def ratings_to_pairs(
    records: Iterable[dict], dimensions: Sequence[RewardDimension], on: str | None = None, where: str = "ratings"
) -> list[PreferencePair]:
    """Pairs from 1..5 ratings: responses to the same prompt compared on each dimension (ties dropped).

    Scores of one response from several raters are averaged; the margin is the score difference.
    `on=None` gives pairs for every dimension; `on="total"` compares the weighted mean of the dimensions
    (responses missing a weighted dimension are left out); `on=NAME` compares one dimension.
    """
    names = [d.name for d in dimensions]
    if on is not None and on != TOTAL and on not in names:
        raise DataError(f"ratings_to_pairs: unknown dimension {on!r}; choose total or one of {', '.join(names)}")
    means = _mean_scores(records)
    weights = {d.name: d.weight for d in dimensions if d.weight > 0}
    pairs: list[PreferencePair] = []
    for prompt, responses in means.items():
        for (text_a, scores_a), (text_b, scores_b) in combinations(responses.items(), 2):
            for dimension in [on] if on else names:
                a, b = _value(scores_a, dimension, weights), _value(scores_b, dimension, weights)
                if a is None or b is None or math.isclose(a, b):
                    continue
                chosen, rejected = (text_a, text_b) if a > b else (text_b, text_a)
                pairs.append(
                    PreferencePair(
                        prompt=json.loads(prompt),
                        chosen=chosen,
                        rejected=rejected,
                        dimension=None if dimension == TOTAL else dimension,
                        margin=abs(a - b),
                    )
                )
    if not pairs:
        raise DataError(
            f"{where}: no pairs can be formed: responses to the same prompt tie on every "
            f"{'dimension' if on is None else repr(on)}; ratings need different scores for responses to one prompt"
        )
    return pairs


def tiers_to_pairs(records: Iterable[dict], tier_order: Sequence[str]) -> list[PreferencePair]:
    """Every cross-tier pair of each record: a response beats every response of a lower tier (margin = tier distance)."""
    rank = {tier: i for i, tier in enumerate(tier_order)}
    pairs = []
    for record in records:
        ranked = [(rank[r["tier"]], r["response"]) for r in record["responses"]]
        for (rank_a, text_a), (rank_b, text_b) in combinations(ranked, 2):
            if rank_a == rank_b:
                continue
            (_, chosen), (_, rejected) = sorted([(rank_a, text_a), (rank_b, text_b)])
            pairs.append(
                PreferencePair(
                    prompt=prompt_messages(record["prompt"]),
                    chosen=chosen,
                    rejected=rejected,
                    dimension=record.get("dimension"),
                    margin=float(abs(rank_a - rank_b)),
                )
            )
    return pairs


def rater_agreement(records: Iterable[dict], dimensions: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per dimension, how far raters of the same response agree: exactly, within one point, and on which of two is better."""
    scores: dict[str, dict[tuple[str, str], dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    for i, record in enumerate(records):
        rater = record.get("rater") or f"anonymous-{i}"
        item = (prompt_key(record["prompt"]), record["response"].strip())
        for dimension, value in record["scores"].items():
            scores[dimension][item][rater] = value
    report = {}
    for dimension in dimensions:
        items = {item: by_rater for item, by_rater in scores.get(dimension, {}).items() if len(by_rater) > 1}
        diffs = [abs(a - b) for by_rater in items.values() for a, b in combinations(by_rater.values(), 2)]
        entry: dict[str, float] = {"responses_rated_twice": len(items)}
        if diffs:
            entry.update(
                exact=_share(d == 0 for d in diffs),
                within_one=_share(d <= 1 for d in diffs),
                mean_abs_diff=round(sum(diffs) / len(diffs), 3),
            )
        orders = _order_agreement(scores.get(dimension, {}))
        if orders:
            entry["same_order"] = _share(orders)
        report[dimension] = entry
    return report


def pair_counts(pairs: Iterable[PreferencePair]) -> dict[str, int]:
    """How many pairs judge each dimension (`total` for pairs without a dimension)."""
    counts: dict[str, int] = defaultdict(int)
    for pair in pairs:
        counts[pair.dimension or TOTAL] += 1
    return dict(counts)


def split_by_prompt(examples: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `fraction` of the prompts (all their examples), so no prompt is in both train and eval."""
    keys = sorted({e["prompt_key"] for e in examples})
    random.Random(seed).shuffle(keys)
    n_eval = min(len(keys) - 1, max(1, round(fraction * len(keys))))
    held_out = set(keys[:n_eval])
    return [e for e in examples if e["prompt_key"] not in held_out], [
        e for e in examples if e["prompt_key"] in held_out
    ]


def deduplicate(pairs: list[PreferencePair]) -> tuple[list[PreferencePair], dict[str, int]]:
    """One pair per (prompt, chosen, rejected); both orders of one pair (judged on different dimensions) cancel: dropped."""
    seen: dict[tuple, PreferencePair] = {}
    for pair in pairs:
        seen.setdefault((prompt_key(pair.prompt), pair.chosen, pair.rejected), pair)
    contradictory = {key for key in seen if (key[0], key[2], key[1]) in seen}
    kept = [p for key, p in seen.items() if key not in contradictory]
    return kept, {"duplicate_pairs": len(pairs) - len(seen), "contradictory_pairs": len(contradictory)}


def hold_out(
    pairs: list[PreferencePair], fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Hold out `fraction` of the prompts with all their pairs (none when 0 or fewer than two prompts)."""
    examples = [{"prompt_key": prompt_key(p.prompt), "pair": p} for p in pairs]
    if fraction <= 0 or len({e["prompt_key"] for e in examples}) < 2:
        return pairs, []
    train, held = split_by_prompt(examples, fraction, seed)
    return [e["pair"] for e in train], [e["pair"] for e in held]


# --- helpers ---------------------------------------------------------------------------------


def _mean_scores(records: Iterable[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """prompt key -> response -> dimension -> mean score over raters (responses in first-seen order)."""
    sums: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for record in records:
        for dimension, value in record["scores"].items():
            sums[prompt_key(record["prompt"])][record["response"].strip()][dimension].append(value)
    return {
        p: {r: {d: sum(v) / len(v) for d, v in dims.items()} for r, dims in responses.items()}
        for p, responses in sums.items()
    }


def _value(scores: dict[str, float], dimension: str, weights: dict[str, float]) -> float | None:
    """A response's mean score on `dimension`, or its weighted total (None when a weighted dimension is missing)."""
    if dimension != TOTAL:
        return scores.get(dimension)
    if any(name not in scores for name in weights):
        return None
    return sum(scores[name] * w for name, w in weights.items()) / sum(weights.values())


def _tie_counts(records: list[dict], dimensions: Sequence[str]) -> dict[str, int]:
    ties: dict[str, int] = dict.fromkeys(dimensions, 0)
    for responses in _mean_scores(records).values():
        for scores_a, scores_b in combinations(responses.values(), 2):
            for d in dimensions:
                if d in scores_a and d in scores_b and math.isclose(scores_a[d], scores_b[d]):
                    ties[d] += 1
    return ties


def _order_agreement(items: dict[tuple[str, str], dict[str, float]]) -> list[bool]:
    """For two responses to one prompt scored by the same two raters: do the raters order them alike?"""
    by_prompt: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (prompt, _), by_rater in items.items():
        by_prompt[prompt].append(by_rater)
    agreements = []
    for responses in by_prompt.values():
        for x, y in combinations(responses, 2):
            for r1, r2 in combinations(sorted(set(x) & set(y)), 2):
                agreements.append(_sign(x[r1] - y[r1]) == _sign(x[r2] - y[r2]))
    return agreements


def _sign(value: float) -> int:
    return (value > 0) - (value < 0)


def _share(flags: Iterable[bool]) -> float:
    flags = list(flags)
    return round(sum(flags) / len(flags), 3)
