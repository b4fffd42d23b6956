"""Two rounds of `wenmai iterate` on SmolLM2-135M from simulated curator feedback: scores per dimension per
round and wall time per round.

    python scripts/bench/rounds_smollm2.py                       # the quickstart as round 1, then rounds 2 and 3
    python scripts/bench/rounds_smollm2.py --parent runs/qs      # start from a finished quickstart run

Round 1 is `recipes/quickstart.yaml` (sft -> reward -> dpo -> evaluate -> merge -> export). For each next round
the last round's export answers 16 culture questions of the shipped data that its SFT never saw
(`wenmai review create`), and three simulated curators review every answer: each writes the shipped reference
answer as the correction, and scores accuracy by how much of the reference the answer shares (4-5 when half of
its characters appear in the reference, else 1-2), the other dimensions 3-5 with rater noise. `wenmai iterate`
then trains the round (sft on the corrections, a reward refresh on the ratings), evaluates it against its
parent on the quickstart's multiple-choice set and alignment suite judged by round 1's reward model, and exports
it only if no dimension fell by more than `--reward-tolerance` and no subject by more than `--mc-tolerance`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from finetune import reviewing
from finetune.evaluation.gates import GateFailed
from finetune.pipeline import load_recipe, start
from finetune.review.schema import ReviewInput
from finetune.review.store import ReviewStore
from finetune.round_history import round_history, round_row, score_columns
from finetune.rounds import iterate
from finetune.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
REVIEWERS = ("curator-1", "curator-2", "curator-3")


def questions() -> list[tuple[str, str]]:
    """(question, reference answer) pairs of the shipped SFT data, in file order."""
    rows = []
    for line in (ROOT / "recipes" / "data" / "culture_sft.jsonl").read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"]
        rows.append((messages[0]["content"], messages[1]["content"]))
    return rows


def simulate_reviews(db: Path, session: str, references: dict[str, str], seed: int) -> int:
    """Three curators correct and score every item of `session`; returns the reviews written."""
    rng = random.Random(seed)
    store = ReviewStore.open(db)
    for who in REVIEWERS:
        if store.reviewer(who) is None:
            store.add_reviewer(who)
    dimensions = store.session(session).dimension_names
    written = 0
    for item in store.items(session):
        reference = references[item.prompt]
        answer = item.answers[0].text
        shared = sum(1 for ch in set(answer) if ch in reference) / max(1, len(set(answer)))
        for who in REVIEWERS:
            scores = {d: rng.choice([3, 4, 4, 5]) for d in dimensions}
            if "accuracy" in scores:
                scores["accuracy"] = rng.choice([4, 5]) if shared >= 0.5 else rng.choice([1, 2])
            store.submit_review(item.id, who, ReviewInput(scores={"A": scores}, corrected_answer=reference))
            written += 1
    store.close()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parent", type=Path, help="A finished quickstart run to start from (default: run one).")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/rounds"))
    parser.add_argument("--rounds", type=int, default=2, help="Rounds after the first.")
    parser.add_argument("--questions", type=int, default=16, help="Questions answered and reviewed a round.")
    parser.add_argument("--reward-tolerance", type=float, default=0.05)
    parser.add_argument("--mc-tolerance", type=float, default=10.0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    if args.parent is None:
        started = time.perf_counter()
        parent = start(load_recipe(ROOT / "recipes" / "quickstart.yaml"), args.out / "round1", log=print)
        seconds["round1"] = time.perf_counter() - started
    else:
        parent = RunDir.open(args.parent)
    pool = questions()[-args.questions * args.rounds :]  # the end of the file: the quickstart's SFT reads 10 steps x 4
    db = args.out / "review.db"
    attempts: list[Path] = []
    for number in range(2, args.rounds + 2):
        batch = pool[(number - 2) * args.questions : (number - 1) * args.questions]
        prompts = args.out / f"round{number}-prompts.txt"
        prompts.write_text("".join(q.replace("\n", " ") + "\n" for q, _ in batch), encoding="utf-8")
        started = time.perf_counter()
        session = f"round{number}"
        reviewing.create(
            str(parent.root), prompts, session, db, institution="Wenmai project", licence="CC0-1.0",
            rights_holder="Wenmai project (simulated curators)", max_new_tokens=48, log=print,
        )  # fmt: skip
        simulate_reviews(db, session, {q.replace("\n", " "): r for q, r in batch}, seed=number)
        folder = args.out / f"round{number}"
        try:
            child = iterate(parent.root, db, session, run_dir=folder, reward_tolerance=args.reward_tolerance,
                            mc_tolerance=args.mc_tolerance, log=print)  # fmt: skip
        except GateFailed as err:
            print(f"round {number}: the gate refused it\n{err}")
            child = RunDir.open(folder)
        seconds[folder.name] = time.perf_counter() - started
        attempts.append(folder)
        if child.status("export") is None or child.status("export").state != "done":
            print(f"{folder.name} was not exported; the next round continues from {parent.root.name}")
        else:
            parent = child
    history = round_history(parent) + [
        round_row(RunDir.open(f)) for f in attempts if f.resolve() != parent.root.resolve()
    ]
    history = [h for i, h in enumerate(history) if h.run not in {x.run for x in history[:i]}]
    dimensions, sets = score_columns(history)
    print(
        "| run | round | wall s | feedback records | "
        + " | ".join(dimensions + [f"{m} %" for m in sets])
        + " | gate | exported |"
    )
    print("| --- " * (6 + len(dimensions) + len(sets)) + "|")
    for row in history:
        data = sum(sum(v.values()) for k, v in row.data.items() if k.startswith("feedback"))
        cells = row.score_cells(dimensions, sets)
        print(f"| {Path(row.run).name} | {row.number} | {seconds.get(Path(row.run).name, row.seconds or float('nan')):.0f} | {data or '—'} | " + " | ".join(cells)
              + f" | {row.gate_text()} | {'yes' if row.exported else 'no'} |")  # fmt: skip
    (args.out / "rounds.json").write_text(
        json.dumps({"rounds": [r.model_dump() for r in history], "seconds": seconds}, indent=2), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
