"""Reward model figures on hh-rlhf harmless pairs: held-out pairwise accuracy, and training throughput on CPU.

    python scripts/bench/reward_hh.py                        # SmolLM2-135M on a subsample + the tiny model's speed
    python scripts/bench/reward_hh.py --train 1600 --eval 200   # every pair (hours on 2 CPU cores)

The 1,800 pairs of ../shared/data/hh-rlhf/harmless-pairs.jsonl.gz are shuffled with --seed; the first
--eval are held out and the next --train are trained on (each transcript is split after its last
"\\n\\nAssistant:" by the `pairs` data format). Training goes through the real recipe path (a `reward`
stage on SmolLM2-135M-Instruct with `lora/small`); the held-out pairs are then scored by `RewardScorer`
loaded from the stage folder, and a pair counts as right when its chosen answer scores higher (chance
is 0.5). Throughput is training pairs per second of the trainer; CPU seconds are the process's user +
system time, which on a machine shared with other jobs says more about the cost than the wall clock.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-pairs.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=96, help="training pairs (after the held-out ones)")
    parser.add_argument("--eval", type=int, default=200, help="held-out pairs")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per micro-batch (x2 sequences)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimiser step")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tiny-steps", type=int, default=20, help="steps for the tiny model's throughput (0 skips it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wenmai-reward-hh-"))
    train_file, eval_file = split_pairs(work, args.train, args.eval, args.seed)
    results: dict = {
        "train_pairs": args.train,
        "eval_pairs": args.eval,
        "epochs": args.epochs,
        "seq_len": args.seq_len,
        "pairs_per_step": args.batch_size * args.accumulation,
    }
    small = train(
        work, "small", "include: [models/smollm2-135m, lora/small]\n", train_file, args, {"epochs": args.epochs}
    )
    small.update(held_out_accuracy(small.pop("stage_dir"), eval_file))
    results["small"] = small
    if args.tiny_steps:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_model

        tiny = build_model(work / "tiny-model")
        model = f"model: {{path: {tiny}}}\nlora: {{r: 4, alpha: 8, dropout: 0.0}}\n"
        results["tiny"] = train(work, "tiny", model, train_file, args, {"max_steps": args.tiny_steps})
        results["tiny"].pop("stage_dir")
    results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2), encoding="utf-8")


def split_pairs(work: Path, n_train: int, n_eval: int, seed: int) -> tuple[Path, Path]:
    """Shuffle the pairs; the first n_eval are held out, the next n_train train."""
    with gzip.open(HH, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    random.Random(seed).shuffle(rows)
    if n_eval + n_train > len(rows):
        raise SystemExit(f"only {len(rows)} pairs: --train + --eval must not exceed that")
    paths = work / "eval.jsonl", work / "train.jsonl"
    for path, part in zip(paths, (rows[:n_eval], rows[n_eval : n_eval + n_train]), strict=True):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return paths[1], paths[0]


def train(work: Path, label: str, model: str, train_file: Path, args, options: dict) -> dict:
    """One reward stage through the recipe path (no evaluation inside: the held-out set is scored after)."""
    from finetune.pipeline import load_recipe, start

    stage = {
        "dataset": "train",
        "eval_fraction": 0,
        "batch_size": args.batch_size,
        "gradient_accumulation": args.accumulation,
        "learning_rate": args.learning_rate,
        "seq_len": args.seq_len,
        "warmup": 0.1,
        "center_rewards_coefficient": 0.01,
        "logging_steps": 2,
        "save_steps": 100_000,
        **options,
    }
    recipe = work / f"{label}.yaml"
    recipe.write_text(
        f"name: reward-hh-{label}\n{model}data:\n  train: {{path: {train_file}, format: pairs}}\n"
        f"stages:\n  - reward: {json.dumps(stage)}\noutput: {{root: {work / 'runs'}}}\n",
        encoding="utf-8",
    )
    cpu_before, wall_before = _cpu_seconds(), time.time()
    run_dir = start(load_recipe(recipe), work / "runs" / label, log=lambda m: print(f"[{label}] {m}", file=sys.stderr))
    summary = run_dir.status("reward").summary
    return {
        "stage_dir": run_dir.root / "reward",
        "train_pairs_per_s": summary["train_examples_per_s"],
        "train_runtime_s": summary["train_runtime_s"],
        "steps": summary["steps"],
        "first_loss": summary.get("first_loss"),
        "last_loss": summary.get("last_loss"),
        "truncated_sequences": summary["truncated"],
        "stage_wall_s": round(time.time() - wall_before, 1),
        "stage_cpu_s": round(_cpu_seconds() - cpu_before, 1),
    }


def held_out_accuracy(stage_dir: Path, eval_file: Path) -> dict:
    """Score each held-out pair's two answers with the saved reward model (from its folder alone)."""
    from finetune.data.records import read_records
    from reward.score import RewardScorer

    pairs = read_records(eval_file, "pairs").records
    scorer = RewardScorer.from_stage(stage_dir)
    started = time.time()
    prompts = [p["prompt"] for p in pairs]
    scores = scorer.score(
        prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], batch_size=16
    )
    seconds = time.time() - started
    total = scores["total"]
    correct = sum(total[i] > total[i + len(pairs)] for i in range(len(pairs)))
    return {"held_out_accuracy": round(correct / len(pairs), 4), "scoring_pairs_per_s": round(len(pairs) / seconds, 3)}


def table(results: dict) -> str:
    lines = [
        "| model | trained on | held-out accuracy | train pairs/s | train s | scoring pairs/s | CPU s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label in ("small", "tiny"):
        r = results.get(label)
        if r is None:
            continue
        trained = (
            f"{results['train_pairs']} pairs x {results['epochs']:g} epoch"
            if label == "small"
            else f"{r['steps']} steps"
        )
        accuracy = f"{r['held_out_accuracy']:.3f} ({results['eval_pairs']} pairs)" if "held_out_accuracy" in r else "—"
        lines.append(
            f"| {label} | {trained} | {accuracy} | {r['train_pairs_per_s']} | {r['train_runtime_s']} | "
            f"{r.get('scoring_pairs_per_s', '—')} | {r['stage_cpu_s']} |"
        )
    return (
        "\n".join(lines)
        + f"\npeak memory {results['peak_rss_gb']} GB; {results['pairs_per_step']} pairs per step, seq_len {results['seq_len']}"
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
