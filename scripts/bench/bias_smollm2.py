"""Implicit bias of SmolLM2-135M-Instruct before and after fine-tuning: the example bias suite's scores per
category, with 95% bootstrap intervals, for the base, the quickstart SFT, SFT with counterfactual augmentation
and the `debias` stage; and the task-loss cost of debiasing.

    python scripts/bench/bias_smollm2.py                  # one run folder, four checkpoints, a markdown table
    python scripts/bench/bias_smollm2.py --steps 10       # the quickstart's SFT length (default)

One run on the quickstart's model and data (`recipes/data/culture_sft.jsonl`) with four training stages:
`sft` (the quickstart's SFT options), `sft_aug` (the same on the same file with `data.augment`'s term pairs),
`plain` (the debias loop with adversary_weight 0, i.e. SFT from the `sft` adapter) and `debias`
(adversary_weight 1 from the same adapter, attribute from the pairs' two sides). Then `wenmai eval`'s
comparison on `recipes/suites/bias-example.yaml`. SmolLM2's Chinese is weak: the Chinese probes' share of
each category makes those figures indicative only.
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from pathlib import Path

from finetune.evaluation.compare import compare
from finetune.evaluation.runner import EvalSpec
from finetune.pipeline import load_recipe, start
from finetune.run_dir import RunDir

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "recipes" / "suites" / "bias-example.yaml"
PAIRS = [
    ["他", "她"], ["男性", "女性"], ["男", "女"], ["汉族", "藏族"], ["he", "she"], ["him", "her"], ["his", "her"],
    ["man", "woman"], ["men", "women"], ["Han", "Tibetan"],
]  # fmt: skip
PROTECT = ["其他", "他人", "他们", "女娲", "男爵", "吉他", "Hermitage"]


def recipe_text(steps: int) -> str:
    """The quickstart's model and data, four training stages (no evaluate: the comparison runs after)."""
    sft = (
        f"seq_len: 256, max_steps: {steps}, batch_size: 4, learning_rate: 5.0e-4, warmup: 1, logging_steps: 1, "
        f"save_steps: 1000"
    )
    defaults = "{licence: CC0-1.0, source: {institution: Wenmai project}, sensitivity: public}"
    return textwrap.dedent(f"""\
        name: bias-bench
        include: [models/smollm2-135m, lora/small]
        data:
          policy: {{intended_use: research, max_sensitivity: internal, allow_missing_rights: false,
                   pii: {{action: mask}}, dedup: {{exact: true, near: false}}}}
          culture: {{path: {ROOT}/recipes/data/culture_sft.jsonl, format: chat, defaults: {defaults}}}
          culture_aug: {{path: {ROOT}/recipes/data/culture_sft.jsonl, format: chat, defaults: {defaults}}}
          augment:
            pairs: {json.dumps(PAIRS, ensure_ascii=False)}
            protect: {json.dumps(PROTECT, ensure_ascii=False)}
            datasets: [culture_aug]
        stages:
          - sft: {{dataset: culture, {sft}}}
          - sft: {{name: sft_aug, dataset: culture_aug, {sft}}}
          - debias: {{name: plain, policy: sft, dataset: culture, adversary_weight: 0, {sft}}}
          - debias: {{name: debias, policy: sft, dataset: culture, adversary_weight: 1, {sft}}}
        output: {{root: runs/bench}}
        """)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bias"))
    parser.add_argument("--steps", type=int, default=10, help="Optimiser steps of each training stage.")
    parser.add_argument("--run-dir", type=Path, help="A finished run of this script: evaluate it again.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    if args.run_dir is None:
        recipe = args.out / "bias-bench.yaml"
        recipe.write_text(recipe_text(args.steps), encoding="utf-8")
        started = time.perf_counter()
        run = start(load_recipe(recipe), args.out / f"run-{int(time.time())}", log=print)
        seconds["training"] = time.perf_counter() - started
    else:
        run = RunDir.open(args.run_dir)
    started = time.perf_counter()
    stages = ["sft", "sft_aug", "debias"]
    evaluation = compare([str(run.root / s) for s in stages] + ["base"], EvalSpec(suite=SUITE), log=print)
    seconds["evaluation"] = time.perf_counter() - started
    (args.out / "bias.json").write_text(evaluation.model_dump_json(indent=2), encoding="utf-8")

    # the checkpoints come back in the order asked for (their labels are the folders' paths)
    checkpoints = dict(zip([*stages, "base"], [c.alignment.implicit for c in evaluation.checkpoints], strict=True))
    order = ["base", *stages]
    print("\n| category | score | " + " | ".join(order) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in order) + " |")
    for category in checkpoints["base"].categories:
        for kind in ("association", "decision", "ambiguous", "disambiguated"):
            cells = []
            for label in order:
                estimate = getattr(checkpoints[label].categories[category], kind)
                cells.append(estimate.shown() if estimate else "—")
            print(f"| {category} | {kind} | " + " | ".join(cells) + " |")
    summaries = {name: run.status(name).summary for name in ("sft_aug", "plain", "debias")}
    plain, debias = summaries["plain"], summaries["debias"]
    print(f"\ncounterfactual copies added: {summaries['sft_aug']['data'].get('augmented')}")
    print(f"debias attribute records: {debias['attribute']}")
    print("| stage | task loss before | task loss after | adversary (every step) | probe before | after | chance |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, label in (("plain", "plain (λ=0)"), ("debias", "debias (λ=1)")):
        s = summaries[name]
        print(
            f"| {label} | {s['before']['task_loss']} | {s['after']['task_loss']} | {adversary_accuracy(run, name)} | "
            f"{s['before']['leakage_accuracy']} | {s['after']['leakage_accuracy']} | {s['after']['chance']} |"
        )
    cost = round(debias["after"]["task_loss"] - plain["after"]["task_loss"], 4)
    print(f"task-loss cost of debiasing (debias - plain, nats/token): {cost}")
    print(f"wall time: {json.dumps({k: round(v) for k, v in seconds.items()})}")


def adversary_accuracy(run: RunDir, stage: str) -> float | None:
    """The adversary's accuracy over the whole stage (each batch scored before it learns from it), from the
    logged rows: with a few labelled records a batch, the last logging step's figure is one or two records."""
    rows = [json.loads(line) for line in run.metrics_path(stage).read_text(encoding="utf-8").splitlines()]
    values = [row["adversary_accuracy"] for row in rows if "adversary_accuracy" in row]
    return round(sum(values) / len(values), 3) if values else None


if __name__ == "__main__":
    main()
