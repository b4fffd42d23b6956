"""The cleaning report on a simulated panel: 5 reviewers score A/B answers on the quickstart's 4 dimensions,
one of them at random (the planted noisy rater), one a point above everyone (a lenient rater).

    python scripts/bench/review_cleaning.py                  # 60 items, seed 0; report in runs/bench/review-cleaning/
    python scripts/bench/review_cleaning.py --items 200 --seed 3

Each item's answers have a true quality per dimension (1-5); good raters give it +-1 point of noise 30% of the
time, the lenient rater adds 1 (capped at 5), the noisy rater gives uniform 1-5. Reviews are written through
the review store (SQLite) and exported with `wenmai review export`'s code, so the figures are what a museum
would see. Prints Krippendorff's alpha per dimension before and after cleaning, the raters listed, the held-back
items, and the estimated offset of the lenient rater.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from finetune import reviewing
from finetune.recipe.review import ReviewCleaning
from finetune.review.schema import Dimension, NewAnswer, NewItem, ReviewInput, SessionSettings
from finetune.review.store import ReviewStore

DIMENSIONS = ["accuracy", "cultural_value", "safety", "fluency"]
RATERS = ["curator-1", "curator-2", "curator-3", "lenient-4", "noisy-5"]


def simulate(store: ReviewStore, items: int, seed: int) -> None:
    rng = random.Random(seed)
    store.create_session(
        SessionSettings(
            name="panel",
            institution="Simulated Museum",
            licence="CC-BY-4.0",
            dimensions=[Dimension(name=d) for d in DIMENSIONS],
            reviewers_per_item=len(RATERS),
        ),
        [
            NewItem(
                key=f"p{i}",
                prompt=f"Question {i}",
                answers=[NewAnswer(text=f"answer {i} A", model="a"), NewAnswer(text=f"answer {i} B", model="b")],
            )
            for i in range(items)
        ],
    )
    for rater in RATERS:
        store.add_reviewer(rater)
    for item in store.items("panel"):
        truth = {label: {d: rng.randint(1, 5) for d in DIMENSIONS} for label in ("A", "B")}
        better = "A" if sum(truth["A"].values()) >= sum(truth["B"].values()) else "B"
        for rater in RATERS:
            scores = {
                label: {d: _score(rater, value, rng) for d, value in dims.items()} for label, dims in truth.items()
            }
            choice = rng.choice(["A", "B", "tie"]) if rater.startswith("noisy") else better
            store.submit_review(item.id, rater, ReviewInput(scores=scores, choice=choice))


def _score(rater: str, true: int, rng: random.Random) -> int:
    if rater.startswith("noisy"):
        return rng.randint(1, 5)
    noisy = true + (rng.choice([-1, 1]) if rng.random() < 0.3 else 0)
    return max(1, min(5, noisy + (1 if rater.startswith("lenient") else 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/review-cleaning"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "panel.db"
        store = ReviewStore.open(db)
        simulate(store, args.items, args.seed)
        store.close()
        started = time.perf_counter()
        done = reviewing.export(db, "panel", args.out, ReviewCleaning(), log=print)
        seconds = time.perf_counter() - started
    report = json.loads((args.out / "cleaning_report.json").read_text(encoding="utf-8"))
    print(f"{'dimension':16} {'alpha before':>12} {'alpha after':>12}")
    for dim, alpha in report["alpha"].items():
        print(f"{dim:16} {_fmt(alpha['before']):>12} {_fmt(alpha['after']):>12}")
    raters = report["raters"]
    print("raters listed as noisy:", ", ".join(report["noisy_raters"]) or "none")
    print(
        "offset of lenient-4:",
        round(raters["lenient-4"]["offset"], 2),
        "scale:",
        round(raters["lenient-4"]["scale"], 2),
    )
    print(f"items held back: {done.held_back} of {args.items}; records: {done.counts}; export took {seconds:.2f} s")
    print(f"report: {args.out / 'cleaning_report.md'}")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


if __name__ == "__main__":
    main()
