"""The HTML run report: one self-contained file (inline CSS and SVG, no script, no network), in Chinese or English.

It is rewritten after every stage, so it can be opened during a run. It shows the run's state and each stage's
duration, the resolved recipe and the hyperparameters of each trainer stage (secrets stay `${env:...}`), each
stage's figures as labelled tables, its curves (every numeric series of its metrics.jsonl; runtime and throughput
counters go to a table of their own), evaluation and gate tables, parity checks of merge and export, a data card
per dataset, and the lineage. The language is the recipe's `output.language` (zh by default).
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

import yaml

from finetune.data.card import DataCard
from finetune.errors import WenmaiError
from finetune.plots import fmt, line_chart
from finetune.recipe import TrainingOptions
from finetune.report_parts import (
    data_card_table,
    evaluation_section,
    gate_badge,
    kv_table,
    lineage_section,
    parity_table,
    short,
    state_badge,
    table,
    warnings_html,
)
from finetune.round_history import round_history, score_columns
from finetune.run_dir import METRICS_FILE, RunDir, atomic_write_text, read_metrics
from finetune.texts import HTML_LANG, LANGUAGES, Translate, duration, label, translator

REPORT_FILE = "report.html"
DATA_CARD_FILE = "data_card.json"
NOT_SERIES = {"step", "epoch", "time", "stage"}
FIRST = ("loss", "learning_rate", "grad_norm", "reward", "rewards", "kl", "objective", "entropy")
# counters of how fast and how long, not of how well: a table, not a chart
COUNTER_MARKS = ("runtime", "per_second", "flos", "num_tokens", "num_input_tokens_seen")
HYPERPARAMETERS = tuple(name for name in TrainingOptions.model_fields if name != "name") + ("seq_len", "dataset")


def write_report(run_dir: RunDir | str | Path, language: str | None = None) -> Path:
    """(Re)write `report.html` in the run folder (in `language`, else the recipe's `output.language`); its path."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    if language is not None and language not in LANGUAGES:
        raise WenmaiError(f"report language {language!r}: use one of {', '.join(LANGUAGES)}")
    path = run_dir.root / REPORT_FILE
    atomic_write_text(path, render_report(run_dir, language))
    return path


def render_report(run_dir: RunDir, language: str | None = None) -> str:
    """The report's HTML text."""
    recipe = _read_recipe(run_dir)
    language = language or (recipe.get("output") or {}).get("language") or "zh"
    tr = translator(language)
    lineage = _read_json(run_dir.lineage_path) or {}
    stages = _stages(run_dir, lineage)
    body = [
        f"<h1>{escape(tr('Wenmai run report'))} <code>{escape(run_dir.name)}</code></h1>",
        _run_state(stages, tr),
        _overview(run_dir, lineage, stages, tr),
    ]
    if lineage.get("round"):
        body.append(_rounds_section(run_dir, tr))
    if lineage.get("federated"):
        body.append(_federated_section(run_dir, lineage, tr))
    body += [_stage_section(run_dir, stage, tr) for stage in stages]
    body += [_data_cards(run_dir, stages, tr), _recipe_section(recipe, run_dir, tr), lineage_section(lineage, tr)]
    title = f"{tr('Wenmai run report')} — {run_dir.name}"
    return _PAGE.format(
        lang=HTML_LANG[language],
        title=escape(title),
        style=_STYLE,
        body="\n".join(b for b in body if b),
        footer=escape(tr("Written by Wenmai. Self-contained: no scripts, no network.")),
    )


def _stages(run_dir: RunDir, lineage: dict) -> list[dict]:
    """The lineage's stages, each with the state and times of its status.json (newer while a stage runs)."""
    stages = lineage.get("stages") or [
        {"name": p.parent.name, "kind": "?", "state": "?"} for p in sorted(run_dir.root.glob("*/status.json"))
    ]
    updated = []
    for stage in stages:
        status = run_dir.status(stage["name"])
        if status is not None:
            stage = {**stage, "kind": status.kind, "state": status.state, "started": status.started}
            stage["finished"] = status.finished
        updated.append(stage)
    return updated


# --- the run ----------------------------------------------------------------------------------


def _run_state(stages: list[dict], tr: Translate) -> str:
    states = [s.get("state") for s in stages]
    if "failed" in states:
        headline, css = tr("Run stopped"), "bad"
    elif all(state == "done" for state in states):
        headline, css = tr("Run finished"), "ok"
    else:
        headline, css = tr("Run in progress"), "warn"
    note = tr("This report is rewritten after every stage; reload it to see the latest.")
    return f'<p class="runstate"><span class="badge {css}">{escape(headline)}</span> <span class=muted>{escape(note)}</span></p>'


def _overview(run_dir: RunDir, lineage: dict, stages: list[dict], tr: Translate) -> str:
    model = lineage.get("model") or {}
    facts = [
        (tr("recipe"), lineage.get("recipe")),
        (tr("created"), lineage.get("created")),
        (tr("updated"), lineage.get("updated")),
        (tr("base model"), model.get("path")),
        (tr("model sha256"), model.get("sha256") or model.get("gguf_sha256")),
        (tr("git commit"), lineage.get("git_commit")),
        (tr("git commit at start"), lineage.get("git_commit_at_start")),
        (tr("wenmai"), lineage.get("wenmai_version")),
    ]
    rows = []
    for stage in stages:
        status = run_dir.status(stage["name"])
        gate = gate_badge(stage.get("gate") or (status.summary.get("gate") if status else None), tr)
        error = f'<div class="error">{escape(status.error)}</div>' if status and status.error else ""
        started, finished = stage.get("started"), stage.get("finished")
        rows.append(
            [
                f'<a href="#stage-{escape(stage["name"])}">{escape(stage["name"])}</a>',
                escape(stage.get("kind", "")),
                state_badge(stage.get("state", ""), tr) + gate + error + warnings_html(status, tr),
                escape(short(started)),
                escape(duration(started, finished)),
                escape(str(status.attempts)) if status else "—",
            ]
        )
    header = [tr(h) for h in ("stage", "kind", "state", "started", "duration", "attempts")]
    return (
        f"<h2>{escape(tr('Overview'))}</h2>"
        + kv_table(facts)
        + f"<h2>{escape(tr('Stages'))}</h2>"
        + table(header, rows, raw=True)
    )


def _rounds_section(run_dir: RunDir, tr: Translate) -> str:
    """The rounds up to this one (`wenmai rounds`): data added, scores per dimension, gate, export."""
    heading = f"<h2>{escape(tr('Rounds'))}</h2>"
    try:
        rows = round_history(run_dir)
    except WenmaiError as err:  # a parent folder moved away: say so, the rest of the report still stands
        return f"{heading}<p class=muted>{escape(str(err))}</p>"
    dimensions, sets = score_columns(rows)
    cells = [
        [
            escape(str(row.number)),
            escape(Path(row.run).name),
            escape(row.data_text()),
            *map(escape, row.score_cells(dimensions, sets)),
            gate_badge(row.gate, tr) or "—",
            tr("yes") if row.exported else tr("no"),
            escape(f"{row.seconds:.0f} s") if row.seconds is not None else "—",
        ]
        for row in rows
    ]
    header = [tr("round"), tr("run"), tr("data added"), *dimensions, *(f"{m} %" for m in sets)]
    header += [tr("gate"), tr("exported"), tr("wall time")]
    return heading + table(header, cells, raw=True)


def _federated_section(run_dir: RunDir, lineage: dict, tr: Translate) -> str:
    """Federated rounds (per round: clients, examples, losses, bytes, time, epsilon) and, after `--compare`, the
    held-out loss of the global adapter against local-only and centralised training on every client's split."""
    stage = lineage["stages"][0]["name"]
    rounds = (_read_json(run_dir.root / stage / "federated.json") or {}).get("rounds", [])
    header = [tr(h) for h in ("round", "clients", "examples", "train loss", "held-out loss", "bytes", "wall time")]
    header.append("epsilon")
    rows = [
        [
            r["round"],
            ", ".join(r["clients"]),
            r["examples"],
            fmt(r["train_loss"]) if r.get("train_loss") is not None else "—",
            fmt(r["eval_loss"]) if r.get("eval_loss") is not None else "—",
            f"{r['bytes']:,}",
            f"{r['wall_s']:.1f} s",
            fmt(r["epsilon"]) if "epsilon" in r else "—",
        ]
        for r in rounds
    ]
    strategy = escape(lineage["federated"].get("strategy", ""))
    html = f"<h2>{escape(tr('Federated training'))} <small>({strategy})</small></h2>" + table(header, rows)
    comparison = _read_json(run_dir.root / stage / "comparison.json")
    if comparison:
        labels = list(comparison["mean"])
        rows_ = [
            [name, *(fmt(v) if v is not None else "—" for v in row.values())]
            for name, row in comparison["eval_loss"].items()
        ]
        rows_.append(
            [
                tr("mean"),
                *(fmt(comparison["mean"][c]) if comparison["mean"][c] is not None else "—" for c in labels),
            ]
        )
        heading = tr("Held-out loss on each client's split")
        html += f"<h3>{escape(heading)}</h3>"
        html += table([tr("client's split"), *labels], rows_)
    return html


# --- one stage --------------------------------------------------------------------------------


def _stage_section(run_dir: RunDir, stage: dict, tr: Translate) -> str:
    name = stage["name"]
    status = run_dir.status(name)
    parts = [
        f'<section id="stage-{escape(name)}"><h2>{escape(name)} <small>({escape(stage.get("kind", ""))}) · '
        f"{escape(tr(stage.get('state', '')))} · {escape(duration(stage.get('started'), stage.get('finished')))}"
        "</small></h2>",
        warnings_html(status, tr),
    ]
    if status is not None and status.summary:
        parts.append(_figures(status.summary, tr))
    rows = read_metrics(run_dir.root / name / METRICS_FILE)
    curves, finals, counters = series(rows)
    if curves:
        charts = "".join(
            line_chart(_chart_title(title, tr), group, x_label=tr("step"), last_label=tr("last value"))
            for title, group in curves
        )
        parts.append(f'<div class="charts">{charts}</div>')
    if counters:
        parts.append(f"<h3>{escape(tr('Runtime and throughput'))}</h3>")
        parts.append(kv_table([(label(k, tr), v) for k, v in counters.items()], tr("measure"), tr("value")))
    evaluation = _read_json(run_dir.root / name / "evaluation.json")
    if evaluation:
        parts.append(evaluation_section(evaluation, tr))
    elif finals:
        parts.append(kv_table([(label(k, tr), v) for k, v in sorted(finals.items())], tr("measure"), tr("value")))
    parity = _read_json(run_dir.root / name / "parity.json")
    if parity and parity.get("comparisons"):
        parts.append(f"<h3>{escape(tr('Parity checks'))}</h3>" + parity_table(parity["comparisons"], tr))
    if not (curves or evaluation or finals or counters or (status and status.summary)):
        parts.append(f"<p class=muted>{escape(tr('no metrics logged'))}</p>")
    return "".join(parts) + "</section>"


def _figures(summary: dict, tr: Translate) -> str:
    """A stage's summary as labelled tables, side by side: the plain figures in one, each nested table in its own."""
    skip = {"gate", "warnings", "used", "speed"}
    plain = [(label(k, tr), _listed(v)) for k, v in summary.items() if k not in skip and not isinstance(v, dict)]
    blocks = [(tr("Figures"), kv_table(plain, tr("measure"), tr("value")))] if plain else []
    for key, value in summary.items():
        if key in skip or not isinstance(value, dict) or not value:
            continue
        inner = [v for v in value.values() if isinstance(v, dict)]
        if inner and len(inner) == len(value):  # {dimension: {measure: value}}: one row a dimension
            columns = list(dict.fromkeys(k for v in inner for k in v))
            rows = [[name, *(_listed(v.get(c)) for c in columns)] for name, v in value.items()]
            blocks.append((label(key, tr), table(["", *(label(c, tr) for c in columns)], rows)))
        else:
            items = [(label(k, tr), _listed(v)) for k, v in value.items()]
            blocks.append((label(key, tr), kv_table(items, tr("measure"), tr("value"))))
    inner_html = "".join(f"<div><h4>{escape(title)}</h4>{html}</div>" for title, html in blocks)
    return f'<div class="figures">{inner_html}</div>' if blocks else ""


def series(rows: list[dict]) -> tuple[list[tuple[str, dict]], dict[str, Any], dict[str, Any]]:
    """Curves grouped by name (x = step; `eval_X` is drawn with `X`), finals (series of one point) and counters
    (runtime and throughput: their last value)."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in NOT_SERIES and isinstance(value, int | float) and not isinstance(value, bool):
                points.setdefault(key, []).append((float(row.get("step", 0)), float(value)))
    counters = {k: v[-1][1] for k, v in points.items() if any(mark in k for mark in COUNTER_MARKS)}
    points = {k: v for k, v in points.items() if k not in counters}
    curves = {k: v for k, v in points.items() if len(v) >= 2}
    finals = {k: v[-1][1] for k, v in points.items() if len(v) < 2}
    groups: dict[str, dict[str, list]] = {}
    for key in sorted(curves, key=_series_order):
        base = key.removeprefix("eval_") if key.removeprefix("eval_") in curves else key
        groups.setdefault(base, {})[key] = curves[key]
    for key in list(finals):  # an eval loss measured once still belongs on its training curve
        base = key.removeprefix("eval_")
        if key.startswith("eval_") and base in groups:
            groups[base][key] = points[key]
            finals.pop(key)
    return list(groups.items()), finals, counters


def _series_order(key: str) -> tuple[int, str]:
    bare = key.removeprefix("eval_").removeprefix("train_")
    rank = next((i for i, prefix in enumerate(FIRST) if bare.startswith(prefix)), len(FIRST))
    return rank, bare


def _chart_title(key: str, tr: Translate) -> str:
    text = tr(key)
    return key if text == key else f"{text} ({key})"


# --- the run's data, recipe and lineage -----------------------------------------------------------


def _data_cards(run_dir: RunDir, stages: list[dict], tr: Translate) -> str:
    """One data card per dataset (the stages that read the same records share it), then the policy."""
    found = [(s["name"], run_dir.root / s["name"] / DATA_CARD_FILE) for s in stages]
    found = [(stage, path) for stage, path in found if path.is_file()]
    if (run_dir.root / DATA_CARD_FILE).is_file():
        found.insert(0, ("run", run_dir.root / DATA_CARD_FILE))
    if not found:
        return ""
    datasets: dict[str, tuple[dict, list[str]]] = {}
    policies, others = [], []
    for stage, path in found:
        try:
            card = DataCard.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # a card of another shape: shown as its keys and values
            data = _read_json(path)
            others.append((stage, data)) if data is not None else None
            continue
        policies.append(card.policy)
        for dataset in card.datasets:
            key = json.dumps(dataset.model_dump(), sort_keys=True)
            datasets.setdefault(key, (dataset.model_dump(), []))[1].append(stage)
    parts = [f"<h2>{escape(tr('Data cards'))}</h2>"]
    if datasets:
        parts.append(data_card_table(list(datasets.values()), tr))
    if policies:
        policy = policies[-1]
        parts.append(f"<h3>{escape(tr('Data policy'))}</h3>")
        parts.append(kv_table([(label(k, tr), _listed(v)) for k, v in policy.items()], tr("option"), tr("value")))
    for stage, data in others:
        parts.append(f"<h3>{escape(stage)}</h3>" + kv_table(_flatten(data)[:40], tr("measure"), tr("value")))
    return "".join(parts)


def _recipe_section(recipe: dict, run_dir: RunDir, tr: Translate) -> str:
    """The hyperparameters of each trainer stage side by side, then the whole resolved recipe (folded)."""
    heading = f"<h2 id=recipe>{escape(tr('Recipe and hyperparameters'))}</h2>"
    if not recipe:
        return heading + f"<p class=muted>{escape(tr('recipe.yaml is missing'))}</p>"
    model, lora = recipe.get("model") or {}, recipe.get("lora") or {}
    facts = [(f"model.{k}", model.get(k)) for k in ("path", "gguf_file", "dtype", "quantization")]
    facts += [(f"lora.{k}", _as_written(lora.get(k))) for k in ("r", "alpha", "dropout", "variant", "targets")]
    parts = [heading, f"<h3>{escape(tr('Model and LoRA'))}</h3>", kv_table(facts, tr("option"), tr("value"))]
    trainers = []
    for item in recipe.get("stages") or []:
        if isinstance(item, dict) and len(item) == 1:
            kind, options = next(iter(item.items()))
            if isinstance(options, dict) and "learning_rate" in options:
                trainers.append((options.get("name") or kind, options))
    if trainers:
        keys = [k for k in HYPERPARAMETERS if any(k in options for _, options in trainers)]
        rows = [[k, *(_as_written(options.get(k)) for _, options in trainers)] for k in keys]
        parts.append(table([tr("option"), *(name for name, _ in trainers)], rows))
    text = run_dir.recipe_path.read_text(encoding="utf-8")
    summary = escape(tr("The resolved recipe, as run (secrets show as their ${env:...} reference)"))
    parts.append(f"<details><summary>{summary}</summary><pre class=recipe>{escape(text)}</pre></details>")
    return "".join(parts)


# --- small pieces ----------------------------------------------------------------------------


def _as_written(value: Any) -> Any:
    """A recipe value as the YAML has it (0.0002, not 2.00e-04)."""
    return None if value is None else _listed(value) if isinstance(value, list | dict) else str(value)


def _listed(value: Any) -> Any:
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_listed(v)}" for k, v in value.items())
    return value


def _flatten(data: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(data, dict) and depth < 3:
        return [item for k, v in data.items() for item in _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)]
    if isinstance(data, list):
        return [(prefix, ", ".join(map(str, data[:12])) + (" …" if len(data) > 12 else ""))]
    return [(prefix, data if not isinstance(data, dict) else json.dumps(data, ensure_ascii=False)[:200])]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_recipe(run_dir: RunDir) -> dict:
    try:
        data = yaml.safe_load(run_dir.recipe_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


_PAGE = """<!DOCTYPE html>
<html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
{body}
<footer>{footer}</footer>
</body></html>
"""

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",sans-serif;
margin:24px auto;max-width:1180px;color:#1f2328;padding:0 16px}
h1{font-size:24px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}h3{margin-bottom:6px}
h4{margin:10px 0 4px;font-size:13px}small{color:#57606a;font-weight:normal}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}td,th{border:1px solid #d0d7de;padding:4px 8px;
vertical-align:top;text-align:left}th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #d0d7de;border-radius:6px;background:#fff}
.chart-title{font-size:13px;font-weight:600}.chart-tick{font-size:10px;fill:#57606a}.chart-legend{font-size:10px}
.chart-frame{fill:none;stroke:#d0d7de}.chart-grid{stroke:#eaeef2}.chart-empty{font-size:12px;fill:#57606a}
.ok{color:#1a7f37;white-space:nowrap}.bad{color:#d1242f;font-weight:600;white-space:nowrap}.warn{color:#9a6700}.muted{color:#57606a}
.warning{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:4px 8px;margin:6px 0;font-size:13px}
.badge{border:1px solid currentColor;border-radius:10px;padding:0 6px;font-size:12px}
.error{color:#d1242f;white-space:pre-wrap;font-size:12px}.runstate{margin-top:-6px}
.reply{white-space:pre-wrap;max-width:420px}.rules{font-size:11px;margin-top:4px}
pre.recipe{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:8px;font-size:12px;overflow:auto}
summary{cursor:pointer;color:#0969da}.figures{display:flex;flex-wrap:wrap;gap:0 20px;align-items:flex-start}footer{margin-top:40px;color:#57606a;font-size:12px}
"""
