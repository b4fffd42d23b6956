"""Cleaning expert feedback: agreement, per-rater calibration, noisy raters, held-back items, votes, teacher check."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pytest

from finetune.errors import WenmaiError
from finetune.recipe.review import ReviewCleaning
from finetune.review.cleaning import Cleaning, clean, render_markdown
from finetune.review.schema import Answer, Item, Review

krippendorff = pytest.importorskip("krippendorff")
NOW = datetime.now(timezone.utc)


def make_item(item_id: int, answers: int = 1) -> Item:
    return Item(
        id=item_id,
        session="s",
        key=None,
        prompt=f"prompt {item_id}",
        system=None,
        answers=[Answer(label=label, text=f"answer {label}", model="m") for label in "AB"[:answers]],
        meta={},
        created_at=NOW,
    )


def make_review(item_id: int, reviewer: str, scores=None, choice=None, flags=(), review_id: int = 0) -> Review:
    return Review(
        id=review_id,
        item_id=item_id,
        reviewer=reviewer,
        version=1,
        created_at=NOW,
        scores=scores or {},
        choice=choice,
        flags=list(flags),
    )


def from_ratings(ratings, dimensions=("accuracy",)) -> tuple[list[Item], list[Review]]:
    """Items with one answer and reviews from ratings[rater, item, dimension] (or [rater, item]); nan = not rated."""
    ratings = np.asarray(ratings, dtype=float)
    if ratings.ndim == 2:
        ratings = ratings[..., np.newaxis]
    raters, count, _ = ratings.shape
    items = [make_item(i) for i in range(count)]
    reviews = []
    for r in range(raters):
        for i in range(count):
            scores = {d: int(ratings[r, i, k]) for k, d in enumerate(dimensions) if not np.isnan(ratings[r, i, k])}
            if scores:
                reviews.append(make_review(i, f"r{r + 1}", {"A": scores}, review_id=len(reviews)))
    return items, reviews


def consensus_ratings(rng, raters: int, items: int, dims: int, noise: float, low: int = 1, high: int = 5):
    """Each rater scores a planted consensus, moved by ±1 with probability `noise`; returns (consensus, ratings)."""
    consensus = rng.integers(low, high + 1, size=(items, dims))
    moves = rng.choice([-1, 0, 1], p=[noise / 2, 1 - noise, noise / 2], size=(raters, items, dims))
    return consensus, np.clip(consensus + moves, 1, 5)


def test_alpha_before_equals_krippendorff_on_the_same_matrix():
    rng = np.random.default_rng(0)
    full = rng.integers(1, 6, size=(4, 12)).astype(float)
    full[1] = np.clip(full[0] + rng.integers(-1, 2, size=12), 1, 5)  # some agreement, not a degenerate matrix
    with_missing = full.copy()
    with_missing[0, [1, 4]] = np.nan
    with_missing[2, [0, 4, 7]] = np.nan
    with_missing[3, 9] = np.nan
    for matrix in (full, with_missing):
        items, reviews = from_ratings(matrix)
        cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning())
        expected = krippendorff.alpha(reliability_data=matrix, level_of_measurement="interval")
        assert cleaning.alpha["accuracy"]["before"] == pytest.approx(expected, abs=1e-12)


def test_alpha_on_krippendorffs_documented_example():
    nan = np.nan
    matrix = [
        [nan, nan, nan, nan, nan, 3, 4, 1, 2, 1, 1, 3, 3, nan, 3],
        [1, nan, 2, 1, 3, 3, 4, 3, nan, nan, nan, nan, nan, nan, nan],
        [nan, nan, 2, 1, 3, 4, 4, nan, 2, 1, 1, 3, 3, nan, 4],
    ]
    items, reviews = from_ratings(matrix)
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning(calibrate=False))
    assert round(cleaning.alpha["accuracy"]["before"], 6) == 0.810845  # the krippendorff package's docstring value


def test_alpha_is_none_when_undefined_instead_of_crashing():
    items, reviews = from_ratings([[3, 3, 3], [3, 3, 3]])  # no variation
    assert clean(items, reviews, ["accuracy"], ReviewCleaning()).alpha["accuracy"]["before"] is None
    items, reviews = from_ratings([[1, 4, 2]])  # one rater: no unit has two
    cleaning = clean(items, reviews, ["accuracy", "clarity"], ReviewCleaning())
    assert cleaning.alpha["accuracy"]["before"] is None and cleaning.alpha["clarity"]["after"] is None


def test_calibration_recovers_a_planted_offset():
    rng = np.random.default_rng(1)
    consensus, ratings = consensus_ratings(rng, raters=5, items=40, dims=2, noise=0.2, high=4)
    ratings[4] = consensus + 1  # a lenient rater: everyone's 3 is their 4
    items, reviews = from_ratings(ratings, dimensions=("accuracy", "clarity"))
    cleaning = clean(items, reviews, ["accuracy", "clarity"], ReviewCleaning())
    offsets = {rater: stats.offset for rater, stats in cleaning.raters.items()}
    assert offsets["r5"] == pytest.approx(1.0, abs=0.15)
    for rater in ("r1", "r2", "r3", "r4"):
        assert abs(offsets[rater]) <= 0.15, offsets
    assert cleaning.noisy_raters == []
    lenient = [r for r in reviews if r.reviewer == "r5"]
    error = np.mean([abs(cleaning.calibrated(r, "A", "accuracy") - consensus[r.item_id, 0]) for r in lenient])
    assert error < 0.25  # calibrated back onto the consensus (raw error would be 1.0)


def test_uncalibrated_scores_stay_raw():
    rng = np.random.default_rng(1)
    consensus, ratings = consensus_ratings(rng, raters=3, items=20, dims=1, noise=0.0, high=4)
    ratings[2] = consensus + 1
    items, reviews = from_ratings(ratings)
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning(calibrate=False))
    assert cleaning.raters["r3"].offset == pytest.approx(1.0)  # estimated and reported, but not applied
    review = next(r for r in reviews if r.reviewer == "r3")
    assert cleaning.calibrated(review, "A", "accuracy") == review.scores["A"]["accuracy"]


@pytest.mark.parametrize("raters", [5, 3])
def test_noisy_rater_is_listed_dropped_and_alpha_improves(raters):
    rng = np.random.default_rng(2)
    _, ratings = consensus_ratings(rng, raters=raters, items=40, dims=2, noise=0.3)
    ratings[-1] = rng.integers(1, 6, size=(40, 2))  # answers at random
    items, reviews = from_ratings(ratings, dimensions=("accuracy", "clarity"))
    noisy = f"r{raters}"
    cleaning = clean(items, reviews, ["accuracy", "clarity"], ReviewCleaning())
    assert cleaning.noisy_raters == [noisy]
    assert [rater for rater, stats in cleaning.raters.items() if stats.noisy] == [noisy]
    for dimension in ("accuracy", "clarity"):
        assert cleaning.alpha[dimension]["after"] > cleaning.alpha[dimension]["before"]
    noisy_review = next(r for r in reviews if r.reviewer == noisy)
    assert cleaning.calibrated(noisy_review, "A", "accuracy") is None
    assert not cleaning.used(noisy_review)
    assert cleaning.reviews_used == sum(1 for r in reviews if r.reviewer != noisy and cleaning.kept(r.item_id))

    kept = clean(items, reviews, ["accuracy", "clarity"], ReviewCleaning(drop_noisy_raters=False))
    assert kept.noisy_raters == [noisy]  # still listed, but its scores stay in
    assert kept.calibrated(noisy_review, "A", "accuracy") is not None


def test_two_raters_who_disagree_are_not_blamed():
    rng = np.random.default_rng(6)
    _, ratings = consensus_ratings(rng, raters=2, items=30, dims=1, noise=0.0)
    ratings[1] = rng.integers(1, 6, size=(30, 1))
    items, reviews = from_ratings(ratings)
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning())
    assert cleaning.raters["r1"].deviation > 1.0 and cleaning.noisy_raters == []  # who is wrong is unknowable


def test_teacher_disagreement_is_listed_and_the_item_kept():
    rng = np.random.default_rng(3)
    consensus, ratings = consensus_ratings(rng, raters=4, items=40, dims=1, noise=0.1)
    consensus[7, 0] = 5
    ratings[:, 7, 0] = 5
    items, reviews = from_ratings(ratings)
    teacher = {(i, "A"): {"accuracy": 10.0 * consensus[i, 0] - 3} for i in range(40)}  # another scale
    teacher[(7, "A")] = {"accuracy": 7.0}  # the teacher's worst score where the experts gave their best
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning(), teacher=teacher)
    assert [(d.item_id, d.answer, d.dimension) for d in cleaning.disagreements] == [(7, "A", "accuracy")]
    assert cleaning.disagreements[0].gap < -1.5 and cleaning.disagreements[0].expert == pytest.approx(5.0, abs=0.1)
    assert 7 in cleaning.kept_items and cleaning.kept(7)
    assert clean(items, reviews, ["accuracy"], ReviewCleaning()).disagreements == []


def test_held_back_items_name_their_reasons():
    items = [make_item(i) for i in range(1, 6)]
    scored = {"A": {"accuracy": 3}}
    reviews = [
        make_review(1, "r1", {"A": {"accuracy": 1}}),
        make_review(1, "r2", {"A": {"accuracy": 5}}),
        make_review(1, "r3", {"A": {"accuracy": 3}}),
        make_review(2, "r1", scored),
        make_review(2, "r2", scored),
        make_review(2, "r3", scored, flags=["rights_problem"]),
        make_review(3, "r1", scored),
        make_review(3, "r2", scored),
        make_review(4, "r1", scored),
        make_review(4, "r2", scored),
        make_review(4, "r3", scored),
        make_review(5, "r1", scored, flags=["factual_error"]),
        make_review(5, "r2", scored),
        make_review(5, "r3", scored),
    ]
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning(calibrate=False, min_reviews=3))
    assert cleaning.held_back[1] == ["accuracy: scores 1 to 5 differ by 4 > max_spread 2"]
    assert cleaning.held_back[2] == ["flagged rights_problem by r3"]
    assert cleaning.held_back[3] == ["2 reviews < min_reviews 3"]
    assert cleaning.kept_items == [4, 5]  # factual_error alone does not hold an item back
    assert not cleaning.used(reviews[0]) and cleaning.used(reviews[-1])


def test_spread_reason_names_the_answer_on_ab_items():
    items = [make_item(1, answers=2)]
    reviews = [
        make_review(1, "r1", {"A": {"accuracy": 3}, "B": {"accuracy": 1}}),
        make_review(1, "r2", {"A": {"accuracy": 3}, "B": {"accuracy": 4}}),
    ]
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning(calibrate=False))
    assert cleaning.held_back == {1: ["accuracy (answer B): scores 1 to 4 differ by 3 > max_spread 2"]}


def test_votes_and_majority():
    items = [make_item(i, answers=2) for i in range(1, 5)]
    choices = {1: ["A", "A", "B"], 2: ["A", "B"], 3: ["tie", "tie", "B"], 4: ["tie", "tie"]}
    reviews = [make_review(i, f"r{n}", choice=c) for i, cs in choices.items() for n, c in enumerate(cs)]
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning())
    assert cleaning.votes[1] == {"A": 2, "B": 1, "tie": 0}
    assert cleaning.votes[3] == {"A": 0, "B": 1, "tie": 2}
    assert [cleaning.majority(i) for i in range(1, 5)] == ["A", None, "B", None]
    single = clean([make_item(9)], [make_review(9, "r1", choice="A")], ["accuracy"], ReviewCleaning())
    assert single.votes == {} and single.majority(9) is None


def test_render_markdown_shows_reasons_alpha_and_raters():
    rng = np.random.default_rng(4)
    consensus, ratings = consensus_ratings(rng, raters=4, items=20, dims=1, noise=0.2)
    ratings[:, 0, 0] = [1, 5, 3, 3]
    items, reviews = from_ratings(ratings)
    teacher = {(i, "A"): {"accuracy": float(consensus[i, 0])} for i in range(20)}
    teacher[(3, "A")] = {"accuracy": 6.0 - consensus[3, 0] * 3}
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning(calibrate=False), teacher=teacher)
    text = render_markdown(cleaning, "Cleaning of session s")
    assert text.startswith("# Cleaning of session s")
    assert "- item 0: accuracy: scores 1 to 5 differ by 4 > max_spread 2" in text
    alpha = cleaning.alpha["accuracy"]
    assert f"| accuracy | {alpha['before']:.3f} | {alpha['after']:.3f} |" in text
    assert "| r1 |" in text and "second look" in text


def test_cleaning_round_trips_through_json():
    rng = np.random.default_rng(5)
    _, ratings = consensus_ratings(rng, raters=3, items=10, dims=1, noise=0.3)
    items, reviews = from_ratings(ratings)
    cleaning = clean(items, reviews, ["accuracy"], ReviewCleaning())
    again = Cleaning.model_validate(json.loads(json.dumps(cleaning.model_dump(mode="json"))))
    assert again == cleaning


def test_score_outside_range_names_the_review():
    reviews = [make_review(1, "r2", {"A": {"accuracy": 7}}, review_id=12)]
    with pytest.raises(WenmaiError, match=r"review 12 by r2 on item 1: score 7 for answer A, accuracy"):
        clean([make_item(1)], reviews, ["accuracy"], ReviewCleaning())
