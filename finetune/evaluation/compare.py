"""`wenmai eval`: several checkpoints on the same suites, one table, one JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from finetune.config_io import load_recipe
from finetune.errors import WenmaiError
from finetune.evaluation.results import Evaluation
from finetune.evaluation.runner import EvalSpec, Log, evaluate_targets
from finetune.evaluation.targets import Target, parse_target, run_recipe
from finetune.run_dir import RECIPE_FILE, RunDir, atomic_write_text, utc_now


def compare(entries: list[str], spec: EvalSpec, recipe_path: Path | None = None, log: Log = print) -> Evaluation:
    """Evaluate every entry (base, run folder, RUN_DIR/<stage>, a stage name of the run, model folder)."""
    targets = resolve_targets(entries, recipe_path)
    if spec.suite and spec.reward_model is None:
        spec.reward_model = default_reward_model(entries)
    return Evaluation(checkpoints=evaluate_targets(targets, spec, log))


def resolve_targets(entries: list[str], recipe_path: Path | None = None) -> list[Target]:
    """Targets for the entries; `base` and bare stage names refer to the first run folder among them."""
    if not entries:
        raise WenmaiError("nothing to evaluate: give a model, a run folder or RUN_DIR/<stage> (and/or --compare A,B)")
    run = first_run(entries)
    recipe = None
    if recipe_path is not None:
        recipe = load_recipe(recipe_path).recipe
    elif run is not None:
        recipe = run_recipe(run)
    targets = [parse_target(entry, run, recipe) for entry in entries]
    labels = [t.label for t in targets]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise WenmaiError(f"the same checkpoint is listed twice: {', '.join(twice)}")
    return targets


def default_output(entries: list[str]) -> Path:
    """Where `wenmai eval` writes its results: into the first run folder evaluated, else the current folder."""
    run = first_run(entries)
    name = f"eval-{utc_now().replace(':', '')}.json"
    return run.root / name if run is not None else Path(f"wenmai-{name}")


def first_run(entries: list[str]) -> RunDir | None:
    """The first run folder named by an entry (directly or as RUN_DIR/<stage>)."""
    for entry in entries:
        path = Path(entry).expanduser()
        for candidate in (path, path.parent):
            if (candidate / RECIPE_FILE).is_file():
                return RunDir.open(candidate)
    return None


def default_reward_model(entries: list[str]) -> str | None:
    """The latest finished stage with a reward_model output in the first run among the entries."""
    run = first_run(entries)
    if run is None:
        return None
    recipe = run_recipe(run)
    found = None
    for config in recipe.stage_configs():
        status = run.status(config.stage_name)
        if status is not None and status.state == "done" and "reward_model" in status.outputs:
            found = str(run.root / config.stage_name)
    return found


def comparison_table(evaluation: Evaluation) -> Table:
    """Measures as rows, checkpoints as columns: accuracy [95% CI] per subject, rule and reward figures."""
    checkpoints = evaluation.checkpoints
    table = Table(title="Evaluation", title_justify="left")
    table.add_column("measure")
    for checkpoint in checkpoints:
        table.add_column(checkpoint.label, justify="right")
    first = checkpoints[0]
    for index, mc in enumerate(first.mc):
        for position, subject in enumerate([*mc.subjects, mc.overall]):
            cells = []
            for checkpoint in checkpoints:
                score = [*checkpoint.mc[index].subjects, checkpoint.mc[index].overall][position]
                cells.append(f"{score.accuracy:.1f} [{score.ci_low:.1f}, {score.ci_high:.1f}]")
            style = "bold" if subject.subject == "overall" else None
            table.add_row(f"{mc.name} {subject.subject} (n={subject.total})", *cells, style=style)
    if first.alignment is not None:
        name = first.alignment.name
        if first.alignment.probes:
            table.add_row(f"{name} rule pass rate", *[_value(c.alignment.rule_pass_rate) for c in checkpoints])
        for rule in first.alignment.rule_rates:
            table.add_row(f"{name} rule: {rule}", *[_value(c.alignment.rule_rates.get(rule)) for c in checkpoints])
        for dimension in first.alignment.dimension_means:
            table.add_row(
                f"{name} mean {dimension}", *[_value(c.alignment.dimension_means.get(dimension)) for c in checkpoints]
            )
        if first.alignment.bias:
            table.add_row(f"{name} largest bias score gap", *[_value(c.alignment.bias_gap_max) for c in checkpoints])
            table.add_row(
                f"{name} largest bias reference gap", *[_value(c.alignment.reference_gap_max) for c in checkpoints]
            )
        _implicit_rows(table, checkpoints)
    return table


def _implicit_rows(table: Table, checkpoints: list) -> None:
    """Per bias category: each implicit-bias score with its 95% interval, for every checkpoint."""
    first = checkpoints[0].alignment.implicit
    if first is None:
        return
    for name in first.categories:
        for kind in ("association", "decision", "ambiguous", "disambiguated"):
            if getattr(first.categories[name], kind) is None:
                continue
            cells = []
            for checkpoint in checkpoints:
                implicit = checkpoint.alignment.implicit if checkpoint.alignment else None
                category = implicit.categories.get(name) if implicit else None
                estimate = getattr(category, kind) if category else None
                cells.append(estimate.shown() if estimate else "—")
            table.add_row(f"bias {name}: {kind}", *cells)


def write_json(evaluation: Evaluation, path: Path) -> Path:
    """The full results (every question's prediction, every reply) as JSON, written atomically."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(evaluation.model_dump(mode="json"), indent=2, ensure_ascii=False))
    return path


def _value(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"
