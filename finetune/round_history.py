"""The history of a run's rounds (`wenmai rounds RUN`, and the report's rounds table): each round's run folder,
the data it added by source, its scores per reward dimension and multiple-choice subject set, its gate and
whether it was exported. Rounds are followed through each run's recipe (`round.parent`), oldest first.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, Field

from finetune.config_io import load_run_recipe
from finetune.errors import WenmaiError
from finetune.run_dir import STATUS_FILE, RunDir

MAX_ROUNDS = 1000  # a parent link that loops is a broken folder, not history


class RoundRow(BaseModel):
    """One round, as its run folder tells it."""

    number: int
    run: str
    parent: str | None = None
    feedback: str = ""
    data: dict[str, dict[str, int]] = Field(default_factory=dict, description="Dataset -> source -> records kept.")
    scores: dict[str, float] = Field(default_factory=dict, description="Mean suite score per reward dimension.")
    mc: dict[str, float] = Field(default_factory=dict, description="Multiple-choice accuracy (percent) per set.")
    gate: dict | None = None
    exported: bool = False
    seconds: float | None = None

    def data_text(self) -> str:
        """`dataset: source n, ...; ...`, or — when the round added no data."""
        return (
            "; ".join(
                f"{name}: " + ", ".join(f"{source} {n}" for source, n in sources.items())
                for name, sources in self.data.items()
            )
            or "—"
        )

    def gate_text(self) -> str:
        """passed, failed: <gates>, or — without a gate."""
        if self.gate is None:
            return "—"
        return "passed" if self.gate.get("passed") else "failed: " + ", ".join(self.gate.get("failed", []))

    def score_cells(self, dimensions: list[str], sets: list[str]) -> list[str]:
        """This round's mean per dimension and accuracy per multiple-choice set, — where it has none."""
        return [f"{self.scores[d]:.3f}" if d in self.scores else "—" for d in dimensions] + [
            f"{self.mc[m]:.1f}" if m in self.mc else "—" for m in sets
        ]


def score_columns(rows: list[RoundRow]) -> tuple[list[str], list[str]]:
    """The reward dimensions and multiple-choice sets any of `rows` has scores for, in order of appearance."""
    dimensions = list(dict.fromkeys(d for row in rows for d in row.scores))
    return dimensions, list(dict.fromkeys(m for row in rows for m in row.mc))


def round_history(run: str | Path | RunDir) -> list[RoundRow]:
    """Every round up to `run`, oldest first (a run that is no round is round 1 alone)."""
    run_dir = run if isinstance(run, RunDir) else RunDir.open(run)
    rows: list[RoundRow] = []
    seen: set[Path] = set()
    while run_dir is not None and len(rows) < MAX_ROUNDS:
        root = run_dir.root.resolve()
        if root in seen:
            raise WenmaiError(f"{root}: its round parents loop back to it; check `round.parent` in recipe.yaml")
        seen.add(root)
        row = round_row(run_dir)
        rows.append(row)
        run_dir = _parent(row)
    return list(reversed(rows))


def round_row(run_dir: RunDir) -> RoundRow:
    """One run folder's row: its round, data, scores, gate, export and wall time."""
    recipe = load_run_recipe(run_dir).recipe
    link = recipe.round
    row = RoundRow(
        number=link.number if link else 1,
        run=str(run_dir.root),
        parent=link.parent if link else None,
        feedback=link.feedback if link else "",
    )
    started, finished = [], []
    for config in recipe.stage_configs():
        name = config.stage_name
        status = run_dir.status(name)
        if status is None:
            continue
        started += [status.started] if status.started else []
        finished += [status.finished] if status.finished else []
        if config.kind == "export" and status.state == "done":
            row.exported = True
        if config.kind == "evaluate":
            row.gate = status.summary.get("gate") or row.gate
            _scores(run_dir.root / name / "evaluation.json", row)
        _data(run_dir.root / name / "data_card.json", row)
    if started and finished:
        row.seconds = round((_time(max(finished)) - _time(min(started))).total_seconds(), 1)
    return row


def _parent(row: RoundRow) -> RunDir | None:
    if row.parent is None:
        return None
    if not (Path(row.parent) / STATUS_FILE).parent.is_dir():
        raise WenmaiError(f"round {row.number} ({row.run}) names parent {row.parent}, which is not there")
    return RunDir.open(row.parent)


def _scores(path: Path, row: RoundRow) -> None:
    """The evaluated model's (first checkpoint's) means per dimension and accuracy per multiple-choice set."""
    if not path.is_file():
        return
    evaluation = json.loads(path.read_text(encoding="utf-8"))
    if row.gate is None and evaluation.get("gates"):  # a failed gate stopped the stage before its summary
        failed = [g["gate"] for g in evaluation["gates"] if not g["passed"]]
        row.gate = {"passed": not failed, "forced": evaluation.get("forced", False), "failed": failed}
    model = evaluation["checkpoints"][0]
    alignment = model.get("alignment") or {}
    row.scores.update({k: v for k, v in (alignment.get("dimension_means") or {}).items() if v is not None})
    for mc in model.get("mc") or []:
        row.mc[mc["name"]] = mc["overall"]["accuracy"]


def _data(path: Path, row: RoundRow) -> None:
    """Records kept per dataset and source, from a stage's data card (each dataset counted once)."""
    if not path.is_file():
        return
    for dataset in json.loads(path.read_text(encoding="utf-8")).get("datasets", []):
        if dataset["name"] not in row.data:
            row.data[dataset["name"]] = dict(dataset.get("sources") or {"unknown": dataset.get("kept", 0)})


def _time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
