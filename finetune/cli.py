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
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    gpus: Annotated[int, typer.Option(help="Check for this many processes (GPUs) per node.")] = 1,
    nodes: Annotated[int, typer.Option(help="Check for this many nodes.")] = 1,
) -> None:
    """Check a recipe and its data without loading weights; print the resolved recipe and the plan."""
    from finetune.config_io import load_recipe
    from finetune.distributed.preflight import check
    from finetune.pipeline import check_data, preflight
    from finetune.speed import plan_lines as speed_plan_lines

    loaded = load_recipe(recipe, set_ or [])
    out.print("[bold]Resolved recipe[/] (each value's origin after #)")
    out.print(loaded.to_yaml(annotate=True), highlight=False, markup=False)
    counts = check_data(loaded.recipe)
    out.print(plan_table(loaded.recipe, counts))
    out.print(data_table([c["report"] for c in counts.values() if c.get("report")]))
    for problem in preflight(loaded.recipe, distributed=False):
        console.print(f"[yellow]warning:[/] {problem}")
    report = check(loaded.recipe, world_size=gpus * nodes, gpus_per_node=gpus, with_estimates=True)
    show_report(report, planning=True)
    for line in speed_plan_lines(loaded.recipe):
        out.print(f"[bold]speed on this machine[/] {line}", highlight=False)
    out.print("[green]recipe is valid[/]")


@app.command()
def launch(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (optional with --resume).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes per node, one per GPU.")] = 1,
    nodes: Annotated[int, typer.Option(help="Nodes in the job; run this command once on each.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank, 0 .. nodes-1 (SLURM: $SLURM_NODEID).")] = 0,
    master_addr: Annotated[str | None, typer.Option(help="Address of node 0 (several nodes).")] = None,
    master_port: Annotated[int, typer.Option(help="Port on node 0 for the processes to meet (several nodes).")] = 29500,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder shared by every process (default: <output.root>/<name>-<UTC time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder on several processes.")] = None,
    set_: SetOption = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the command and the findings; start nothing.")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Start the processes on CPU (gloo backend): tests and debugging.")] = False,
) -> None:
    """Run a recipe on several GPUs or nodes: checks it, then starts one process per GPU with torchrun."""
    from finetune.config_io import load_recipe, load_resolved
    from finetune.distributed import launch as launching
    from finetune.distributed.preflight import check
    from finetune.pipeline import check_data
    from finetune.run_dir import RunDir

    if resume is not None:
        folder = RunDir.open(resume)
        loaded = load_resolved(folder.recipe_path.read_text(encoding="utf-8"), folder.recipe_path)
    elif recipe is None:
        raise WenmaiError("give a recipe file (wenmai launch recipes/x.yaml --gpus 8) or --resume RUN_DIR")
    else:
        loaded = load_recipe(recipe, set_ or [])
    launch_plan = launching.plan(recipe, loaded.recipe, gpus, nodes, node_rank, master_addr, master_port, run_dir, resume,
                                 tuple(set_ or ()), cpu)
    check_data(loaded.recipe)
    report = check(loaded.recipe, world_size=gpus * nodes, gpus_per_node=gpus, launch_on_gpus=not cpu, with_estimates=True)
    show_report(report, planning=dry_run)
    out.print(launch_plan.shell(), highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        return
    launching.execute(launch_plan)


def show_report(report, planning: bool) -> None:
    """Print the pre-flight findings and the memory estimate; raise on findings that stop the run."""
    from finetune.errors import ConfigError, Problem

    blocking = report.blocking(planning)
    for finding in report.findings:
        if finding not in blocking:
            console.print(f"[yellow]warning:[/] {finding}", highlight=False)
    if report.estimates:
        out.print(memory_table(report))
    if blocking:
        raise ConfigError([Problem(f.path, f.message) for f in blocking], "pre-flight found problems")


def memory_table(report) -> Table:
    """The per-GPU memory estimate of each trainer stage."""
    from finetune.distributed.memory import gib

    hardware = report.hardware
    device = f"{hardware.gpu_name}, {gib(hardware.gpu_memory)}" if hardware.cuda else "no GPU here"
    table = Table(title=f"Memory per GPU (estimate; {report.world_size} process{'es' if report.world_size > 1 else ''}; {device})",
                  title_justify="left")
    for column in ("stage", "weights", "adapter + grads + optimizer", "activations", "logits", "total"):
        table.add_column(column)
    for est in report.estimates:
        training = est.parts["adapter"] + est.parts["gradients"] + est.parts["optimizer"]
        total = gib(est.total) + (f" (loading {gib(est.load_peak)})" if est.load_peak else "")
        table.add_row(est.stage, gib(est.parts["weights"]), gib(training), gib(est.parts["activations"]),
                      gib(est.parts["logits"]), total)
    notes = [n for est in report.estimates for n in est.notes]
    if any(est.host_per_node for est in report.estimates):
        notes.append("host memory per node for offload: " + ", ".join(f"{e.stage} {gib(e.host_per_node)}" for e in report.estimates))
    if notes:
        table.caption = "\n".join(dict.fromkeys(notes))
    return table


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (optional with --resume).")] = None,
    set_: SetOption = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder: skip finished stages, resume the interrupted one.")] = None,
    run_dir: Annotated[Path | None, typer.Option(help="Folder for this run (default: <output.root>/<name>-<UTC time>).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Go on past failing evaluate gates (recorded in lineage.json).")] = False,
) -> None:
    """Run every stage of a recipe into a new run folder (or resume one)."""
    from finetune import pipeline
    from finetune.config_io import load_recipe
    from finetune.distributed.ranks import is_main_process, quiet_other_ranks

    quiet_other_ranks()  # under `wenmai launch`, only rank 0 talks
    log = lambda message: console.print(f"[cyan]wenmai[/] {message}", highlight=False)  # noqa: E731
    if resume is not None:
        if run_dir is not None:
            raise WenmaiError("--run-dir and --resume cannot be combined: --resume names the folder to continue")
        folder = pipeline.resume(resume, recipe, tuple(set_ or ()), log=log, force=force)
    elif recipe is None:
        raise WenmaiError("give a recipe file (wenmai run recipes/quickstart.yaml) or --resume RUN_DIR")
    else:
        folder = pipeline.start(load_recipe(recipe, set_ or []), run_dir, log=log, force=force)
    if is_main_process():
        out.print(summary_table(folder))
        out.print(f"[green]run finished:[/] {folder.root}")


@app.command("eval")
def eval_(
    target: Annotated[str | None, typer.Argument(help="base, a run folder, RUN_DIR/<stage>, or a model folder.")] = None,
    mc: Annotated[Path | None, typer.Option(help="Multiple-choice folder: test/<subject>.csv, optional dev/<subject>.csv.")] = None,
    shots: Annotated[str, typer.Option(help="Few-shot counts, comma-separated (e.g. 0,5); shots come from dev/.")] = "0",
    suite: Annotated[Path | None, typer.Option(help="Value-alignment suite (YAML, or JSONL of prompts such as CValues).")] = None,
    compare: Annotated[str | None, typer.Option(help="More checkpoints on the same suites, comma-separated: base, run folders, "
                                                     "RUN_DIR/<stage>, stage names of the run, model folders.")] = None,
    reward_model: Annotated[Path | None, typer.Option(help="Reward stage folder scoring the suite's replies (default: the run's latest).")] = None,
    recipe: Annotated[Path | None, typer.Option(help="Recipe whose model is `base` when no run folder is given.")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N questions of each subject.")] = None,
    suite_limit: Annotated[int | None, typer.Option(help="Only the first N probes of the suite.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Reply length bound for the suite (default: the suite's).")] = None,
    method: Annotated[str, typer.Option(help="loglik (answer-letter likelihood) or generate (first letter of a greedy reply).")] = "loglik",
    batch_size: Annotated[int, typer.Option(help="Prompts per forward pass.")] = 8,
    max_length: Annotated[int, typer.Option(help="Longest prompt in tokens (longer ones lose their earliest tokens).")] = 2048,
    output: Annotated[Path | None, typer.Option(help="JSON results file (default: wenmai-eval-<UTC time>.json).")] = None,
) -> None:
    """Evaluate checkpoints on multiple-choice folders and an alignment suite, side by side in one table."""
    from finetune.evaluation import compare as comparison
    from finetune.evaluation.runner import EvalSpec
    from finetune.run_dir import utc_now

    if mc is None and suite is None:
        raise WenmaiError("give --mc DIR (multiple choice) and/or --suite FILE (alignment suite)")
    if method not in ("loglik", "generate"):
        raise WenmaiError(f"--method must be loglik or generate, not {method!r}")
    try:
        shot_counts = [int(s) for s in shots.split(",") if s.strip()]
    except ValueError:
        raise WenmaiError(f"--shots takes numbers separated by commas (e.g. 0,5), not {shots!r}") from None
    entries = ([target] if target else []) + [e.strip() for e in (compare or "").split(",") if e.strip()]
    spec = EvalSpec(mc=mc, shots=shot_counts or [0], mc_limit=limit, mc_method=method, suite=suite, suite_limit=suite_limit,
                    max_new_tokens=max_new_tokens, reward_model=str(reward_model) if reward_model else None, batch_size=batch_size, max_length=max_length)
    evaluation = comparison.compare(entries, spec, recipe, log=lambda m: console.print(f"[cyan]wenmai[/] {m}", highlight=False))
    out.print(comparison.comparison_table(evaluation))
    path = comparison.write_json(evaluation, output or Path(f"wenmai-eval-{utc_now().replace(':', '')}.json"))
    out.print(f"[green]results:[/] {path}")


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="Run folder.")]) -> None:
    """(Re)write a run's self-contained HTML report (curves, evaluations, gates, data cards, lineage)."""
    from finetune.report import write_report

    out.print(f"[green]report:[/] {write_report(run_dir)}")


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
        for name, info in _option_fields(module.Config):
            default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
            table.add_row(name, _type_name(info.annotation), default, info.description or "")
        out.print(table)


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with a finished training stage.")],
    adapter: Annotated[str | None, typer.Option(help="Stage whose adapter to merge (default: the latest that made one).")] = None,
    name: Annotated[str, typer.Option(help="Name of the merge stage in the run folder.")] = "merge",
    force: Annotated[bool, typer.Option(help="Merge again even if the stage is done.")] = False,
) -> None:
    """Merge a run's adapter into its base model (unquantised, training dtype) behind the parity gate."""
    from finetune.post_run import extend_run

    options = {"name": name} if name != "merge" else {}
    options.update({"adapter": adapter} if adapter else {})
    folder = extend_run(run_dir, [("merge", options)], force=force, log=_log)
    out.print(summary_table(folder))
    out.print(f"[green]merged model:[/] {folder.output(name, 'model')}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with a finished training (or merge) stage.")],
    format_: Annotated[str, typer.Option("--format", help="Comma-separated: hf, gguf.")] = "hf",
    gguf_types: Annotated[str | None, typer.Option(help="Comma-separated GGUF types: f32, f16, bf16, q8_0 (default f16,q8_0).")] = None,
    name: Annotated[str, typer.Option(help="Name of the export stage in the run folder.")] = "export",
    force: Annotated[bool, typer.Option(help="Export again even if the stage is done.")] = False,
) -> None:
    """Export a run (merging its adapter first if needed): HF safetensors (+ GGUF), chat template, model card, label."""
    from finetune.post_run import export_stages, extend_run

    folder = extend_run(run_dir, export_stages(run_dir, format_, gguf_types, name), force=force, log=_log)
    out.print(summary_table(folder))
    out.print(f"[green]exported:[/] {folder.output(name, 'model')}")


@app.command()
def chat(
    export_dir: Annotated[Path, typer.Argument(help="Export folder (runs/<run>/export/model), its stage folder, or the run folder.")],
    prompt: Annotated[str | None, typer.Option(help="Ask one question and exit (default: an interactive session).")] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 answers greedily; above 0 samples.")] = 0.0,
    label: Annotated[bool, typer.Option(help="Print each answer as JSON with the AI-generated-content implicit label.")] = False,
    gguf: Annotated[str | None, typer.Option(help="Talk to one of the export's GGUF files (through transformers).")] = None,
) -> None:
    """Talk to an exported model with its own chat template; answers stop at the end-of-turn token."""
    import json

    from finetune.generate import ExportedModel
    from finetune.model_card import EXPLICIT_LABEL

    model = ExportedModel(export_dir, gguf)
    messages = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = model.reply(messages, max_new_tokens, temperature, label)
        messages.append({"role": "assistant", "content": reply.text})
        print(json.dumps(reply.to_json(), ensure_ascii=False) if label else reply.text, flush=True)

    if prompt is not None:
        answer(prompt)
        return
    console.print(f"[dim]{model.folder} — {EXPLICIT_LABEL}; empty line or Ctrl-D ends[/]")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        answer(text)


def _log(message: str) -> None:
    console.print(f"[cyan]wenmai[/] {message}", highlight=False)


def _option_fields(model, prefix: str = ""):
    """(dotted name, field) for every option; a nested section (evaluate's `gates`) lists its own options."""
    from pydantic import BaseModel

    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from _option_fields(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


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


data_app = typer.Typer(help="The cultural data layer: rights, sensitivity, PII, duplicates, data cards.", no_args_is_help=True)
app.add_typer(data_app, name="data")
FormatOption = Annotated[str | None, typer.Option("--format", help="Record format of a data file (default: from its first record).")]
PolicyOption = Annotated[Path | None, typer.Option("--recipe", help="Take data.policy from this recipe (default: the built-in policy).")]


@data_app.command("check")
def data_check(target: Annotated[Path, typer.Argument(help="A recipe (its datasets) or a data file.")],
               format_: FormatOption = None, recipe: PolicyOption = None) -> None:
    """Run the data layer without writing anything: what would train, and what is kept out and why."""
    from finetune.data.commands import check

    out.print(data_table(check(target, format_, recipe)))


@data_app.command("scrub")
def data_scrub(source: Annotated[Path, typer.Argument(help="Data file to clean.")],
               dest: Annotated[Path, typer.Argument(help="Where to write the records that may train (JSONL).")],
               format_: FormatOption = None, recipe: PolicyOption = None,
               dedup: Annotated[bool, typer.Option(help="Drop duplicates too (as the recipe's policy says).")] = True) -> None:
    """Write the records that pass the policy, with personal data masked (and duplicates dropped), to DEST."""
    from finetune.data.commands import scrub

    report = scrub(source, dest, format_, recipe, dedup)
    out.print(data_table([report]))
    out.print(f"[green]wrote {report.kept} records to {dest}[/]")


@data_app.command("card")
def data_card(target: Annotated[Path, typer.Argument(help="A recipe (its datasets) or a data file.")],
              out_dir: Annotated[Path, typer.Option("--out", help="Folder for data_card.md, data_card.json and the register.")] = Path("."),
              format_: FormatOption = None, recipe: PolicyOption = None) -> None:
    """Write a data card (markdown + JSON) and the sensitive-topic register for a recipe's datasets or a file."""
    from finetune.data.commands import card

    for path in card(target, out_dir, format_, recipe):
        out.print(f"[green]wrote[/] {path}")


def data_table(reports: list) -> Table:
    """One row per dataset: read, bad, kept out by policy (by reason), PII found, duplicates, kept."""
    table = Table(title="Data layer (policy → PII → dedup)", title_justify="left")
    for column in ("dataset", "read", "bad", "excluded by policy", "personal data", "duplicates", "register", "kept"):
        table.add_column(column)
    for r in reports:
        excluded = "\n".join(f"{n} {reason}" for reason, n in r.excluded.items()) or "0"
        pii = ", ".join(f"{n} {kind}" for kind, n in r.pii_found.items())
        pii = f"{pii} ({r.pii_action})" if pii else "0"
        duplicates = ", ".join(f"{n} {kind}" for kind, n in r.duplicates.items()) or "0"
        table.add_row(r.name, str(r.records_read), str(r.bad_records), excluded, pii, duplicates, str(r.registered), str(r.kept))
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
