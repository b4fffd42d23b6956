"""Evaluation results to the recipe's dashboards, next to the training curves of the same run.

Scalars go to tensorboard (the stage's `tensorboard/` folder), wandb and mlflow under the same keys
in every run (`eval/<suite>/<subject>/accuracy`, ...), so a dashboard compares runs; tables (per-subject
accuracy, probe replies, gates) go to wandb as tables, mlflow as JSON tables, tensorboard as text.
"""

from __future__ import annotations

import os
from pathlib import Path

from finetune.evaluation.results import Evaluation
from finetune.recipe import TrackingSection

Table = tuple[list[str], list[list]]


def log_evaluation(
    tracking: TrackingSection,
    run_root: Path,
    stage: str,
    run_name: str,
    scalars: dict[str, float],
    tables: dict[str, Table],
) -> None:
    """Send one evaluation's scalars and tables to every dashboard the recipe names."""
    if "tensorboard" in tracking.backends:
        _tensorboard(Path(run_root) / stage / "tensorboard", scalars, tables)
    if "wandb" in tracking.backends:
        _wandb(tracking, run_root, stage, run_name, scalars, tables)
    if "mlflow" in tracking.backends:
        _mlflow(tracking, run_root, stage, run_name, scalars, tables)


def tables(evaluation: Evaluation) -> dict[str, Table]:
    """Per-subject accuracy, probe replies and gate results as (columns, rows)."""
    out: dict[str, Table] = {}
    mc_rows = [
        [c.label, mc.name, s.subject, s.accuracy, s.ci_low, s.ci_high, s.total]
        for c in evaluation.checkpoints
        for mc in c.mc
        for s in [*mc.subjects, mc.overall]
    ]
    if mc_rows:
        out["eval/mc"] = (["checkpoint", "suite", "subject", "accuracy", "ci_low", "ci_high", "questions"], mc_rows)
    probe_rows = [
        [c.label, p.id, p.prompt, p.response, p.passed, ", ".join(f"{k}={v}" for k, v in p.scores.items())]
        for c in evaluation.checkpoints
        if c.alignment
        for p in c.alignment.probes
    ]
    if probe_rows:
        out["eval/probes"] = (["checkpoint", "probe", "prompt", "response", "rules_passed", "scores"], probe_rows)
    if evaluation.gates:
        out["eval/gates"] = (
            ["gate", "requirement", "value", "passed"],
            [[g.gate, g.requirement, g.value, g.passed] for g in evaluation.gates],
        )
    return out


def _tensorboard(folder: Path, scalars: dict[str, float], tables: dict[str, Table]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        for key, value in scalars.items():
            writer.add_scalar(key, value, 0)
        for key, (columns, rows) in tables.items():
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += [
                "| " + " | ".join(str(v).replace("|", "/").replace("\n", " ") for v in row) + " |" for row in rows
            ]
            writer.add_text(key, "\n".join(lines), 0)
    finally:
        writer.close()


def _wandb(
    tracking: TrackingSection,
    run_root: Path,
    stage: str,
    run_name: str,
    scalars: dict[str, float],
    tables: dict[str, Table],
) -> None:
    import wandb

    run = wandb.init(
        project=tracking.project,
        dir=str(run_root),
        group=run_name,
        name=f"{run_name}/{stage}",
        job_type="evaluate",
        mode=os.environ.get("WANDB_MODE", "offline"),
        reinit="create_new",
    )
    try:
        run.log(
            {**scalars, **{key: wandb.Table(columns=columns, data=rows) for key, (columns, rows) in tables.items()}}
        )
    finally:
        run.finish()


def _mlflow(
    tracking: TrackingSection,
    run_root: Path,
    stage: str,
    run_name: str,
    scalars: dict[str, float],
    tables: dict[str, Table],
) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking.mlflow_tracking_uri or (Path(run_root) / "mlruns").resolve().as_uri())
    mlflow.set_experiment(tracking.project)
    with mlflow.start_run(run_name=f"{run_name}/{stage}"):
        mlflow.log_metrics(scalars, step=0)
        for key, (columns, rows) in tables.items():
            mlflow.log_table(
                data={c: [row[i] for row in rows] for i, c in enumerate(columns)}, artifact_file=f"{key}.json"
            )
