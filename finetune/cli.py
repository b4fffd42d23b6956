"""The `wenmai` command: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import sys
import typing
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune.errors import WenmaiError

app = typer.Typer(
    name="wenmai",
    help="Wenmai (文脉): fine-tune language models into cultural vertical models from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

SetOption = Annotated[list[str], typer.Option("--set", help="Override a recipe key: a.b.c=value (e.g. stages.sft.max_steps=5).")]


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False) -> None:
    """Wenmai (文脉): fine-tune language models into cultural vertical models from one YAML recipe."""


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")], set_: SetOption = None) -> None:
    """Check a recipe and its data without loading weights; print the resolved recipe and the plan."""
    from finetune.config_io import load_recipe
    from finetune.pipeline import check_data, preflight

    loaded = load_recipe(recipe, set_ or [])
    out.print("[bold]Resolved recipe[/] (each value's origin after #)")
    out.print(loaded.to_yaml(annotate=True), highlight=False, markup=False)
    counts = check_data(loaded.recipe)
    out.print(plan_table(loaded.recipe, counts))
    for problem in preflight(loaded.recipe):
        console.print(f"[yellow]warning:[/] {problem}")
    out.print("[green]recipe is valid[/]")


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (optional with --resume).")] = None,
    set_: SetOption = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder: skip finished stages, resume the interrupted one.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Folder for this run (default: <output.root>/<name>-<UTC time>).")] = None,
) -> None:
    """Run every stage of a recipe into a new run folder (or resume one)."""
    from finetune import pipeline
    from finetune.config_io import load_recipe

    log = lambda message: console.print(f"[cyan]wenmai[/] {message}", highlight=False)  # noqa: E731
    if resume is not None:
        if run_dir is not None:
            raise WenmaiError("--run-dir and --resume cannot be combined: --resume names the folder to continue")
        folder = pipeline.resume(resume, recipe, tuple(set_ or ()), log=log)
    elif recipe is None:
        raise WenmaiError("give a recipe file (wenmai run recipes/quickstart.yaml) or --resume RUN_DIR")
    else:
        folder = pipeline.start(load_recipe(recipe, set_ or []), run_dir, log=log)
    out.print(summary_table(folder))
    out.print(f"[green]run finished:[/] {folder.root}")


@app.command()
def stages() -> None:
    """List the stage kinds and their options."""
    from finetune.stages import STAGES

    for kind, module in STAGES.items():
        table = Table(title=f"[bold]{kind}[/] — {(module.Config.__doc__ or '').strip()}", title_justify="left", expand=True)
        table.add_column("option", style="cyan", no_wrap=True)
        table.add_column("type")
        table.add_column("default")
        table.add_column("meaning")
        for name, info in module.Config.model_fields.items():
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            table.add_row(name, _type_name(info.annotation), default, info.description or "")
        out.print(table)


reward_app = typer.Typer(help="Reward models: score answers with a trained reward model.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")


@reward_app.command("score")
def reward_score(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its reward stage folder, or a reward_model folder).")],
    input_: Annotated[Path, typer.Option("--input", help="JSONL/JSON/Parquet/CSV: `prompt` + `response`, or `messages` ending with the answer.")],
    stage: Annotated[str | None, typer.Option(help="Reward stage to use when the run has several.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write each input record with its `scores` here (JSONL).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Answers per forward pass.")] = 8,
) -> None:
    """Score answers per reward dimension and the weighted total with a run's reward model."""
    import json

    from finetune.run_dir import atomic_write_text
    from reward.score import score_file

    scored, names = score_file(run_dir, input_, stage, batch_size)
    if output is not None:
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    out.print(score_table(scored, names, rows=0 if output else 50))
    if output is not None:
        out.print(f"[green]scores written:[/] {output}")


def score_table(scored: list[dict], names: list[str], rows: int) -> Table:
    """The first `rows` scored records and the mean of each score."""
    table = Table(title=f"Reward scores ({len(scored)} answers)", title_justify="left")
    table.add_column("#")
    table.add_column("answer")
    for name in names:
        table.add_column(name, justify="right")
    for i, record in enumerate(scored[:rows], start=1):
        answer = str(record.get("response") or (record.get("messages") or [{}])[-1].get("content", ""))
        table.add_row(str(i), answer[:40] + ("…" if len(answer) > 40 else ""), *(f"{record['scores'][n]:.3f}" for n in names))
    means = [sum(r["scores"][n] for r in scored) / len(scored) for n in names]
    table.add_row("", "[bold]mean[/]", *(f"{m:.3f}" for m in means))
    return table


def plan_table(recipe, counts: dict[str, dict]) -> Table:
    """Stages in order with their wiring, datasets and sizes, and the LoRA size estimate."""
    from finetune.model import estimate_lora_parameters, model_config_dict
    from finetune.recipe import wiring

    inputs, _ = wiring(recipe)
    config = model_config_dict(recipe.model)
    lora = estimate_lora_parameters(config, recipe.lora) if config else None
    title = "Plan" + (f" — LoRA r={recipe.lora.r} ({recipe.lora.variant}) trains ≈{lora:,} parameters" if lora else "")
    table = Table(title=title, title_justify="left")
    for column in ("#", "stage", "kind", "reads", "data", "length"):
        table.add_column(column)
    for i, stage in enumerate(recipe.stage_configs(), start=1):
        reads = ", ".join(f"{field} ← {source}" for field, source in inputs[stage.stage_name].items()) or "—"
        datasets = [getattr(stage, f) for f, info in type(stage).model_fields.items()
                    if isinstance(info.json_schema_extra, dict) and "dataset" in info.json_schema_extra and getattr(stage, f)]
        data = ", ".join(f"{d} ({counts.get(d, {}).get('records', '?')} records)" for d in datasets) or "—"
        steps = getattr(stage, "max_steps", None)
        length = "—" if steps is None else (f"{steps} steps" if steps > 0 else f"{stage.epochs:g} epochs")
        table.add_row(str(i), stage.stage_name, stage.kind, reads, data, length)
    return table


def summary_table(run_dir) -> Table:
    """One row per stage: state and its headline figures."""
    from finetune.config_io import load_resolved

    recipe = load_resolved(run_dir.recipe_path.read_text(encoding="utf-8"), run_dir.recipe_path).recipe
    table = Table(title=f"Run {run_dir.name}", title_justify="left")
    for column in ("stage", "state", "figures"):
        table.add_column(column)
    for stage in recipe.stage_configs():
        status = run_dir.status(stage.stage_name)
        figures = ", ".join(f"{k}={v}" for k, v in (status.summary if status else {}).items() if not isinstance(v, dict))
        table.add_row(stage.stage_name, status.state if status else "pending", figures)
    return table


def _type_name(annotation) -> str:
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def main() -> None:
    """Entry point: user errors print one red block and exit 2; tracebacks only with --debug."""
    import click

    debug = "--debug" in sys.argv
    if not debug:  # library deprecation notices are not actionable for a recipe author
        warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app(standalone_mode=False)
    except WenmaiError as err:
        if debug:
            console.print_exception()
        console.print(Text("error: ", style="bold red") + Text(str(err)), soft_wrap=True, highlight=False)
        sys.exit(2)
    except click.exceptions.Abort:
        console.print("[red]aborted[/]")
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(2)
    except click.exceptions.Exit as err:
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
