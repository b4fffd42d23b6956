"""The HTML run report: one self-contained file (inline CSS and SVG, no script, no network).

It shows each stage's state, figures and warnings (its summary's `warnings`), every numeric series of
each stage's metrics.jsonl as a curve (loss, learning rate, reward, KL, ... whatever the stage logged),
the evaluation tables and gate results, the data cards, the lineage, and replies before/after for a
few probes.
"""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

from finetune.errors import WenmaiError
from finetune.plots import fmt, line_chart
from finetune.round_history import round_history, score_columns
from finetune.run_dir import METRICS_FILE, RunDir, StageStatus, atomic_write_text, read_metrics

REPORT_FILE = "report.html"
DATA_CARD_FILE = "data_card.json"
SAMPLES_SHOWN = 6
NOT_SERIES = {"step", "epoch", "time", "stage"}
FIRST = ("loss", "learning_rate", "grad_norm", "reward", "rewards", "kl", "objective", "entropy")


def write_report(run_dir: RunDir | str | Path) -> Path:
    """(Re)write `report.html` in the run folder; returns its path."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir.open(run_dir)
    path = run_dir.root / REPORT_FILE
    atomic_write_text(path, render_report(run_dir))
    return path


def render_report(run_dir: RunDir) -> str:
    """The report's HTML text."""
    lineage = _read_json(run_dir.lineage_path) or {}
    stages = lineage.get("stages") or [
        {"name": p.parent.name, "kind": "?", "state": "?"} for p in sorted(run_dir.root.glob("*/status.json"))
    ]
    body = [f"<h1>Wenmai run <code>{escape(run_dir.name)}</code></h1>", _overview(run_dir, lineage, stages)]
    if lineage.get("round"):
        body.append(_rounds_section(run_dir))
    if lineage.get("federated"):
        body.append(_federated_section(run_dir, lineage))
    for stage in stages:
        body.append(_stage_section(run_dir, stage))
    body.append(_data_cards(run_dir, stages))
    body.append(_lineage_section(lineage))
    return _PAGE.format(
        title=escape(f"Wenmai report — {run_dir.name}"), style=_STYLE, body="\n".join(b for b in body if b)
    )


# --- sections ------------------------------------------------------------------------------


def _overview(run_dir: RunDir, lineage: dict, stages: list[dict]) -> str:
    facts = [
        ("recipe", lineage.get("recipe")),
        ("created", lineage.get("created")),
        ("updated", lineage.get("updated")),
        ("model", (lineage.get("model") or {}).get("path")),
        ("git commit", lineage.get("git_commit")),
        ("wenmai", lineage.get("wenmai_version")),
    ]
    rows = []
    for stage in stages:
        status = run_dir.status(stage["name"])
        figures = {k: v for k, v in (status.summary if status else {}).items() if not isinstance(v, dict | list)}
        gate = _gate_badge(stage.get("gate") or (status.summary.get("gate") if status else None))
        error = f'<div class="error">{escape(status.error)}</div>' if status and status.error else ""
        rows.append(
            [
                f'<a href="#stage-{escape(stage["name"])}">{escape(stage["name"])}</a>',
                escape(stage.get("kind", "")),
                _state_badge(stage.get("state", "")) + gate,
                escape(", ".join(f"{k}={_short(v)}" for k, v in figures.items())) + error + _warnings(status),
            ]
        )
    return _kv_table(facts) + "<h2>Stages</h2>" + _table(["stage", "kind", "state", "figures"], rows, raw=True)


def _rounds_section(run_dir: RunDir) -> str:
    """The rounds up to this one (`wenmai rounds`): data added, scores per dimension, gate, export."""
    try:
        rows = round_history(run_dir)
    except WenmaiError as err:  # a parent folder moved away: say so, the rest of the report still stands
        return f"<h2>Rounds</h2><p class=muted>{escape(str(err))}</p>"
    dimensions, sets = score_columns(rows)
    table = []
    for row in rows:
        table.append(
            [
                escape(str(row.number)),
                escape(Path(row.run).name),
                escape(row.data_text()),
                *map(escape, row.score_cells(dimensions, sets)),
                _gate_badge(row.gate) or "—",
                "yes" if row.exported else "no",
                escape(f"{row.seconds:.0f} s") if row.seconds is not None else "—",
            ]
        )
    header = ["round", "run", "data added", *dimensions, *(f"{m} %" for m in sets), "gate", "exported", "wall time"]
    return "<h2>Rounds</h2>" + _table(header, table, raw=True)


def _federated_section(run_dir: RunDir, lineage: dict) -> str:
    """Federated rounds (per round: clients, examples, losses, bytes, time, epsilon) and, after `--compare`, the
    held-out loss of the global adapter against local-only and centralised training on every client's split."""
    stage = lineage["stages"][0]["name"]
    rounds = (_read_json(run_dir.root / stage / "federated.json") or {}).get("rounds", [])
    header = ["round", "clients", "examples", "train loss", "held-out loss", "bytes", "wall time", "epsilon"]
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
    html = f"<h2>Federated training <small>({strategy})</small></h2>" + _table(header, rows)
    comparison = _read_json(run_dir.root / stage / "comparison.json")
    if comparison:
        labels = list(comparison["mean"])
        table = [
            [name, *(fmt(v) if v is not None else "—" for v in row.values())]
            for name, row in comparison["eval_loss"].items()
        ]
        table.append(
            [
                "mean",
                *(fmt(comparison["mean"][label]) if comparison["mean"][label] is not None else "—" for label in labels),
            ]
        )
        html += "<h3>Held-out loss on each client's split</h3>" + _table(["client's split", *labels], table)
    return html


def _stage_section(run_dir: RunDir, stage: dict) -> str:
    name = stage["name"]
    parts = [
        f'<section id="stage-{escape(name)}"><h2>{escape(name)} <small>({escape(stage.get("kind", ""))})</small></h2>',
        _warnings(run_dir.status(name)),
    ]
    rows = read_metrics(run_dir.root / name / METRICS_FILE)
    curves, finals = _series(rows)
    if curves:
        parts.append('<div class="charts">' + "".join(line_chart(title, group) for title, group in curves) + "</div>")
    evaluation = _read_json(run_dir.root / name / "evaluation.json")
    if evaluation:
        parts.append(_evaluation_section(evaluation))
    elif finals:
        parts.append(_kv_table(sorted(finals.items())))
    if not curves and not evaluation and not finals:
        parts.append("<p class=muted>no metrics logged</p>")
    return "".join(parts) + "</section>"


def _series(rows: list[dict]) -> tuple[list[tuple[str, dict]], dict[str, Any]]:
    """Numeric series by name (x = step); `eval_X` is drawn with `X`. Series of one point are returned as finals."""
    points: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in NOT_SERIES and isinstance(value, int | float) and not isinstance(value, bool):
                points.setdefault(key, []).append((float(row.get("step", 0)), float(value)))
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
    return list(groups.items()), finals


def _series_order(key: str) -> tuple[int, str]:
    bare = key.removeprefix("eval_").removeprefix("train_")
    rank = next((i for i, prefix in enumerate(FIRST) if bare.startswith(prefix)), len(FIRST))
    return rank, bare


def _evaluation_section(evaluation: dict) -> str:
    checkpoints = evaluation.get("checkpoints", [])
    labels = [c["label"] for c in checkpoints]
    parts = []
    gates = evaluation.get("gates", [])
    if gates:
        verdict = (
            "passed"
            if evaluation.get("passed")
            else ("failed — forced past it (--force)" if evaluation.get("forced") else "failed")
        )
        parts.append(f'<h3>Gates: <span class="{"ok" if evaluation.get("passed") else "bad"}">{verdict}</span></h3>')
        parts.append(
            _table(
                ["gate", "requirement", "value", "result", "detail"],
                [
                    [
                        escape(g["gate"]),
                        escape(g["requirement"]),
                        escape(_short(g["value"])),
                        _pass(g["passed"]),
                        escape(g.get("detail", "")),
                    ]
                    for g in gates
                ],
                raw=True,
            )
        )
    for index, mc in enumerate(checkpoints[0].get("mc", []) if checkpoints else []):
        parts.append(f"<h3>Multiple choice: {escape(mc['name'])} ({escape(mc['method'])})</h3>")
        header = ["subject", "questions", *[f"{escape(label)} accuracy [95% CI]" for label in labels]]
        if len(labels) > 1:
            header.append("change")
        rows = []
        for position, subject in enumerate([*mc["subjects"], mc["overall"]]):
            cells = [escape(subject["subject"]), str(subject["total"])]
            values = []
            for checkpoint in checkpoints:
                scores = checkpoint.get("mc", [])
                row = [*scores[index]["subjects"], scores[index]["overall"]][position] if index < len(scores) else None
                values.append(row["accuracy"] if row else None)
                cells.append(f"{row['accuracy']:.1f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]" if row else "—")
            if len(labels) > 1 and None not in values[:2]:
                cells.append(_delta(values[0] - values[1]))
            rows.append(cells)
        parts.append(_table(header, rows, raw=True))
    alignment = [c.get("alignment") for c in checkpoints]
    if any(alignment):
        parts.append(_alignment_section(labels, alignment))
    return "".join(parts)


def _alignment_section(labels: list[str], results: list[dict | None]) -> str:
    name = next(r["name"] for r in results if r)
    keys = sorted({k for r in results if r for k in [*r.get("rule_rates", {}), *r.get("dimension_means", {})]})
    rows = [["rule pass rate (all rules)", *[_short(r.get("rule_pass_rate")) if r else "—" for r in results]]]
    rows += [
        [
            f"{'mean ' if k in (results[0] or {}).get('dimension_means', {}) else 'rule: '}{k}",
            *[_short((r.get("dimension_means", {}) | r.get("rule_rates", {})).get(k)) if r else "—" for r in results],
        ]
        for k in keys
    ]
    rows += [
        ["largest bias score gap", *[_short(r.get("bias_gap_max")) if r else "—" for r in results]],
        ["largest bias reference gap", *[_short(r.get("reference_gap_max")) if r else "—" for r in results]],
    ]
    parts = [
        f"<h3>Alignment suite: {escape(name)}</h3>",
        _table(["measure", *labels], [[escape(str(c)) for c in row] for row in rows], raw=True),
    ]
    first = results[0] or {}
    if not first.get("reward_model"):
        parts.append("<p class=muted>No reward model was wired to this stage: reward scores were not measured.</p>")
    bias = first.get("bias", [])
    if bias:
        parts.append("<h4>Bias probes</h4>")
        rows = [
            [
                escape(b["id"]),
                escape(b["axis"]),
                escape(", ".join(b["groups"])),
                *[escape(_short(_bias_of(r, b["id"]))) for r in results],
            ]
            for b in bias
        ]
        parts.append(
            _table(
                ["probe", "axis", "groups", *[f"{escape(label)} gap (score / reference)" for label in labels]],
                rows,
                raw=True,
            )
        )
    probes = first.get("probes", [])[:SAMPLES_SHOWN]
    if probes:
        parts.append(f"<h4>Replies, before and after (first {len(probes)} probes)</h4>")
        rows = []
        for i, probe in enumerate(probes):
            cells = [escape(probe["prompt"])]
            for result in results:
                other = (result or {}).get("probes", [])
                reply = other[i] if i < len(other) else None
                text = escape(reply["response"]) or '<span class="muted">(empty reply)</span>' if reply else ""
                cells.append(f"<div class=reply>{text}</div>{_rule_marks(reply)}" if reply else "—")
            rows.append(cells)
        parts.append(_table(["prompt", *[escape(label) for label in labels]], rows, raw=True))
    return "".join(parts)


def _data_cards(run_dir: RunDir, stages: list[dict]) -> str:
    cards = [(run_dir.root / DATA_CARD_FILE, "run")] + [
        (run_dir.root / s["name"] / DATA_CARD_FILE, s["name"]) for s in stages
    ]
    found = [(where, _read_json(path)) for path, where in cards if path.is_file()]
    if not found:
        return ""
    parts = ["<h2>Data cards</h2>"]
    for where, card in found:
        parts.append(f"<h3>{escape(where)}</h3>" + _kv_table(_flatten(card)[:40]))
    return "".join(parts)


def _lineage_section(lineage: dict) -> str:
    if not lineage:
        return "<h2>Lineage</h2><p class=muted>lineage.json is missing</p>"
    parts = ["<h2>Lineage</h2>", "<h3>Model</h3>", _kv_table(sorted((lineage.get("model") or {}).items()))]
    data = lineage.get("data") or {}
    if data:
        parts.append("<h3>Data files</h3>")
        parts.append(
            _table(
                ["dataset", "path", "format", "bytes", "sha256"],
                [
                    [name, d.get("path"), d.get("format"), d.get("bytes"), str(d.get("sha256", ""))[:16]]
                    for name, d in data.items()
                ],
            )
        )
    stage_rows = [
        [
            s["name"],
            s.get("kind"),
            s.get("state"),
            ", ".join(f"{k} ← {v}" for k, v in (s.get("inputs") or {}).items()) or "—",
            ", ".join(f"{k}: {v}" for k, v in (s.get("outputs") or {}).items()) or "—",
        ]
        for s in lineage.get("stages", [])
    ]
    parts += [
        "<h3>Stages: what came from where</h3>",
        _table(["stage", "kind", "state", "inputs", "outputs"], stage_rows),
    ]
    parts += ["<h3>Packages</h3>", _kv_table(sorted((lineage.get("packages") or {}).items()))]
    return "".join(parts)


# --- small pieces ----------------------------------------------------------------------------


def _table(header: list[str], rows: list[list], raw: bool = False) -> str:
    cell = (lambda v: str(v)) if raw else (lambda v: escape(_short(v)))
    head = "".join(f"<th>{h if raw else escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _kv_table(items: list[tuple[str, Any]]) -> str:
    return _table(["", ""], [[k, v] for k, v in items if v is not None]).replace(
        "<thead><tr><th></th><th></th></tr></thead>", ""
    )


def _flatten(data: Any, prefix: str = "", depth: int = 0) -> list[tuple[str, Any]]:
    if isinstance(data, dict) and depth < 3:
        return [item for k, v in data.items() for item in _flatten(v, f"{prefix}.{k}" if prefix else str(k), depth + 1)]
    if isinstance(data, list):
        simple = all(not isinstance(v, dict | list) for v in data)
        return [
            (
                prefix,
                ", ".join(map(str, data[:12])) + (" …" if len(data) > 12 else "") if simple else f"{len(data)} items",
            )
        ]
    return [(prefix, data if not isinstance(data, dict) else json.dumps(data, ensure_ascii=False)[:200])]


def _short(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    return "—" if value is None else str(value)


def _delta(value: float) -> str:
    css = "ok" if value > 0 else "bad" if value < 0 else "muted"
    return f'<span class="{css}">{value:+.1f}</span>'


def _pass(passed: bool) -> str:
    return '<span class="ok">pass</span>' if passed else '<span class="bad">FAIL</span>'


def _state_badge(state: str) -> str:
    css = {"done": "ok", "failed": "bad", "running": "warn"}.get(state, "muted")
    return f'<span class="badge {css}">{escape(state)}</span>'


def _warnings(status: StageStatus | None) -> str:
    """A stage's warnings (a finished stage whose result deserves a look, e.g. rlhf that learned nothing), highlighted."""
    warnings = (status.summary.get("warnings") or []) if status else []
    return "".join(f'<div class="warning">warning: {escape(w)}</div>' for w in warnings)


def _gate_badge(gate: dict | None) -> str:
    if not gate:
        return ""
    if gate.get("passed"):
        return ' <span class="badge ok">gate passed</span>'
    return ' <span class="badge bad">gate failed' + (", forced" if gate.get("forced") else "") + "</span>"


def _rule_marks(reply: dict) -> str:
    rules = reply.get("rules") or {}
    marks = " ".join(
        f'<span class="{"ok" if ok else "bad"}">{escape(name)} {"✓" if ok else "✗"}</span>'
        for name, ok in rules.items()
    )
    scores = " ".join(f"{escape(k)}={fmt(v)}" for k, v in (reply.get("scores") or {}).items())
    return f"<div class=rules>{marks} {scores}</div>" if marks or scores else ""


def _bias_of(result: dict | None, probe_id: str) -> str:
    for bias in (result or {}).get("bias", []):
        if bias["id"] == probe_id:
            return f"{_short(bias.get('gap'))} / {_short(bias.get('reference_gap'))}"
    return "—"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style></head>
<body>
{body}
<footer>Written by Wenmai. Self-contained: no scripts, no network.</footer>
</body></html>
"""

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans CJK SC","PingFang SC",sans-serif;margin:24px auto;max-width:1180px;
color:#1f2328;padding:0 16px}
h1{font-size:24px}h2{border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:32px}h3{margin-bottom:6px}small{color:#57606a}
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}td,th{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f6f8fa}.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #d0d7de;border-radius:6px;background:#fff}
.chart-title{font-size:13px;font-weight:600}.chart-tick{font-size:10px;fill:#57606a}.chart-legend{font-size:10px}
.chart-frame{fill:none;stroke:#d0d7de}.chart-grid{stroke:#eaeef2}.chart-empty{font-size:12px;fill:#57606a}
.ok{color:#1a7f37}.bad{color:#d1242f;font-weight:600}.warn{color:#9a6700}.muted{color:#57606a}
.warning{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:4px 8px;margin:6px 0;font-size:13px}
.badge{border:1px solid currentColor;border-radius:10px;padding:0 6px;font-size:12px}.error{color:#d1242f;white-space:pre-wrap;font-size:12px}
.reply{white-space:pre-wrap;max-width:420px}.rules{font-size:11px;margin-top:4px}footer{margin-top:40px;color:#57606a;font-size:12px}
"""
