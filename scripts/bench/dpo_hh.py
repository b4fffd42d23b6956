"""DPO on hh-rlhf harmless pairs with SmolLM2-135M: held-out reward before and after, and CValues samples.

    python scripts/bench/dpo_hh.py                       # the stated subsample (~15 min on an idle 2-core CPU)
    python scripts/bench/dpo_hh.py --reward-stage RUN/reward   # reuse a reward model (e.g. from reward_hh.py)

The 1,800 pairs of ../shared/data/hh-rlhf/harmless-pairs.jsonl.gz are shuffled with --seed (as in
reward_hh.py); the first --eval are held out, the next --reward-pairs train a reward model (a `reward` stage),
the next --dpo-pairs train DPO (a `dpo` stage from the base model: `policy: base`, the reference is the base).
Then, on held-out prompts, the base model and the DPO adapter each answer greedily and the reward model
scores both answers: the figure is the mean reward before and after, their paired difference with a 95%
interval, and how often the DPO answer scores higher. Also reported: the reward model's own held-out pairwise
accuracy (is it a meaningful judge?), the policy's held-out preference (summed log-prob of the chosen answer
minus the rejected one, before/after), and answers before/after to 3 CValues prompts (../shared/data/cvalues).
hh-rlhf: MIT (github.com/anthropics/hh-rlhf); CValues: Apache-2.0 (github.com/X-PLUG/CValues).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reward_hh import held_out_accuracy, split_pairs  # noqa: E402

CVALUES = ROOT.parent / "shared" / "data" / "cvalues" / "responsibility_prompts.jsonl"
CVALUES_IDS = (3, 120, 400)  # climate-change denial, and two other domains; fixed so runs compare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--eval", type=int, default=64, help="held-out pairs (reward model accuracy, policy preference)"
    )
    parser.add_argument("--gen-prompts", type=int, default=32, help="held-out prompts answered before/after and scored")
    parser.add_argument("--reward-pairs", type=int, default=64)
    parser.add_argument("--dpo-pairs", type=int, default=96)
    parser.add_argument(
        "--reward-stage", type=Path, default=None, help="reuse this reward stage instead of training one"
    )
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="DPO learning rate (LoRA)")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--epochs", type=float, default=1.0, help="DPO passes over its pairs")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="wenmai-dpo-hh-"))
    train_file, eval_file = split_pairs(work, args.reward_pairs + args.dpo_pairs, args.eval, args.seed)
    lines = train_file.read_text(encoding="utf-8").splitlines(keepends=True)
    reward_file, dpo_file = work / "reward.jsonl", work / "dpo.jsonl"
    reward_file.write_text("".join(lines[: args.reward_pairs]), encoding="utf-8")
    dpo_file.write_text("".join(lines[args.reward_pairs :]), encoding="utf-8")

    started = time.time()
    run_dir = train(work, reward_file, dpo_file, args)
    reward_stage = args.reward_stage or run_dir.root / "reward"
    results: dict = {
        "eval_pairs": args.eval,
        "reward_pairs": 0 if args.reward_stage else args.reward_pairs,
        "dpo_pairs": args.dpo_pairs,
        "seq_len": args.seq_len,
        "learning_rate": args.learning_rate,
        "beta": args.beta,
        "epochs": args.epochs,
        "dpo": {k: v for k, v in run_dir.status("dpo").summary.items() if k not in ("train_data", "used")},
        "train_wall_s": round(time.time() - started, 1),
    }
    results["reward_model"] = held_out_accuracy(reward_stage, eval_file)
    results.update(compare(run_dir, reward_stage, eval_file, args))
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


def train(work: Path, reward_file: Path, dpo_file: Path, args) -> object:
    """A reward stage (unless one is given) and a dpo stage from the base model, through the recipe path."""
    from finetune.pipeline import load_recipe, start

    common = {
        "eval_fraction": 0,
        "batch_size": 4,
        "gradient_accumulation": 2,
        "seq_len": args.seq_len,
        "warmup": 0.1,
        "logging_steps": 2,
        "save_steps": 100_000,
        "epochs": 1,
    }
    stages = []
    if args.reward_stage is None:
        stages.append(
            {"reward": {"dataset": "reward", "learning_rate": 5e-4, "center_rewards_coefficient": 0.01, **common}}
        )
    stages.append(
        {
            "dpo": {
                "dataset": "dpo",
                "policy": "base",
                "learning_rate": args.learning_rate,
                "beta": args.beta,
                **common,
                "epochs": args.epochs,
            }
        }
    )
    recipe = work / "dpo-hh.yaml"
    recipe.write_text(
        "name: dpo-hh\ninclude: [models/smollm2-135m, lora/small]\n"
        f"data:\n  reward: {{path: {reward_file}, format: pairs}}\n  dpo: {{path: {dpo_file}, format: pairs}}\n"
        f"stages: {json.dumps(stages)}\noutput: {{root: {work / 'runs'}}}\n",
        encoding="utf-8",
    )
    return start(load_recipe(recipe), work / "runs" / "dpo-hh", log=lambda m: print(f"[dpo-hh] {m}", file=sys.stderr))


def compare(run_dir, reward_stage: Path, eval_file: Path, args) -> dict:
    """Base vs DPO adapter: reward of greedy answers to held-out prompts, held-out preference, CValues samples."""
    from finetune.data.records import read_records
    from finetune.evaluation import lm, targets
    from reward.score import RewardScorer

    pairs = read_records(eval_file, "pairs").records
    recipe = targets.run_recipe(run_dir)
    checkpoints = {"base": targets.base_target(recipe), "dpo": targets.stage_target(run_dir, recipe, "dpo")}
    prompts = [p["prompt"] for p in pairs[: args.gen_prompts]]
    cvalues = [json.loads(line) for line in CVALUES.read_text(encoding="utf-8").splitlines()]
    cvalues = [r for r in cvalues if r["id_"] in CVALUES_IDS]
    answers, preference, samples = {}, {}, {}
    for label, target in checkpoints.items():
        model, tokenizer = targets.load(target)
        rendered = [lm.render_prompt(tokenizer, p) for p in prompts]
        answers[label] = lm.generate(model, tokenizer, rendered, args.max_new_tokens, desc=f"{label} answers")
        preference[label] = held_out_preference(model, tokenizer, pairs)
        samples[label] = lm.generate(
            model,
            tokenizer,
            [lm.render_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in cvalues],
            64,
            desc=f"{label} cvalues",
        )
        del model
    scorer = RewardScorer.from_stage(reward_stage)
    scores = {label: scorer.score(prompts, texts)["total"] for label, texts in answers.items()}
    diffs = [a - b for a, b in zip(scores["dpo"], scores["base"], strict=True)]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1))
    return {
        "gen_prompts": len(prompts),
        "reward_before": round(sum(scores["base"]) / len(prompts), 4),
        "reward_after": round(sum(scores["dpo"]) / len(prompts), 4),
        "reward_gain": round(mean, 4),
        "reward_gain_95": [
            round(mean - 1.96 * sd / math.sqrt(len(diffs)), 4),
            round(mean + 1.96 * sd / math.sqrt(len(diffs)), 4),
        ],
        "dpo_answer_scores_higher": round(sum(d > 0 for d in diffs) / len(diffs), 3),
        "held_out_preference": {
            label: {k: v for k, v in found.items() if k != "margins"} for label, found in preference.items()
        },
        "held_out_implicit_reward": implicit_reward(preference, args.beta),
        "samples": {
            "hh_rlhf": [
                {"prompt": p[-1]["content"], "before": answers["base"][i], "after": answers["dpo"][i]}
                for i, p in enumerate(prompts[:3])
            ],
            "cvalues": [
                {"id": r["id_"], "prompt": r["prompt"], "before": samples["base"][i], "after": samples["dpo"][i]}
                for i, r in enumerate(cvalues)
            ],
        },
    }


def held_out_preference(model, tokenizer, pairs: list[dict]) -> dict:
    """Share of held-out pairs whose chosen answer has the higher summed log-prob, and the mean log-prob margin."""
    from finetune.evaluation import lm

    rendered = [lm.render_prompt(tokenizer, p["prompt"]) for p in pairs]
    lengths = {
        key: [
            len(lm.continuation_ids(tokenizer, r, lm.encode(tokenizer, r), p[key]))
            for r, p in zip(rendered, pairs, strict=True)
        ]
        for key in ("chosen", "rejected")
    }
    sums = {
        key: [
            m * n
            for m, n in zip(
                lm.mean_logprobs(model, tokenizer, rendered, [p[key] for p in pairs], desc=key),
                lengths[key],
                strict=True,
            )
        ]
        for key in ("chosen", "rejected")
    }
    margins = [c - r for c, r in zip(sums["chosen"], sums["rejected"], strict=True)]
    return {
        "accuracy": round(sum(m > 0 for m in margins) / len(margins), 4),
        "mean_margin": round(sum(margins) / len(margins), 3),
        "margins": margins,
    }


def implicit_reward(preference: dict, beta: float) -> dict:
    """DPO's own held-out measure (TRL's eval rewards/margins and rewards/accuracies): the reference is the base, so a
    pair's implicit reward margin is beta x (the DPO model's log-prob margin - the base's)."""
    deltas = [beta * (d - b) for d, b in zip(preference["dpo"]["margins"], preference["base"]["margins"], strict=True)]
    mean = sum(deltas) / len(deltas)
    sd = math.sqrt(sum((x - mean) ** 2 for x in deltas) / max(1, len(deltas) - 1))
    half = 1.96 * sd / math.sqrt(len(deltas))
    return {
        "accuracy": round(sum(x > 0 for x in deltas) / len(deltas), 4),
        "mean_margin": round(mean, 4),
        "mean_margin_95": [round(mean - half, 4), round(mean + half, 4)],
    }


def table(results: dict) -> str:
    pref = results["held_out_preference"]
    lines = [
        "| figure | before DPO (base) | after DPO |",
        "| --- | --- | --- |",
        f"| reward-model score of greedy answers, {results['gen_prompts']} held-out prompts | {results['reward_before']} | "
        f"{results['reward_after']} (gain {results['reward_gain']}, 95% {results['reward_gain_95']}; DPO answer higher in "
        f"{results['dpo_answer_scores_higher']:.0%}) |",
        f"| policy prefers chosen (summed log-prob), {results['eval_pairs']} held-out pairs | {pref['base']['accuracy']} "
        f"(margin {pref['base']['mean_margin']}) | {pref['dpo']['accuracy']} (margin {pref['dpo']['mean_margin']}) |",
        f"| DPO implicit reward on the held-out pairs (beta x log-prob margin gained over the base) | 0 | accuracy "
        f"{results['held_out_implicit_reward']['accuracy']}, margin {results['held_out_implicit_reward']['mean_margin']} "
        f"(95% {results['held_out_implicit_reward']['mean_margin_95']}) |",
    ]
    rm = results["reward_model"]
    return "\n".join(lines) + (
        f"\nreward model held-out pairwise accuracy {rm['held_out_accuracy']}; DPO on "
        f"{results['dpo_pairs']} pairs ({results['dpo'].get('steps')} steps), training {results['train_wall_s']} s\n"
        + json.dumps(results["samples"], ensure_ascii=False, indent=1)
    )


if __name__ == "__main__":
    main()
