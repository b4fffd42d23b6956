"""CMMLU culture subjects, 0-shot and 5-shot, before and after the quickstart SFT (SmolLM2-135M-Instruct), with CPU time.

    python scripts/bench/mc_cmmlu.py --limit 15                 # a subsample: the first 15 questions of each subject
    python scripts/bench/mc_cmmlu.py --limit 0                  # every question (~850; hours on 2 CPU cores)
    python scripts/bench/mc_cmmlu.py --run runs/quickstart-...  # reuse a finished quickstart run
    python scripts/bench/mc_cmmlu.py --threads 1 ...            # on a loaded machine: CPU time without spin-waiting

Without --run it first runs recipes/quickstart.yaml (the real recipe path). Each (checkpoint, shots) pair is
evaluated through the same code as `wenmai eval` and the `evaluate` stage (answer-letter log-likelihood,
the tokenizer's chat template, few-shot examples from dev/ as earlier turns). CPU seconds are the process's
user + system time, which on a machine shared with other jobs says more about the cost than the wall clock.
Data: ../shared/data/cmmlu (CMMLU, CC BY-NC-SA 4.0, github.com/haonan-li/CMMLU).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CMMLU = ROOT.parent / "shared" / "data" / "cmmlu"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mc", type=Path, default=CMMLU, help="multiple-choice folder (test/ and dev/)")
    parser.add_argument("--limit", type=int, default=15, help="first N questions of each subject (0: all)")
    parser.add_argument("--shots", default="0,5")
    parser.add_argument(
        "--run", type=Path, default=None, help="a finished quickstart run folder (default: run the quickstart)"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from finetune.evaluation.runner import EvalSpec, evaluate_targets
    from finetune.evaluation.targets import base_target, run_recipe, stage_target
    from finetune.run_dir import RunDir

    results: dict = {"mc": str(args.mc), "limit": args.limit or None, "threads": torch.get_num_threads(), "rows": []}
    run = RunDir.open(args.run) if args.run else quickstart(results)
    recipe = run_recipe(run)
    targets = [base_target(recipe), stage_target(run, recipe, "sft", label="quickstart sft")]
    for shots in [int(s) for s in args.shots.split(",")]:
        for target in targets:
            spec = EvalSpec(mc=args.mc, shots=[shots], mc_limit=args.limit or None, batch_size=args.batch_size)
            cpu, wall = cpu_seconds(), time.perf_counter()
            [result] = evaluate_targets([target], spec, log=print)
            score = result.mc[0]
            results["rows"].append(
                {
                    "checkpoint": target.label,
                    "shots": shots,
                    "questions": score.overall.total,
                    "accuracy": score.overall.accuracy,
                    "ci": [score.overall.ci_low, score.overall.ci_high],
                    "subjects": {s.subject: s.accuracy for s in score.subjects},
                    "cpu_s": round(cpu_seconds() - cpu, 1),
                    "wall_s": round(time.perf_counter() - wall, 1),
                }
            )
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False), encoding="utf-8")


def quickstart(results: dict):
    """Run recipes/quickstart.yaml into a fresh folder and time it."""
    from finetune.pipeline import load_recipe, start

    cpu, wall = cpu_seconds(), time.perf_counter()
    run = start(load_recipe(ROOT / "recipes" / "quickstart.yaml"), log=print)
    results["quickstart"] = {
        "run": str(run.root),
        "cpu_s": round(cpu_seconds() - cpu, 1),
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    return run


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def table(results: dict) -> str:
    subjects = sorted({s for row in results["rows"] for s in row["subjects"]})
    header = ["checkpoint", "shots", "questions", "accuracy [95% CI]", *subjects, "CPU s", "wall s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results["rows"]:
        cells = [
            row["checkpoint"],
            str(row["shots"]),
            str(row["questions"]),
            f"{row['accuracy']:.1f} [{row['ci'][0]:.1f}, {row['ci'][1]:.1f}]",
            *[f"{row['subjects'].get(s, float('nan')):.1f}" for s in subjects],
            str(row["cpu_s"]),
            str(row["wall_s"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
