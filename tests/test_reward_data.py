"""Preference data: the pairs/ratings/tiers formats, their errors, and the conversions to pairs and examples."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from tiny_models import write_jsonl

from finetune.data.pairs import rater_agreement, ratings_to_pairs, tiers_to_pairs
from finetune.data.preference import split_pair, split_transcript, transcript_messages
from finetune.data.records import read_records
from finetune.errors import ConfigError, DataError
from finetune.pipeline import load_recipe
from finetune.recipe import RewardDimension, check_dimension_names, stage_dimension_problems
from finetune.recipe.options import StageOptions as StageConfig
from finetune.recipe.options import dimension_field
from reward.data import training_examples

ROOT = Path(__file__).resolve().parent.parent
DIMENSIONS = ["accuracy", "cultural_value", "safety", "fluency"]
CONTEXT = {"dimensions": DIMENSIONS}
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-pairs.jsonl.gz"


def dims(*weights: float) -> list[RewardDimension]:
    return [RewardDimension(name=n, weight=w) for n, w in zip(DIMENSIONS, weights or (1, 1, 1, 1), strict=False)]


def rating(prompt: str, response: str, rater: str = "a", **scores: float) -> dict:
    return {"prompt": prompt, "response": response, "rater": rater, "scores": scores}


def error_of(path: Path, fmt: str, context: dict | None = CONTEXT) -> str:
    with pytest.raises(DataError) as info:
        read_records(path, fmt, context=context)
    return str(info.value)


# --- bad input names file:line and the key ------------------------------------------------------


def test_rating_outside_1_to_5_names_file_line_and_dimension(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [rating("q", "x", accuracy=4), rating("q", "y", accuracy=4, safety=7)])
    message = error_of(path, "ratings")
    assert f"{path}:2: scores: safety=7 outside 1..5" in message


def test_unknown_dimension_names_file_line_key_and_suggestion(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [rating("q", "x", accuracy=4), rating("q", "y", saftey=2)])
    message = error_of(path, "ratings")
    assert f"{path}:2: scores: unknown reward dimension 'saftey'; did you mean safety?" in message
    assert "accuracy, cultural_value, safety, fluency" in message


def test_unknown_dimension_in_a_pair_is_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "dimension": "tone"}])
    assert f"{path}:1: dimension: unknown reward dimension 'tone'" in error_of(path, "pairs")


def test_identical_chosen_and_rejected_is_named(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "same answer", "rejected": "same answer "},
        ],
    )
    assert f"{path}:2: chosen and rejected are identical" in error_of(path, "pairs")


def test_ratings_where_no_prompt_has_two_responses_cannot_form_pairs(tmp_path):
    path = write_jsonl(
        tmp_path / "r.jsonl",
        [rating("q1", "x", accuracy=4), rating("q2", "y", accuracy=2), rating("q2", "y", rater="b", accuracy=3)],
    )
    message = error_of(path, "ratings")
    assert str(path) in message and "no pairs can be formed" in message
    assert "at least two responses per prompt" in message


def test_ratings_that_all_tie_cannot_form_pairs(tmp_path):
    records = [rating("q", "x", accuracy=4), rating("q", "y", accuracy=4)]
    with pytest.raises(DataError, match="no pairs can be formed: responses to the same prompt tie"):
        ratings_to_pairs(records, dims(), where="ties.jsonl")


def test_transcript_without_assistant_turn_is_named(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"chosen": "\n\nHuman: hi there", "rejected": "\n\nHuman: hi you"}])
    assert f"{path}:1: no `prompt` field and no 'Assistant:' turn" in error_of(path, "pairs")


def test_tier_outside_tier_order_and_single_tier_are_named(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"prompt": "q", "responses": [{"response": "a", "tier": "good"}, {"response": "b", "tier": "awful"}]},
            {"prompt": "q", "responses": [{"response": "a", "tier": "good"}, {"response": "b", "tier": "good"}]},
        ],
    )
    message = error_of(path, "tiers", {"dimensions": DIMENSIONS, "tier_order": ["good", "acceptable", "harmful"]})
    assert f"{path}:1: responses[1].tier: unknown tier 'awful'" in message
    assert f"{path}:2: every response is in tier 'good'" in message


def test_recipe_reward_section_errors_are_named(write_recipe, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    path = write_recipe(f"""\
        name: t
        model: {{path: {tiny_model}}}
        reward:
          dimensions:
            - {{name: safety}}
            - {{name: total}}
        data:
          p: {{path: {data}, format: pairs}}
        stages:
          - reward: {{dataset: p}}
        """)
    with pytest.raises(ConfigError, match=r"reward\.dimensions\[1\]\.name: `total` is reserved"):
        load_recipe(path)
    path.write_text(path.read_text().replace("{name: total}", "{name: safety, weight: 0}"))
    with pytest.raises(ConfigError, match="reward: dimension names must be unique; repeated: safety"):
        load_recipe(path)


def test_tiers_dataset_without_tier_order_is_named(write_recipe, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    path = write_recipe(f"""\
        name: t
        model: {{path: {tiny_model}}}
        data:
          t: {{path: {data}, format: tiers}}
        stages:
          - reward: {{dataset: t}}
        """)
    with pytest.raises(ConfigError, match=r"data\.t\.tier_order: a tiers dataset needs `tier_order`"):
        load_recipe(path)


def test_dimension_names_are_checked_against_the_reward_section(write_recipe, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}])
    recipe = load_recipe(
        write_recipe(f"""\
        name: t
        include: [reward/culture]
        model: {{path: {tiny_model}}}
        data: {{p: {{path: {data}, format: pairs}}}}
        stages: [{{reward: {{dataset: p}}}}]
        """)
    ).recipe
    assert check_dimension_names(recipe, ["safety", "total"], "x") == []
    [problem] = check_dimension_names(recipe, {"safty": 1.0}, "stages[2].rlhf.weights")
    assert str(problem).startswith("stages[2].rlhf.weights: unknown reward dimension 'safty'; did you mean safety?")

    class Gate(StageConfig):  # a later stage naming dimensions, as rlhf and evaluate will
        kind = "gate"
        dimensions: list[str] = dimension_field("Dimensions gated on.", default=["fluency", "tone"])

    [problem] = stage_dimension_problems(recipe, Gate(), "stages[1].gate")
    assert "stages[1].gate.dimensions: unknown reward dimension 'tone'" in str(problem)


# --- conversions ---------------------------------------------------------------------------------


def test_ratings_become_pairs_per_dimension_with_margins_and_ties_dropped():
    records = [
        rating("q", "good", accuracy=5, safety=5),
        rating("q", "wrong", accuracy=1, safety=5),
        rating("q", "good", rater="b", accuracy=4, safety=5),
        rating("other", "lonely", accuracy=3),
    ]
    pairs = ratings_to_pairs(records, dims())
    [pair] = pairs  # safety ties (5 vs 5); the other prompt has one response
    assert (pair.chosen, pair.rejected, pair.dimension) == ("good", "wrong", "accuracy")
    assert pair.margin == pytest.approx(3.5)  # mean of raters (5, 4) minus 1
    assert pair.prompt == [{"role": "user", "content": "q"}]


def test_ratings_to_pairs_on_the_weighted_total_for_dpo():
    records = [
        rating("q", "x", accuracy=5, cultural_value=1, safety=1, fluency=1),
        rating("q", "y", accuracy=1, cultural_value=3, safety=3, fluency=3),
        rating("q", "z", accuracy=5),
    ]  # misses weighted dimensions: left out of the total
    [pair] = ratings_to_pairs(records, dims(0.7, 0.1, 0.1, 0.1), on="total")
    assert (pair.chosen, pair.rejected, pair.dimension) == ("x", "y", None)
    assert pair.margin == pytest.approx(abs((3.5 + 0.3) - (0.7 + 0.9)))
    [only_safety] = ratings_to_pairs(records, dims(), on="safety")
    assert only_safety.chosen == "y"


def test_tiers_become_every_cross_tier_pair():
    record = {
        "prompt": "q",
        "dimension": "safety",
        "responses": [
            {"response": "h", "tier": "harmful"},
            {"response": "g1", "tier": "good"},
            {"response": "g2", "tier": "good"},
            {"response": "a", "tier": "acceptable"},
        ],
    }
    pairs = tiers_to_pairs([record], ["good", "acceptable", "harmful"])
    assert sorted((p.chosen, p.rejected, p.margin) for p in pairs) == [
        ("a", "h", 1.0),
        ("g1", "a", 1.0),
        ("g1", "h", 2.0),
        ("g2", "a", 1.0),
        ("g2", "h", 2.0),
    ]
    assert {p.dimension for p in pairs} == {"safety"}


def test_pairs_on_the_same_responses_merge_into_one_example_with_signed_labels():
    records = [rating("q", "x", accuracy=5, fluency=1), rating("q", "y", accuracy=2, fluency=4)]
    [example] = training_examples(ratings_to_pairs(records, dims()), DIMENSIONS)
    sign = 1.0 if example["a"] == "x" else -1.0
    assert example["preference"] == [sign, 0.0, 0.0, -sign, 0.0]  # x better on accuracy, y on fluency; total unlabelled
    assert example["margin"] == [3.0, 0.0, 0.0, 3.0, 0.0]


def test_rater_agreement_reports_exact_within_one_and_order():
    records = [
        rating("q", "x", "a", fluency=5),
        rating("q", "x", "b", fluency=4),
        rating("q", "y", "a", fluency=2),
        rating("q", "y", "b", fluency=5),
    ]
    report = rater_agreement(records, ["fluency", "safety"])
    assert report["fluency"] == {
        "responses_rated_twice": 2,
        "exact": 0.0,
        "within_one": 0.5,
        "mean_abs_diff": 2.0,
        "same_order": 0.0,
    }
    assert report["safety"] == {"responses_rated_twice": 0}


def test_hh_transcripts_split_after_the_last_assistant_turn(tmp_path):
    chosen = "\n\nHuman: Is it safe?\n\nAssistant: Which part?\n\nHuman: The wall.\n\nAssistant: Stay on open sections."
    rejected = "\n\nHuman: Is it safe?\n\nAssistant: Which part?\n\nHuman: The wall.\n\nAssistant: Climb it at night."
    assert split_transcript(chosen) == (chosen[: chosen.rindex("Assistant:") + 10], "Stay on open sections.")
    prompt, good, bad = split_pair(chosen, rejected)
    assert (good, bad) == ("Stay on open sections.", "Climb it at night.")
    assert transcript_messages(prompt) == [
        {"role": "user", "content": "Is it safe?"},
        {"role": "assistant", "content": "Which part?"},
        {"role": "user", "content": "The wall."},
    ]
    # a response that itself contains "\n\nAssistant:" still splits at the shared conversation
    tricky = chosen + " Human: really?\n\nAssistant: yes"
    assert split_pair(tricky, rejected)[1].startswith("Stay on open sections. Human: really?")
    path = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": chosen, "rejected": rejected}])
    [record] = read_records(path, "pairs").records
    assert record["chosen"] == "Stay on open sections." and record["prompt"][-1]["content"] == "The wall."


@pytest.mark.skipif(not HH.is_file(), reason="shared hh-rlhf data not present")
def test_every_hh_rlhf_pair_reads_as_a_pair(tmp_path):
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    records = read_records(path, "pairs").records
    assert len(records) == len(rows) == 1800
    assert all(r["prompt"][-1]["role"] == "user" for r in records)


def test_shipped_culture_ratings_form_pairs_on_every_dimension():
    from finetune.data.pairs import pair_counts
    from finetune.data.records import read_records as read

    records = read(ROOT / "recipes" / "data" / "culture_ratings.jsonl", "ratings", context=CONTEXT).records
    assert 300 <= len(records) <= 600 and {r["lang"] for r in records} == {"zh", "en"}
    assert {r["rater"] for r in records} == {"expert_a", "expert_b", "expert_c"}
    counts = pair_counts(ratings_to_pairs(records, dims()))
    assert set(counts) == set(DIMENSIONS) and min(counts.values()) >= 50
    agreement = rater_agreement(records, DIMENSIONS)
    assert all(0.5 < agreement[d]["within_one"] <= 1 and agreement[d]["exact"] < 1 for d in DIMENSIONS)


def test_validate_catches_an_unknown_dimension_in_the_data_before_any_model_loads(cli, write_recipe, tmp_path):
    ratings = write_jsonl(tmp_path / "r.jsonl", [rating("q", "x", accuracy=4), rating("q", "y", tone=2)])
    recipe = write_recipe(f"""\
        name: t
        include: [reward/culture]
        model: {{path: {tmp_path / "no-model-needed"}}}
        data: {{r: {{path: {ratings}, format: ratings}}}}
        stages: [{{reward: {{dataset: r}}}}]
        """)
    code, _, err = cli("validate", recipe)
    assert code == 2 and f"{ratings}:2: scores: unknown reward dimension 'tone'" in err


def test_a_recipes_tiers_and_transcript_datasets_load_as_pairs(write_recipe, tmp_path, tiny_model):
    from finetune.data.pairs import load_pairs

    tiers = write_jsonl(
        tmp_path / "t.jsonl",
        [
            {
                "prompt": "q",
                "dimension": "safety",
                "responses": [
                    {"response": "careful", "tier": "good"},
                    {"response": "risky", "tier": "harmful"},
                    {"response": "meh", "tier": "acceptable"},
                ],
            }
        ],
    )
    hh = write_jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": "\n\nHuman: q\n\nAssistant: kind", "rejected": "\n\nHuman: q\n\nAssistant: rude"}],
    )
    recipe = load_recipe(
        write_recipe(f"""\
        name: t
        include: [reward/culture]
        model: {{path: {tiny_model}}}
        data:
          tiers: {{path: {tiers}, format: tiers, tier_order: [good, acceptable, harmful]}}
          hh: {{path: {hh}, format: pairs}}
        stages: [{{reward: {{dataset: tiers, eval_dataset: hh}}}}]
        """)
    ).recipe
    tier_pairs = load_pairs(recipe, "tiers")
    assert tier_pairs.stats["pairs"] == {"safety": 3}
    [pair] = load_pairs(recipe, "hh").pairs
    assert (pair.chosen, pair.rejected, pair.dimension) == ("kind", "rude", None)
