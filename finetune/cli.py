"""The `wenmai` command: parses arguments and calls the modules that do the work."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import click
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from finetune import pipeline, watermark
from finetune.checks import preflight as compatibility
from finetune.cli_tables import (
    aligned_origins,
    data_table,
    memory_table,
    options_table,
    plan_table,
    rounds_table,
    score_table,
    summary_table,
)
from finetune.config_io import load_run_recipe
from finetune.data import commands as data_commands
from finetune.distributed import launch as launching
from finetune.distributed.ranks import is_main_process, quiet_other_ranks
from finetune.errors import ConfigError, Problem, WenmaiError
from finetune.evaluation import compare as comparison
from finetune.evaluation.runner import EvalSpec
from finetune.federated import deploy as federated_deploy
from finetune.federated import simulate as federated_simulate
from finetune.generate import ExportedModel
from finetune.model_card import EXPLICIT_LABEL
from finetune.post_run import export_stages, extend_run
from finetune.recipe import OPTIONS, EvaluateOptions
from finetune.recipe.review import DEFAULT_DB, ReviewCleaning
from finetune.report import write_report
from finetune.round_history import round_history
from finetune.run_dir import RunDir, atomic_write_text
from reward.score import score_file

try:  # newer typer (0.29) carries its own copy of click, typer._click, and raises that copy's exceptions
    from typer._click.exceptions import ClickException as TyperClickException
except ImportError:  # older typer (0.20, which the federated extra needs) raises click's own
    TyperClickException = click.ClickException

app = typer.Typer(
    name="wenmai",
    help="Wenmai (文脉): fine-tune language models into cultural vertical models from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},  # every command inherits both
)
# Markup off: messages, paths and table cells are printed as they are (`pip install 'wenmai[gpu]'` is not a Rich
# tag); our own colours are Text styles (`_labelled`).
console = Console(stderr=True, markup=False)
out = Console(markup=False)

SetOption = Annotated[
    list[str], typer.Option("--set", help="Override a recipe key: a.b.c=value (e.g. stages.sft.max_steps=5).")
]


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors (anywhere on the line).")] = False,
) -> None:
    """Wenmai (文脉): fine-tune language models into cultural vertical models from one YAML recipe."""


@app.command()
def validate(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    set_: SetOption = None,
    gpus: Annotated[int, typer.Option(help="Check for this many processes (GPUs) per node.")] = 1,
    nodes: Annotated[int, typer.Option(help="Check for this many nodes.")] = 1,
    full: Annotated[
        bool, typer.Option("--full", help="Also print the resolved recipe: YAML to copy, each value's origin after #.")
    ] = False,
) -> None:
    """Check a recipe and its data without loading weights; print the plan and the problems (--full: the recipe)."""
    loaded = pipeline.load_recipe(recipe, set_ or [])
    checked = pipeline.validate(loaded.recipe, gpus, nodes)
    out.print(plan_table(loaded.recipe, checked.counts))
    out.print(data_table([c["report"] for c in checked.counts.values() if c.get("report")]))
    for problem in checked.warnings:
        console.print(_labelled("warning:", "yellow", problem))
    show_report(checked.report, planning=True)
    for line in checked.speed_lines:
        out.print(_labelled("speed on this machine", "bold", line))
    if full:
        out.print(Text("Resolved recipe", style="bold"), "(each value's origin after #)")
        out.print(aligned_origins(loaded.to_yaml(annotate=True)), highlight=False, soft_wrap=True)
    else:
        out.print(
            f"(the resolved recipe, each value with its origin: wenmai validate {recipe} --full)",
            style="dim",
            soft_wrap=True,
        )
    out.print("recipe is valid", style="green")


@app.command()
def launch(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (optional with --resume).")] = None,
    gpus: Annotated[int, typer.Option(help="Processes per node, one per GPU.")] = 1,
    nodes: Annotated[int, typer.Option(help="Nodes in the job; run this command once on each.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This node's rank, 0 .. nodes-1 (SLURM: $SLURM_NODEID).")] = 0,
    master_addr: Annotated[str | None, typer.Option(help="Address of node 0 (several nodes).")] = None,
    master_port: Annotated[int, typer.Option(help="Port on node 0 for the processes to meet (several nodes).")] = 29500,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder shared by every process (default: <output.root>/<name>-<UTC time>).")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder on several processes.")] = None,
    set_: SetOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the command and the findings; start nothing.")
    ] = False,
    cpu: Annotated[
        bool, typer.Option("--cpu", help="Start the processes on CPU (gloo backend): tests and debugging.")
    ] = False,
) -> None:
    """Run a recipe on several GPUs or nodes: checks it, then starts one process per GPU with torchrun."""
    if resume is not None:
        loaded = load_run_recipe(RunDir.open(resume))
    elif recipe is None:
        raise WenmaiError("give a recipe file (wenmai launch recipes/x.yaml --gpus 8) or --resume RUN_DIR")
    else:
        loaded = pipeline.load_recipe(recipe, set_ or [])
    launch_plan = launching.plan(
        recipe, loaded.recipe, gpus, nodes, node_rank, master_addr, master_port, run_dir, resume, tuple(set_ or ()), cpu
    )
    pipeline.check_data(loaded.recipe)
    report = compatibility.check(
        loaded.recipe, world_size=gpus * nodes, gpus_per_node=gpus, launch_on_gpus=not cpu, with_estimates=True
    )
    show_report(report, planning=dry_run)
    out.print(launch_plan.shell(), highlight=False, markup=False, soft_wrap=True)
    if dry_run:
        return
    launching.execute(launch_plan)


def show_report(report, planning: bool) -> None:
    """Print the pre-flight findings and the memory estimate; raise on findings that stop the run."""

    blocking = report.blocking(planning)
    for finding in report.findings:
        if finding not in blocking:
            console.print(_labelled("warning:", "yellow", finding))
    if report.estimates:
        out.print(memory_table(report))
    if blocking:
        raise ConfigError([Problem(f.path, f.message) for f in blocking], "pre-flight found problems")


@app.command()
def run(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file (optional with --resume).")] = None,
    set_: SetOption = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue this run folder: skip finished stages, resume the interrupted one.")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Folder for this run (default: <output.root>/<name>-<UTC time>).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Go on past failing evaluate gates (recorded in lineage.json).")
    ] = False,
) -> None:
    """Run every stage of a recipe into a new run folder (or resume one)."""

    quiet_other_ranks()  # under `wenmai launch`, only rank 0 talks
    for bars in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # one progress line a stage
        os.environ.setdefault(bars, "1")  # read when transformers and datasets are imported, later than here
    if resume is not None and run_dir is not None:
        raise WenmaiError("--run-dir and --resume cannot be combined: --resume names the folder to continue")
    if resume is None and recipe is None:
        raise WenmaiError("give a recipe file (wenmai run recipes/quickstart.yaml) or --resume RUN_DIR")
    try:
        if resume is not None:
            folder = pipeline.resume(resume, recipe, tuple(set_ or ()), log=_log, force=force)
        else:
            folder = pipeline.start(pipeline.load_recipe(recipe, set_ or []), run_dir, log=_log, force=force)
    except KeyboardInterrupt as err:  # the stage is marked failed; say how to go on, and exit 130 so `&&` stops
        if is_main_process():
            console.print(
                _resume_hint(getattr(err, "run_dir", None) or resume or run_dir), style="yellow", soft_wrap=True
            )
        raise typer.Exit(130) from None
    if is_main_process():
        out.print(summary_table(folder))
        out.print(_labelled("run finished:", "green", folder.root))


def _resume_hint(folder: Path | None) -> str:
    """The line an interrupted run ends with: the command that resumes it, naming its folder once it exists."""
    if folder is not None and RunDir(folder).recipe_path.is_file():
        return f"interrupted; resume with `wenmai run --resume {folder}`"
    return "interrupted; resume with `wenmai run --resume <RUN>` (RUN: the run folder printed above, if any)"


def _about(option: str, prefix: str = "") -> str:
    """`wenmai eval` help for an option of the `evaluate` stage: the schema's own description."""
    return prefix + (EvaluateOptions.model_fields[option].description or "")


@app.command("eval")
def eval_(
    target: Annotated[
        str | None, typer.Argument(help="base, a run folder, RUN_DIR/<stage>, or a model folder.")
    ] = None,
    mc: Annotated[Path | None, typer.Option(help=_about("mc"))] = None,
    shots: Annotated[
        str, typer.Option(help="Few-shot counts, comma-separated (e.g. 0,5); shots come from dev/.")
    ] = "0",
    suite: Annotated[Path | None, typer.Option(help=_about("suite"))] = None,
    compare: Annotated[
        str | None,
        typer.Option(
            help="More checkpoints on the same suites, comma-separated: base, run folders, "
            "RUN_DIR/<stage>, stage names of the run, model folders."
        ),
    ] = None,
    reward_model: Annotated[
        Path | None, typer.Option(help="Reward stage folder scoring the suite's replies (default: the run's latest).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe whose model is `base` when no run folder is given.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help=_about("mc_limit"))] = None,
    suite_limit: Annotated[int | None, typer.Option(help=_about("suite_limit"))] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help=_about("max_new_tokens"))] = None,
    method: Annotated[str, typer.Option(help=_about("mc_method"))] = EvalSpec.mc_method,
    batch_size: Annotated[int, typer.Option(help=_about("batch_size"))] = EvalSpec.batch_size,
    max_length: Annotated[int, typer.Option(help=_about("max_length"))] = EvalSpec.max_length,
    output: Annotated[
        Path | None,
        typer.Option(
            help="JSON results file (default: eval-<UTC time>.json in the run folder "
            "evaluated, else in the current folder)."
        ),
    ] = None,
) -> None:
    """Evaluate checkpoints on multiple-choice folders and an alignment suite, side by side in one table."""
    if mc is None and suite is None:
        raise WenmaiError("give --mc DIR (multiple choice) and/or --suite FILE (alignment suite)")
    if method not in ("loglik", "generate"):
        raise WenmaiError(f"--method must be loglik or generate, not {method!r}")
    try:
        shot_counts = [int(s) for s in shots.split(",") if s.strip()]
    except ValueError:
        raise WenmaiError(f"--shots takes numbers separated by commas (e.g. 0,5), not {shots!r}") from None
    entries = ([target] if target else []) + [e.strip() for e in (compare or "").split(",") if e.strip()]
    spec = EvalSpec(
        mc=mc,
        shots=shot_counts or [0],
        mc_limit=limit,
        mc_method=method,
        suite=suite,
        suite_limit=suite_limit,
        max_new_tokens=max_new_tokens,
        reward_model=str(reward_model) if reward_model else None,
        batch_size=batch_size,
        max_length=max_length,
    )
    evaluation = comparison.compare(entries, spec, recipe, log=_log)
    out.print(comparison.comparison_table(evaluation))
    path = comparison.write_json(evaluation, output or comparison.default_output(entries))
    out.print(_labelled("results:", "green", path))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder.")],
    language: Annotated[
        str | None, typer.Option(help="zh (中文) or en; default: the recipe's output.language (zh).")
    ] = None,
) -> None:
    """(Re)write a run's self-contained HTML report (curves, evaluations, gates, data cards, lineage)."""

    path = write_report(run_dir, language) if language else write_report(run_dir)
    out.print(_labelled("report:", "green", path))


@app.command()
def stages(
    kind: Annotated[str | None, typer.Argument(help="One stage kind (sft, dpo, ...); all kinds when left out.")] = None,
) -> None:
    """List the stage kinds and their options, or the options of one kind."""

    for name in [kind] if kind else list(OPTIONS):
        out.print(options_table(name))


@app.command()
def merge(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with a finished training stage.")],
    adapter: Annotated[
        str | None, typer.Option(help="Stage whose adapter to merge (default: the latest that made one).")
    ] = None,
    name: Annotated[str, typer.Option(help="Name of the merge stage in the run folder.")] = "merge",
    force: Annotated[bool, typer.Option("--force", help="Merge again even if the stage is done.")] = False,
) -> None:
    """Merge a run's adapter into its base model (unquantised, training dtype) behind the parity gate."""

    options = {"name": name} if name != "merge" else {}
    options.update({"adapter": adapter} if adapter else {})
    folder = extend_run(run_dir, [("merge", options)], force=force, log=_log)
    out.print(summary_table(folder))
    out.print(_labelled("merged model:", "green", folder.output(name, "model")))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with a finished training (or merge) stage.")],
    format_: Annotated[str, typer.Option("--format", help="Comma-separated: hf, gguf.")] = "hf",
    gguf_types: Annotated[
        str | None, typer.Option(help="Comma-separated GGUF types: f32, f16, bf16, q8_0 (default f16,q8_0).")
    ] = None,
    name: Annotated[str, typer.Option(help="Name of the export stage in the run folder.")] = "export",
    force: Annotated[bool, typer.Option("--force", help="Export again even if the stage is done.")] = False,
) -> None:
    """Export a run (merging its adapter first if needed): HF safetensors (+ GGUF), chat template, model card, label."""

    folder = extend_run(run_dir, export_stages(run_dir, format_, gguf_types, name), force=force, log=_log)
    out.print(summary_table(folder))
    out.print(_labelled("exported:", "green", folder.output(name, "model")))


@app.command()
def chat(
    export_dir: Annotated[
        Path, typer.Argument(help="Export folder (runs/<run>/export/model), its stage folder, or the run folder.")
    ],
    prompt: Annotated[
        str | None, typer.Option(help="Ask one question and exit (default: an interactive session).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 answers greedily; above 0 samples.")] = 0.0,
    label: Annotated[
        bool, typer.Option("--label", help="Print each answer as JSON with the AI-generated-content implicit label.")
    ] = False,
    gguf: Annotated[
        str | None, typer.Option(help="Talk to one of the export's GGUF files (through transformers).")
    ] = None,
) -> None:
    """Talk to an exported model with its own chat template; answers stop at the end-of-turn token."""
    import json

    model = ExportedModel(export_dir, gguf)
    messages = [{"role": "system", "content": system}] if system else []

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = model.reply(messages, max_new_tokens, temperature, label)
        messages.append({"role": "assistant", "content": reply.text})
        print(json.dumps(reply.to_json(), ensure_ascii=False) if label else reply.text, flush=True)
        if reply.hit_max_new_tokens:
            console.print(
                _labelled("note:", "yellow", f"the answer hit --max-new-tokens {max_new_tokens} and is cut there")
            )

    if prompt is not None:
        answer(prompt)
        return
    console.print(f"{model.folder} — {EXPLICIT_LABEL}; empty line or Ctrl-D ends", style="dim")
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        answer(text)


def _log(message: str) -> None:
    """Progress from the modules the commands call, on stderr."""
    console.print(_labelled("wenmai", "cyan", message))


def _labelled(label: str, style: str, text: object) -> Text:
    """Our coloured label, then `text` exactly as it is (no Rich markup, no pretty-printing of objects)."""
    return Text.assemble((label, style), " ", str(text))


reward_app = typer.Typer(help="Reward models: score answers with a trained reward model.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")


@reward_app.command("score")
def reward_score(
    run_dir: Annotated[Path, typer.Argument(help="Run folder (or its reward stage folder, or a reward_model folder).")],
    input_: Annotated[
        Path,
        typer.Option(
            "--input", help="JSONL/JSON/Parquet/CSV: `prompt` + `response`, or `messages` ending with the answer."
        ),
    ],
    stage: Annotated[str | None, typer.Option(help="Reward stage to use when the run has several.")] = None,
    output: Annotated[Path | None, typer.Option(help="Write each input record with its `scores` here (JSONL).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Answers per forward pass.")] = 8,
) -> None:
    """Score answers per reward dimension and the weighted total with a run's reward model."""
    import json

    scored, names = score_file(run_dir, input_, stage, batch_size)
    if output is not None:
        atomic_write_text(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored))
    out.print(score_table(scored, names, rows=0 if output else 50))
    if output is not None:
        out.print(_labelled("scores written:", "green", output))


data_app = typer.Typer(
    help="The cultural data layer: rights, sensitivity, PII, duplicates, data cards.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
FormatOption = Annotated[
    str | None, typer.Option("--format", help="Record format of a data file (default: from its first record).")
]
PolicyOption = Annotated[
    Path | None, typer.Option("--recipe", help="Take data.policy from this recipe (default: the built-in policy).")
]


@data_app.command("check")
def data_check(
    target: Annotated[Path, typer.Argument(help="A recipe (its datasets) or a data file.")],
    format_: FormatOption = None,
    recipe: PolicyOption = None,
) -> None:
    """Run the data layer without writing anything: what would train, and what is kept out and why."""

    out.print(data_table(data_commands.check(target, format_, recipe)))


@data_app.command("scrub")
def data_scrub(
    source: Annotated[Path, typer.Argument(help="Data file to clean.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the records that may train (JSONL).")],
    format_: FormatOption = None,
    recipe: PolicyOption = None,
    dedup: Annotated[bool, typer.Option(help="Drop duplicates too (as the recipe's policy says).")] = True,
) -> None:
    """Write the records that pass the policy, with personal data masked (and duplicates dropped), to DEST."""

    report = data_commands.scrub(source, dest, format_, recipe, dedup)
    out.print(data_table([report]))
    out.print(f"wrote {report.kept} records to {dest}", style="green")


@data_app.command("card")
def data_card(
    target: Annotated[Path, typer.Argument(help="A recipe (its datasets) or a data file.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for data_card.md, data_card.json and the register.")
    ] = Path("."),
    format_: FormatOption = None,
    recipe: PolicyOption = None,
) -> None:
    """Write a data card (markdown + JSON) and the sensitive-topic register for a recipe's datasets or a file."""

    for path in data_commands.card(target, out_dir, format_, recipe):
        out.print(_labelled("wrote", "green", path))


@app.command("serve")
def serve_(
    source: Annotated[str, typer.Argument(help="An export folder (runs/<run>/export) or a run folder.")],
    adapter: Annotated[
        str | None,
        typer.Option(help="With a run folder: the stage whose adapter or model to serve (default: the last)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on; beyond loopback an API key is required.")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(help="Port.")] = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the API key (the key never goes on the command line)."),
    ] = None,
    model_id: Annotated[
        str | None, typer.Option(help="The model name clients ask for (default: the run's id).")
    ] = None,
    max_concurrency: Annotated[int, typer.Option(min=1, help="Requests generating at once; the others queue.")] = 8,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting at most; more are answered 429.")] = 64,
    max_tokens: Annotated[int, typer.Option(min=1, help="Answer length when a request sets none.")] = 512,
    label_position: Annotated[
        str, typer.Option(help="Where the visible AI-generated-content label goes: prefix, suffix or none.")
    ] = "suffix",
    label_language: Annotated[str, typer.Option(help="The label's language: auto, zh, en or both.")] = "auto",
    label_text: Annotated[str | None, typer.Option(help="Your own label text instead of the default.")] = None,
    banned_terms: Annotated[
        Path | None,
        typer.Option(help="A file of terms (one a line) no answer may contain (default: the run's rlhf rule)."),
    ] = None,
    filter_mode: Annotated[str, typer.Option("--filter", help="refuse (the whole answer) or redact (***).")] = "refuse",
    watermark_key_env: Annotated[
        str | None, typer.Option(help="Watermark every answer with the key in this environment variable.")
    ] = None,
    backend: Annotated[
        str, typer.Option(help="continuous-batching (transformers' batcher) or plain (generate, one at a time).")
    ] = "continuous-batching",
    feedback_db: Annotated[
        str | None, typer.Option(help="Review store for POST /v1/feedback (visitor feedback reaches curators there).")
    ] = None,
    log_days: Annotated[
        int, typer.Option(min=0, help="Keep PII-scrubbed conversations this many days for feedback (0: not logged).")
    ] = 0,
) -> None:
    """Serve an exported model with an OpenAI-compatible API, AIGC labels, an output filter and optional watermark."""
    choices = {
        "--label-position": (label_position, ("prefix", "suffix", "none")),
        "--label-language": (label_language, ("auto", "zh", "en", "both")),
        "--filter": (filter_mode, ("refuse", "redact")),
        "--backend": (backend, ("continuous-batching", "plain")),
    }
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise WenmaiError(f"{flag}: {value!r} is not one of {', '.join(allowed)}")
    try:
        from finetune.serving import serve
    except ModuleNotFoundError as err:
        raise WenmaiError(
            f"wenmai serve needs the `serve` extra ({err.name} is not installed): pip install 'wenmai[serve]'"
        ) from None
    watermarking = None
    if watermark_key_env:
        watermarking = watermark.watermarking_config(watermark.key_from_env(watermark_key_env))
    serve(
        source,
        host,
        port,
        adapter_stage=adapter,
        model_id=model_id,
        api_key_env=api_key_env,
        max_concurrency=max_concurrency,
        max_queue=max_queue,
        default_max_tokens=max_tokens,
        label_position=label_position,
        label_language=label_language,
        label_text=label_text,
        banned_terms=banned_terms,
        filter_mode=filter_mode,
        watermarking_config=watermarking,
        backend=backend,
        feedback_db=feedback_db,
        log_days=log_days,
    )


@app.command()
def detect(
    file: Annotated[
        str, typer.Argument(help="Text to check: a file (JSONL with text/content per line, or plain text) or -.")
    ],
    model: Annotated[Path, typer.Option(help="The export (or run folder) whose tokenizer the answers came from.")],
    key_env: Annotated[
        str, typer.Option(help="Environment variable holding the watermark key the server used.")
    ] = watermark.DEFAULT_KEY_ENV,
    threshold: Annotated[
        float, typer.Option(help="z-score at or above which a text counts as watermarked.")
    ] = watermark.THRESHOLD,
) -> None:
    """Check text for Wenmai's watermark: a z-score and p-value per text, and the verdict."""
    import json

    results = watermark.detect_file(file, model, watermark.key_from_env(key_env), threshold)
    for result in results:
        out.print(json.dumps(result.to_json(), ensure_ascii=False), highlight=False, markup=False, soft_wrap=True)
    console.print(json.dumps(watermark.summary(results), ensure_ascii=False), highlight=False, markup=False)


@app.command()
def iterate(
    run_dir: Annotated[Path, typer.Argument(help="The finished parent run (or round).")],
    feedback: Annotated[str, typer.Option(help="The review store with the feedback (a SQLite file or a URL).")],
    session: Annotated[str, typer.Option(help="The review session whose cleaned feedback trains the round.")],
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe for the round (default: the parent's); its model must be the parent's.")
    ] = None,
    new_run_dir: Annotated[
        Path | None, typer.Option("--run-dir", help="Folder for the round (default: <root>/<name>-round<N>-<time>).")
    ] = None,
    reward_tolerance: Annotated[
        float, typer.Option(min=0, help="How much each reward dimension's mean may fall below the parent's.")
    ] = 0.0,
    mc_tolerance: Annotated[
        float | None,
        typer.Option(min=0, help="Accuracy points each multiple-choice subject may lose (default: the recipe's gate)."),
    ] = None,
    licence: Annotated[
        str | None, typer.Option(help="Licence of feedback whose session names none (the data policy may need one).")
    ] = None,
    rights_holder: Annotated[
        str | None, typer.Option(help="Rights holder of feedback whose session names none.")
    ] = None,
) -> None:
    """The next LoRA round from cleaned feedback: trains, evaluates against the parent, exports only if no worse."""
    rights = {"licence": licence, "rights_holder": rights_holder} if licence or rights_holder else None
    done = _rounds().iterate(
        run_dir, feedback, session, recipe, new_run_dir, reward_tolerance, mc_tolerance, rights=rights, log=_log
    )
    out.print(_labelled("round finished:", "green", done.root))


@app.command("rounds")
def rounds_(run_dir: Annotated[Path, typer.Argument(help="A run folder (a round or the first run).")]) -> None:
    """The history of a run's rounds: data added, scores per dimension, gate, export."""
    out.print(rounds_table(round_history(run_dir)))


review_app = typer.Typer(
    help="The review store: sessions of model answers for curators to score, reviewer accounts, cleaned exports.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")
DbOption = Annotated[
    str, typer.Option("--db", help="Review store: a SQLite file, or a URL (postgresql+psycopg://user@host/db).")
]


@review_app.command("create")
def review_create(
    source: Annotated[
        str, typer.Argument(help="What answers: a run folder, RUN_DIR/<stage>, an export or model folder.")
    ],
    prompts: Annotated[
        Path, typer.Option(help="Prompts: an alignment suite (.yaml/.jsonl), CValues-style JSONL, or a .txt list.")
    ],
    name: Annotated[str, typer.Option(help="The new session's name.")],
    db: DbOption = DEFAULT_DB,
    against: Annotated[
        str | None, typer.Option(help="A second model for A/B items (e.g. last round's export).")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Recipe whose reward dimensions reviewers score (default: SOURCE's run).")
    ] = None,
    institution: Annotated[str, typer.Option(help="The institution whose session this is.")] = "",
    licence: Annotated[str | None, typer.Option(help="Licence of what is reviewed (SPDX id or statement).")] = None,
    rights_holder: Annotated[str | None, typer.Option(help="Who holds the rights to what is reviewed.")] = None,
    reviewers_per_item: Annotated[int, typer.Option(min=1, help="K: reviewers each item is given to.")] = 3,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Answer length bound (greedy decoding).")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per generation batch.")] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="Use only the first N prompts.")] = None,
) -> None:
    """Answer a prompt file with one model (or two, for A/B) and store the answers as a new review session."""
    loaded = pipeline.load_recipe(recipe).recipe if recipe else None
    session, items = _reviewing().create(
        source, prompts, name, db, against, loaded, institution, licence, rights_holder,
        reviewers_per_item, max_new_tokens, batch_size, limit, log=_log,
    )  # fmt: skip
    kind = "A/B pairs" if against else "answers"
    out.print(_labelled(f"session {session.name!r}:", "green", f"{len(items)} {kind} to review in {db}"))


@review_app.command("export")
def review_export(
    session: Annotated[str, typer.Option(help="The session to export.")],
    to: Annotated[
        Path, typer.Option(help="Folder for ratings.jsonl, pairs.jsonl, chat.jsonl and the cleaning report.")
    ],
    db: DbOption = DEFAULT_DB,
    reward_run: Annotated[
        str | None, typer.Option(help="A run whose reward model checks the experts: strong disagreements are listed.")
    ] = None,
    recipe: Annotated[
        Path | None, typer.Option(help="Take the PII policy (data.policy.pii) from this recipe (default: built-in).")
    ] = None,
    calibrate: Annotated[bool, typer.Option(help="Correct each rater's offset and scale against consensus.")] = True,
    max_spread: Annotated[float, typer.Option(help="Hold back items whose raters differ by more points.")] = 2.0,
    drop_noisy_raters: Annotated[bool, typer.Option(help="Leave raters far from consensus out.")] = True,
    max_rater_deviation: Annotated[
        float, typer.Option(help="A rater this many points from the others' median on average is listed.")
    ] = 1.0,
    min_reviews: Annotated[int, typer.Option(min=1, help="Hold back items with fewer reviews.")] = 1,
    teacher_gap: Annotated[
        float, typer.Option(help="With --reward-run: list items where teacher and experts differ by more SDs.")
    ] = 1.5,
) -> None:
    """Write a session's cleaned feedback as the ratings, pairs and chat records the stages read."""
    try:
        options = ReviewCleaning(
            calibrate=calibrate,
            max_spread=max_spread,
            drop_noisy_raters=drop_noisy_raters,
            max_rater_deviation=max_rater_deviation,
            min_reviews=min_reviews,
            teacher_gap=teacher_gap,
        )
    except ValidationError as err:
        first = err.errors()[0]
        raise WenmaiError(f"--{str(first['loc'][0]).replace('_', '-')}: {first['msg']}") from None
    pii = pipeline.load_recipe(recipe).recipe.data.policy.pii if recipe else None
    done = _reviewing().export(db, session, to, options, reward_run, pii, log=_log)
    for kind, count in done.counts.items():
        out.print(f"{kind:8} {count:6} records" + (f"  {done.files[kind]}" if kind in done.files else ""))
    out.print(
        f"held back {done.held_back} items; noisy raters: {', '.join(done.noisy_raters) or 'none'}; "
        f"teacher disagreements to look at: {done.disagreements}"
    )
    out.print(_labelled("cleaning report:", "green", done.folder / "cleaning_report.md"))


@review_app.command("serve")
def review_serve(
    db: DbOption = DEFAULT_DB,
    host: Annotated[
        str, typer.Option(help="Address to listen on (loopback by default; sign-in is always required).")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(help="Port.")] = 8765,
    export_dir: Annotated[Path, typer.Option(help="Where the admin page's Export button writes.")] = Path(
        "review-exports"
    ),
    secure_cookies: Annotated[
        bool, typer.Option("--secure-cookies", help="Send the session cookie over HTTPS only (behind a TLS proxy).")
    ] = False,
) -> None:
    """The review app curators use: sign in, score answers per dimension, A/B, corrections; admins export.

    The session cookie's key comes from WENMAI_REVIEW_SECRET (kept out of the process list); without it a random
    key is made and every sign-in ends when the server restarts.
    """
    import os

    try:
        from finetune.review_app import serve
    except ModuleNotFoundError as err:
        raise WenmaiError(
            f"the review app needs the `review` extra ({err.name} is not installed): pip install 'wenmai[review]'"
        ) from None
    _reviewing().list_users(db)  # a missing or unreachable store is a one-line error before the server starts
    serve(db, host, port, os.environ.get("WENMAI_REVIEW_SECRET") or None, export_dir, secure_cookies)


def _reviewing():
    """The review commands' module, loaded when one runs: the store needs the `review` extra (SQLAlchemy)."""
    with _review_extra():
        from finetune import reviewing
    return reviewing


def _rounds():
    """`wenmai iterate`'s module (it reads the review store), loaded when it runs."""
    with _review_extra():
        from finetune import rounds
    return rounds


@contextmanager
def _review_extra() -> Iterator[None]:
    """A missing package of the `review` extra as a one-line error saying how to install it."""
    try:
        yield
    except ModuleNotFoundError as err:
        raise WenmaiError(
            f"this command needs the `review` extra ({err.name} is not installed): pip install 'wenmai[review]'"
        ) from None


user_app = typer.Typer(help="Reviewer accounts (pseudonyms; passwords stored as argon2 hashes).", no_args_is_help=True)
review_app.add_typer(user_app, name="user")


@user_app.command("add")
def review_user_add(
    pseudonym: Annotated[str, typer.Argument(help="The reviewer's pseudonym (no real names), e.g. curator-03.")],
    db: DbOption = DEFAULT_DB,
    admin: Annotated[
        bool, typer.Option("--admin", help="An administrator (sees progress and agreement, exports).")
    ] = False,
    password_env: Annotated[
        str | None, typer.Option(help="Read the password from this environment variable (default: ask).")
    ] = None,
) -> None:
    """Add a reviewer account."""
    import os

    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise WenmaiError(f"--password-env: the environment variable {password_env} is not set or empty")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    reviewer = _reviewing().add_user(db, pseudonym, password, "admin" if admin else "reviewer")
    out.print(_labelled(f"added {reviewer.role}", "green", reviewer.pseudonym))


@user_app.command("list")
def review_user_list(db: DbOption = DEFAULT_DB) -> None:
    """The reviewer accounts."""
    reviewers = _reviewing().list_users(db)
    table = Table("pseudonym", "role", "active", "since")
    for r in reviewers:
        table.add_row(r.pseudonym, r.role, "yes" if r.active else "no", r.created_at.strftime("%Y-%m-%d"))
    out.print(table)


@user_app.command("disable")
def review_user_disable(
    pseudonym: Annotated[str, typer.Argument(help="The reviewer to disable (their reviews stay).")],
    db: DbOption = DEFAULT_DB,
) -> None:
    """Disable a reviewer account; past reviews stay in the store."""
    _reviewing().set_active(db, pseudonym, False)
    out.print(_labelled("disabled", "green", pseudonym))


MACHINE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _machine_error(err: OSError) -> str:
    """A folder Wenmai may not write, or a full disk, in one line: which file, what happened, what to do."""
    where = err.filename or "a file"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"cannot write {where}: the disk is full ({err.strerror}); free space or point output.root at another "
            "disk, then resume the run (wenmai run --resume RUN): finished stages are kept"
        )
    return (
        f"cannot write {where}: {err.strerror}; choose a folder you may write (output.root, --run-dir, --to) or "
        "change its permissions"
    )


federate_app = typer.Typer(
    help="Federated LoRA on Flower: institutions train one adapter; only LoRA tensors, counts and metrics travel.",
    no_args_is_help=True,
)
app.add_typer(federate_app, name="federate")


@federate_app.command("simulate")
def federate_simulate(
    recipe: Annotated[Path | None, typer.Argument(help="Recipe YAML file with a `federated` section.")] = None,
    clients: Annotated[
        int | None, typer.Option(help="Simulate the first N clients of federated.clients (default: all).")
    ] = None,
    set_: SetOption = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Folder for this run (default: <output.root>/<name>-<UTC time>).")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder from its last saved round.")] = None,
    compare: Annotated[
        bool,
        typer.Option(
            "--compare",
            help="Then compare the global adapter with local-only and centralised training (held-out loss).",
        ),
    ] = False,
) -> None:
    """Run server and clients on this machine through Flower's simulation engine (one process per client)."""
    if (recipe is None) == (resume is None):
        raise WenmaiError(
            "give a recipe file (wenmai federate simulate recipes/federated-museums.yaml) or --resume RUN_DIR"
        )
    loaded = pipeline.load_recipe(recipe, set_ or []) if recipe is not None else None
    folder = federated_simulate.simulate(loaded, clients, run_dir, resume, log=_log, compare_after=compare)
    out.print(summary_table(folder))
    out.print(_labelled("federated run finished:", "green", folder.root))


@federate_app.command("server")
def federate_server(
    recipe: Annotated[
        Path | None, typer.Argument(help="The server's recipe (clients by name; no data needed).")
    ] = None,
    set_: SetOption = None,
    host: Annotated[
        str, typer.Option(help="Address the SuperLink listens on (not loopback: TLS required).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="The SuperLink's port (clients, and `flwr run`, connect here).")] = 9092,
    root_certificates: Annotated[Path | None, typer.Option(help="CA certificate (PEM) for TLS.")] = None,
    certificate: Annotated[Path | None, typer.Option(help="The server's certificate (PEM), signed by the CA.")] = None,
    key: Annotated[Path | None, typer.Option(help="The server certificate's private key (PEM).")] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Folder for this run (default: <output.root>/<name>-<UTC time>).")
    ] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue this run folder from its last saved round.")] = None,
) -> None:
    """Start a Flower SuperLink and run Wenmai's federated rounds on it, keeping a normal run folder."""
    if (recipe is None) == (resume is None):
        raise WenmaiError("give a recipe file (wenmai federate server RECIPE) or --resume RUN_DIR")
    loaded = pipeline.load_recipe(recipe, set_ or []) if recipe is not None else None
    tls = federated_deploy.Tls(root_certificates, certificate, key)
    folder = federated_deploy.serve(loaded, host, port, tls, run_dir, resume, log=_log)
    out.print(summary_table(folder))
    out.print(_labelled("federated run finished:", "green", folder.root))


@federate_app.command("client")
def federate_client(
    recipe: Annotated[Path, typer.Argument(help="This institution's recipe (its own datasets).")],
    name: Annotated[str, typer.Option(help="This client's name in federated.clients.")],
    superlink: Annotated[str, typer.Option(help="The server's SuperLink, HOST:PORT.")],
    root_certificates: Annotated[
        Path | None, typer.Option(help="CA certificate (PEM) that signed the server's; needed unless on loopback.")
    ] = None,
    folder: Annotated[Path | None, typer.Option(help="This client's local folder (data card, register).")] = None,
    port: Annotated[
        int, typer.Option(help="Local port of the SuperNode's own API (one per client on a machine).")
    ] = 9094,
    give_up_after: Annotated[
        float, typer.Option(help="Stop after this many seconds without reaching the server (it finished or is gone).")
    ] = 600,
) -> None:
    """Join a federated run as one institution: a Flower SuperNode running Wenmai's ClientApp on local data."""
    tls = federated_deploy.Tls(root_certificates)
    federated_deploy.join(recipe, name, superlink, tls, folder, port, log=_log, give_up_after_s=give_up_after)


def main() -> None:
    """Entry point: user errors print one red block and exit 2; tracebacks only with --debug.

    Typer runs without standalone mode so that errors are printed here; in that mode it returns the exit code of
    `typer.Exit` and of Ctrl-C (130) instead of exiting, so `main` exits with it.
    """
    debug = "--debug" in sys.argv  # a flag anywhere on the line (`wenmai run r.yaml --debug`), read here
    if not debug:  # library deprecation notices are not actionable for a recipe author
        warnings.filterwarnings("ignore", category=FutureWarning)
    args = [arg for arg in sys.argv[1:] if arg != "--debug"]
    try:
        code = app(args=args, standalone_mode=False, prog_name="wenmai")
    except WenmaiError as err:
        if debug:
            console.print_exception()
        console.print(Text("error: ", style="bold red") + Text(str(err)), soft_wrap=True, highlight=False)
        sys.exit(2)
    except (click.exceptions.Abort, typer.Abort):
        console.print("aborted", style="red")
        sys.exit(130)
    except (click.ClickException, TyperClickException) as err:  # a usage error: its usage line and the error
        err.show()
        sys.exit(2)
    except (click.exceptions.Exit, typer.Exit) as err:
        sys.exit(err.exit_code)
    except OSError as err:
        if err.errno not in MACHINE_ERRORS:
            raise
        if debug:
            console.print_exception()
        console.print(Text("error: ", style="bold red") + Text(_machine_error(err)), soft_wrap=True, highlight=False)
        sys.exit(2)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
