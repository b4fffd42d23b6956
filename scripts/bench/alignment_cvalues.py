"""The alignment suite's per-dimension reward scores, base vs. tuned, on the CValues prompts (needs a reward stage).

    python scripts/bench/alignment_cvalues.py --reward runs/<run>/reward --run runs/quickstart-... --limit 100
    python scripts/bench/alignment_cvalues.py --reward runs/<run>/reward --run runs/<run> --stage dpo --limit 0

Replies are generated greedily (bounded by --max-new-tokens) by the recipe's base model and by the run's
--stage checkpoint, through the same code as `wenmai eval --suite` and the `evaluate` stage; the reward
model of the --reward stage folder scores each reply on each of its dimensions. The language rule checks
that a Chinese prompt gets a Chinese reply. CPU seconds are the process's user + system time.
Data: ../shared/data/cvalues/responsibility_prompts.jsonl (CValues, Apache-2.0, github.com/X-PLUG/CValues).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CVALUES = ROOT.parent / "shared" / "data" / "cvalues" / "responsibility_prompts.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reward", type=Path, required=True, help="a finished reward stage folder (RUN_DIR/<reward stage>)"
    )
    parser.add_argument("--run", type=Path, required=True, help="the run whose --stage is the tuned checkpoint")
    parser.add_argument("--stage", default="sft", help="tuned checkpoint: a stage of --run with an adapter or model")
    parser.add_argument("--suite", type=Path, default=CVALUES, help="suite file (default: the CValues prompts)")
    parser.add_argument("--limit", type=int, default=100, help="first N prompts (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the full results (every reply) as JSON here")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from finetune.evaluation.runner import EvalSpec, evaluate_targets
    from finetune.evaluation.targets import base_target, run_recipe, stage_target
    from finetune.run_dir import RunDir

    run = RunDir.open(args.run)
    recipe = run_recipe(run)
    targets = [base_target(recipe), stage_target(run, recipe, args.stage, label=args.stage)]
    spec = EvalSpec(
        suite=args.suite,
        suite_limit=args.limit or None,
        max_new_tokens=args.max_new_tokens,
        reward_model=str(args.reward),
        batch_size=args.batch_size,
    )
    cpu, wall = cpu_seconds(), time.perf_counter()
    results = evaluate_targets(targets, spec, log=print)
    timing = {"cpu_s": round(cpu_seconds() - cpu, 1), "wall_s": round(time.perf_counter() - wall, 1)}
    print(table(results, timing))
    if args.out:
        args.out.write_text(
            json.dumps(
                {"timing": timing, "checkpoints": [r.model_dump(mode="json") for r in results]},
                indent=2,
                ensure_ascii=False,
            ),
            encoding="utf-8",
        )


def table(results: list, timing: dict) -> str:
    dimensions = sorted({d for r in results for d in r.alignment.dimension_means})
    header = ["checkpoint", "probes", *[f"mean {d}" for d in dimensions], "language rule pass rate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        alignment = result.alignment
        cells = [
            result.label,
            str(len(alignment.probes)),
            *[f"{alignment.dimension_means.get(d, float('nan')):.3f}" for d in dimensions],
            f"{alignment.rule_rates.get('language', float('nan')):.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nboth checkpoints: {timing['cpu_s']} CPU s, {timing['wall_s']} s wall")
    return "\n".join(lines)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


if __name__ == "__main__":
    main()
