"""Federated LoRA on SmolLM2-135M with three pretend museums (`recipes/federated-museums.yaml`): held-out loss of the
global adapter against local-only and centralised training, wall time and bytes per round, and the same with DP.

    python scripts/bench/federated_smollm2.py                         # fedavg, then fedavg with DP
    python scripts/bench/federated_smollm2.py --rounds 2 --local-steps 2 --records 40 --only plain   # shorter

Each museum's data is the quickstart's sample Q&A of one main topic (palace: museum objects, poetry, heritage
sites), `--records` of them, 10% held out. Both runs are `wenmai federate simulate` (Flower's simulation engine);
the plain one with `--compare`: a local-only adapter per museum (as many steps as it trained in the federation)
and a centralised adapter on the pooled data (as many steps as all museums together), all from the same start,
evaluated on every museum's held-out split. The DP run's utility is its global adapter's held-out loss per round
(the local-only and centralised adapters do not depend on DP). DP: client-side fixed clipping (Flower's
DifferentialPrivacyClientSideFixedClipping) with the given noise multiplier and clipping norm; epsilon from
Flower's RdpAccountant at delta 1e-5 (three clients, every one in every round: no sampling amplification).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from finetune.federated.simulate import simulate
from finetune.pipeline import load_recipe

ROOT = Path(__file__).resolve().parents[2]


def run(args: argparse.Namespace, out: Path, dp: bool) -> dict:
    overrides = [
        f"federated.rounds={args.rounds}",
        f"federated.local_steps={args.local_steps}",
        f"output.root={out}",
        *(f"data.{name}.max_records={args.records}" for name in ("palace", "poetry", "heritage")),
    ]
    if dp:
        overrides += [
            "federated.differential_privacy.clipping=client",
            f"federated.differential_privacy.noise_multiplier={args.noise}",
            f"federated.differential_privacy.clipping_norm={args.clip}",
        ]
    loaded = load_recipe(ROOT / "recipes" / "federated-museums.yaml", overrides)
    started = time.monotonic()
    run_dir = simulate(loaded, run_dir_path=out / ("dp" if dp else "plain"), compare_after=not dp, log=print)
    total = time.monotonic() - started
    stage = run_dir.root / "sft"
    return {
        "run": str(run_dir.root),
        "total_s": round(total, 1),
        "rounds": json.loads((stage / "federated.json").read_text())["rounds"],
        "comparison": json.loads((stage / "comparison.json").read_text()) if not dp else None,
    }


def show(label: str, result: dict) -> None:
    print(f"\n## {label}  ({result['run']}, {result['total_s']} s in all)")
    print("| round | train loss | held-out loss | bytes | wall s | epsilon |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["rounds"]:
        print(
            f"| {r['round']} | {r['train_loss']} | {r.get('eval_loss')} | {r['bytes']:,} | {r['wall_s']} | "
            f"{round(r['epsilon'], 2) if 'epsilon' in r else '-'} |"
        )
    comparison = result["comparison"]
    if comparison is None:
        return
    labels = list(comparison["mean"])
    print(f"\n| held-out split | {' | '.join(labels)} |")
    print("| --- |" + " --- |" * len(labels))
    for name, row in comparison["eval_loss"].items():
        print(f"| {name} | " + " | ".join(f"{row[label]:.4f}" for label in labels) + " |")
    print("| mean | " + " | ".join(f"{comparison['mean'][label]:.4f}" for label in labels) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--records", type=int, default=60, help="records per museum (10%% held out)")
    parser.add_argument("--noise", type=float, default=1.0, help="DP noise multiplier")
    parser.add_argument("--clip", type=float, default=0.5, help="DP clipping norm (L2 of a client's update)")
    parser.add_argument("--only", choices=("plain", "dp", "both"), default="both", help="which runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-federated")
    args = parser.parse_args()
    if args.only != "dp":
        show("fedavg", run(args, args.out, dp=False))
    if args.only != "plain":
        show(f"fedavg + DP (noise {args.noise}, clip {args.clip})", run(args, args.out, dp=True))


if __name__ == "__main__":
    main()
