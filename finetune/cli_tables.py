"""The tables the `wenmai` command prints: the plan, the data layer, memory, a run's stages, reward scores, options.

Cells hold user text (stage names, messages, paths): print them on a console with markup off, as `finetune.cli`
does, so that `wenmai[gpu]` stays as it is; the tables' own styling is Text styles, not markup.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path

from pydantic import BaseModel
from rich.table import Table
from rich.text import Text

from finetune.config_io import load_run_recipe
from finetune.distributed.memory import estimate_lora_parameters, gib
from finetune.errors import WenmaiError
from finetune.model import model_config_dict
from finetune.recipe import OPTIONS, TrainingOptions, stage_datasets, wiring
from finetune.round_history import score_columns


def memory_table(report) -> Table:
    """The per-GPU memory estimate of each trainer stage."""

    hardware = report.hardware
    device = f"{hardware.gpu_name}, {gib(hardware.gpu_memory)}" if hardware.cuda else "no GPU here"
    table = Table(
        title=f"Memory per GPU (estimate; {report.world_size} process{'es' if report.world_size > 1 else ''}; {device})",
        title_justify="left",
    )
    for column in ("stage", "weights", "adapter + grads + optimizer", "activations", "logits", "total"):
        table.add_column(column)
    for est in report.estimates:
        training = est.parts["adapter"] + est.parts["gradients"] + est.parts["optimizer"]
        total = gib(est.total) + (f" (loading {gib(est.load_peak)})" if est.load_peak else "")
        table.add_row(
            est.stage,
            gib(est.parts["weights"]),
            gib(training),
            gib(est.parts["activations"]),
            gib(est.parts["logits"]),
            total,
        )
    notes = [n for est in report.estimates for n in est.notes]
    if any(est.host_per_node for est in report.estimates):
        notes.append(
            "host memory per node for offload: "
            + ", ".join(f"{e.stage} {gib(e.host_per_node)}" for e in report.estimates)
        )
    if notes:
        table.caption = "\n".join(dict.fromkeys(notes))
    return table


def score_table(scored: list[dict], names: list[str], rows: int) -> Table:
    """The first `rows` scored records and the mean of each score."""
    table = Table(title=f"Reward scores ({len(scored)} answers)", title_justify="left")
    table.add_column("#")
    table.add_column("answer")
    for name in names:
        table.add_column(name, justify="right")
    for i, record in enumerate(scored[:rows], start=1):
        answer = str(record.get("response") or (record.get("messages") or [{}])[-1].get("content", ""))
        table.add_row(
            str(i), answer[:40] + ("…" if len(answer) > 40 else ""), *(f"{record['scores'][n]:.3f}" for n in names)
        )
    means = [sum(r["scores"][n] for r in scored) / len(scored) for n in names]
    table.add_row("", Text("mean", style="bold"), *(f"{m:.3f}" for m in means))
    return table


def rounds_table(rows) -> Table:
    """`wenmai rounds`: one row a round, oldest first."""
    dimensions, sets = score_columns(rows)
    table = Table(title=f"Rounds ({len(rows)})", title_justify="left")
    for column in ("round", "run", "data added (by source)", *dimensions, *(f"{m} %" for m in sets), "gate", "export"):
        table.add_column(column, justify="right" if column in dimensions else "left")
    for row in rows:
        table.add_row(
            str(row.number),
            Path(row.run).name,
            row.data_text(),
            *row.score_cells(dimensions, sets),
            row.gate_text(),
            "yes" if row.exported else "no",
        )
    return table


def plan_table(recipe, counts: dict[str, dict]) -> Table:
    """Stages in order with their wiring, datasets and sizes, and the LoRA size estimate."""

    inputs, _ = wiring(recipe)
    config = model_config_dict(recipe.model)
    lora = estimate_lora_parameters(config, recipe.lora) if config else None
    title = "Plan" + (f" — LoRA r={recipe.lora.r} ({recipe.lora.variant}) trains ≈{lora:,} parameters" if lora else "")
    table = Table(title=title, title_justify="left")
    for column in ("#", "stage", "kind", "reads", "data", "length"):
        table.add_column(column)
    for i, stage in enumerate(recipe.stage_configs(), start=1):
        reads = ", ".join(f"{field} ← {source}" for field, source in inputs[stage.stage_name].items()) or "—"
        data = ", ".join(f"{d} ({counts.get(d, {}).get('records', '?')} records)" for d in stage_datasets(stage)) or "—"
        length = (
            "—"
            if not isinstance(stage, TrainingOptions)
            else (f"{stage.max_steps} steps" if stage.max_steps > 0 else f"{stage.epochs:g} epochs")
        )
        table.add_row(str(i), stage.stage_name, stage.kind, reads, data, length)
    return table


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
        table.add_row(
            r.name, str(r.records_read), str(r.bad_records), excluded, pii, duplicates, str(r.registered), str(r.kept)
        )
    return table


def summary_table(run_dir) -> Table:
    """One row per stage: state and its headline figures."""

    recipe = load_run_recipe(run_dir).recipe
    table = Table(title=f"Run {run_dir.name}", title_justify="left")
    for column in ("stage", "state", "figures"):
        table.add_column(column)
    for stage in recipe.stage_configs():
        status = run_dir.status(stage.stage_name)
        figures = ", ".join(
            f"{k}={v}" for k, v in (status.summary if status else {}).items() if not isinstance(v, dict)
        )
        table.add_row(stage.stage_name, status.state if status else "pending", figures)
    return table


def options_table(kind: str) -> Table:
    """`wenmai stages KIND`: each option of a stage kind in two columns that fit 80: the option with its type and
    default under it, and its meaning."""
    if kind not in OPTIONS:
        guess = difflib.get_close_matches(kind, list(OPTIONS), n=1, cutoff=0.5)
        hint = f"did you mean {guess[0]}? " if guess else ""
        raise WenmaiError(f"no stage kind {kind!r}; {hint}the kinds are {', '.join(OPTIONS)}")
    options = OPTIONS[kind]
    title = Text.assemble((kind, "bold"), f" — {(options.__doc__ or '').strip()}")
    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column("option", style="cyan", no_wrap=True)
    table.add_column("meaning", ratio=1)
    for name, info in option_fields(options):
        default = "required" if info.is_required() else repr(info.get_default(call_default_factory=True))
        about = f"{type_name(info.annotation)}; default {default}"
        table.add_row(name, Text.assemble(info.description or "", "\n", (about, "dim")))
    return table


def aligned_origins(annotated_yaml: str, column: int = 56) -> str:
    """The annotated recipe with its `# origin` comments in one column (lines longer than it keep two spaces), so the
    origins read down the page; the YAML itself is unchanged."""
    lines = []
    for line in annotated_yaml.splitlines():
        value, sep, origin = line.rpartition("  # ")
        lines.append(f"{value.ljust(column - 2)}  # {origin}" if sep else line)
    return "\n".join(lines)


def option_fields(model, prefix: str = ""):
    """(dotted name, field) for every option; a nested section (evaluate's `gates`) lists its own options."""

    for name, info in model.model_fields.items():
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from option_fields(info.annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def type_name(annotation) -> str:
    """A type as a recipe author reads it: `int`, `str | None`, `linear | cosine | constant`, `bool | auto`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        return " | ".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (list, dict, tuple) and args:
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
