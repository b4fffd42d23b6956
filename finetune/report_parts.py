"""The pieces of the run report (`finetune.report`): tables, badges, data cards, parity and evaluation sections."""

from __future__ import annotations

from html import escape
from typing import Any

from finetune.evaluation.bias_results import Estimate
from finetune.plots import fmt
from finetune.run_dir import StageStatus
from finetune.texts import Translate

SAMPLES_SHOWN = 6
# a data card's rows: (field of the dataset report, label)
CARD_ROWS = (
    ("format", "format"),
    ("records_read", "records read"),
    ("bad_records", "bad records"),
    ("excluded", "excluded by policy"),
    ("kept", "kept"),
    ("characters", "characters"),
    ("languages", "languages"),
    ("licences", "licences"),
    ("sources", "sources"),
    ("grades", "sensitivity grades"),
    ("topics", "topics"),
    ("pii_found", "personal data found"),
    ("duplicates", "duplicates"),
    ("registered", "in the sensitive register"),
)
PARITY_COLUMNS = ("max_abs_logit_diff", "mean_kl", "top1_agreement", "greedy_agreement")


def table(header: list[str], rows: list[list], raw: bool = False) -> str:
    """An HTML table; cells are escaped unless `raw` (then they are HTML already). Numbers align right."""

    def cell(value: Any) -> str:
        if raw:
            return f"<td>{value}</td>"
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return f"<td{' class=num' if number else ''}>{escape(short(value))}</td>"

    head = "".join(f"<th>{h if raw else escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(items: list[tuple[str, Any]], key_header: str = "", value_header: str = "") -> str:
    """A two-column table of labels and values (rows without a value are left out)."""
    rows = [[k, v] for k, v in items if v is not None and v != ""]
    html = table([key_header, value_header], rows)
    return html.replace("<thead><tr><th></th><th></th></tr></thead>", "") if not key_header else html


def short(value: Any) -> str:
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, bool):
        return "✓" if value else "✗"
    return "—" if value is None else str(value)


def counts(table_: dict, tr: Translate) -> str:
    """`zh 38, en 25`: a count table, largest first."""
    items = sorted(table_.items(), key=lambda item: -item[1]) if table_ else []
    return ", ".join(f"{k} {v}" for k, v in items) or tr("none")


def data_card_table(datasets: list[tuple[dict, list[str]]], tr: Translate) -> str:
    """One column a dataset (with the stages that read it), one row a measure of its data card."""
    header = [tr("dataset"), *(escape(d["name"]) for d, _ in datasets)]
    rows = [[tr("read by stages"), *(", ".join(stages) for _, stages in datasets)]]
    for field, name in CARD_ROWS:
        cells = []
        for dataset, _ in datasets:
            value = dataset.get(field)
            if field == "pii_found":
                value = counts(value, tr) + f" ({dataset.get('pii_action')})"
            elif isinstance(value, dict):
                value = counts(value, tr)
            cells.append(value)
        rows.append([tr(name), *cells])
    return table(header, [[escape(str(r[0])), *(_num_cell(v) for v in r[1:])] for r in rows], raw=True)


def _num_cell(value: Any) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"<span class=num>{escape(short(value))}</span>"
    return escape(short(value))


def parity_table(comparisons: dict, tr: Translate) -> str:
    """Parity comparisons of a merge or export stage: the figures, the tolerance, the verdict."""
    header = [tr("comparison"), tr("compared with"), tr("max abs logit diff"), tr("mean KL")]
    header += [tr("top-1 agreement"), tr("greedy agreement"), tr("tolerance"), tr("result")]
    rows = []
    for name, c in comparisons.items():
        tolerance = ", ".join(f"{k} {short(v)}" for k, v in (c.get("tolerance") or {}).items())
        rows.append(
            [
                escape(name),
                escape(str(c.get("reference", "—"))),
                *(f"<span class=num>{escape(short(c.get(k)))}</span>" for k in PARITY_COLUMNS),
                escape(tolerance),
                pass_mark(bool(c.get("passed")), tr),
            ]
        )
    return table(header, rows, raw=True)


def pass_mark(passed: bool, tr: Translate) -> str:
    return (
        f'<span class="ok">{escape(tr("pass"))}</span>' if passed else f'<span class="bad">{escape(tr("FAIL"))}</span>'
    )


def state_badge(state: str, tr: Translate) -> str:
    css = {"done": "ok", "failed": "bad", "running": "warn"}.get(state, "muted")
    return f'<span class="badge {css}">{escape(tr(state))}</span>'


def gate_badge(gate: dict | None, tr: Translate) -> str:
    if not gate:
        return ""
    if gate.get("passed"):
        return f' <span class="badge ok">{escape(tr("gate passed"))}</span>'
    forced = f", {tr('forced')}" if gate.get("forced") else ""
    return f' <span class="badge bad">{escape(tr("gate failed") + forced)}</span>'


def warnings_html(status: StageStatus | None, tr: Translate) -> str:
    """A stage's warnings (a finished stage whose result deserves a look, e.g. rlhf that learned nothing), highlighted."""
    warnings = (status.summary.get("warnings") or []) if status else []
    return "".join(f'<div class="warning">{escape(tr("warning"))}: {escape(w)}</div>' for w in warnings)


# --- lineage ---------------------------------------------------------------------------------------


def lineage_section(lineage: dict, tr: Translate) -> str:
    """What went in (model and data files with their hashes and changes), what each stage read and used, the
    package versions (then and now, when a resume ran under others)."""
    heading = f"<h2>{escape(tr('Lineage'))}</h2>"
    if not lineage:
        return heading + f"<p class=muted>{escape(tr('lineage.json is missing'))}</p>"
    model = dict(lineage.get("model") or {})
    changes = model.pop("changes", [])
    files = model.pop("files", None) or model.pop("gguf_files", None) or {}
    parts = [heading, f"<h3>{escape(tr('Model'))}</h3>", kv_table(sorted(model.items()), tr("option"), tr("value"))]
    if files:
        parts.append(
            table([tr("file"), tr("bytes"), "sha256"], [[n, f.get("bytes"), f.get("sha256")] for n, f in files.items()])
        )
    if changes:
        parts.append(_changes(changes, tr))
    data = lineage.get("data") or {}
    if data:
        rows = []
        for name, d in data.items():
            rows.append([name, d.get("path") or d.get("review"), d.get("format"), d.get("bytes"), d.get("sha256")])
            rows += [
                [f"↳ {tr('changed')} {c.get('seen', '')}", "", "", c.get("bytes"), c.get("sha256")]
                for c in d.get("changes", [])
            ]
        parts.append(f"<h3>{escape(tr('Data files'))}</h3>")
        parts.append(table([tr("dataset"), tr("path"), tr("format"), tr("bytes"), "sha256"], rows))
        if any(d.get("changes") for d in data.values()):
            parts.append(
                f"<p class=warn>{escape(tr('changed during the run (the stages still to run read the new file)'))}</p>"
            )
    stage_rows = [
        [
            s["name"],
            s.get("kind"),
            tr(s.get("state") or ""),
            ", ".join(f"{k} ← {v}" for k, v in (s.get("inputs") or {}).items()) or "—",
            ", ".join(f"{k}: {v}" for k, v in (s.get("outputs") or {}).items()) or "—",
            "; ".join(_used(k, v) for k, v in (s.get("used") or {}).items()) or "—",
        ]
        for s in lineage.get("stages", [])
    ]
    header = [tr(h) for h in ("stage", "kind", "state", "inputs", "outputs", "used")]
    parts += [f"<h3>{escape(tr('Stages: what came from where'))}</h3>", table(header, stage_rows)]
    parts.append(_packages(lineage, tr))
    return "".join(parts)


def _changes(changes: list[dict], tr: Translate) -> str:
    rows = [[c.get("seen"), c.get("sha256")] for c in changes]
    return f"<p class=warn>{escape(tr('changed'))}</p>" + table([tr("changed"), "sha256"], rows)


def _used(field: str, used: Any) -> str:
    if not isinstance(used, dict):
        return f"{field}: {used}"
    what = used.get("adapter") or used.get("reward_model") or used.get("stage")
    return f"{field}: {what}" + (f" (sha256 {used['sha256']})" if used.get("sha256") else "")


def _packages(lineage: dict, tr: Translate) -> str:
    now, start = lineage.get("packages") or {}, lineage.get("packages_at_start")
    heading = f"<h3>{escape(tr('Packages'))}</h3>"
    if not start and not lineage.get("git_commit_at_start"):
        return heading + kv_table(sorted(now.items()), tr("package"), tr("version"))
    start = start or now
    rows = [[name, start.get(name, "—"), now.get(name, "—")] for name in sorted(set(start) | set(now))]
    rows.append(
        [tr("git commit"), lineage.get("git_commit_at_start") or lineage.get("git_commit"), lineage.get("git_commit")]
    )
    note = escape(tr("The code or packages changed while this run was resumed: see the columns 'at start' and 'now'."))
    return heading + f"<p class=warn>{note}</p>" + table([tr("package"), tr("at start"), tr("now")], rows)


# --- evaluation ----------------------------------------------------------------------------------


def evaluation_section(evaluation: dict, tr: Translate) -> str:
    """Gates, multiple choice per subject with the change against the baseline, and the alignment suite."""
    checkpoints = evaluation.get("checkpoints", [])
    labels = [c["label"] for c in checkpoints]
    parts = []
    gates = evaluation.get("gates", [])
    if gates:
        passed = evaluation.get("passed")
        verdict = (
            tr("passed")
            if passed
            else tr("failed — forced past it (--force)" if evaluation.get("forced") else "failed")
        )
        parts.append(
            f'<h3>{escape(tr("Gates"))}: <span class="{"ok" if passed else "bad"}">{escape(verdict)}</span></h3>'
        )
        rows = [
            [
                escape(g["gate"]),
                escape(g["requirement"]),
                escape(short(g["value"])),
                pass_mark(g["passed"], tr),
                escape(g.get("detail", "")),
            ]
            for g in gates
        ]
        parts.append(table([tr(h) for h in ("gate", "requirement", "value", "result", "detail")], rows, raw=True))
    for index, mc in enumerate(checkpoints[0].get("mc", []) if checkpoints else []):
        parts.append(f"<h3>{escape(tr('Multiple choice'))}: {escape(mc['name'])} ({escape(mc['method'])})</h3>")
        header = [
            tr("subject"),
            tr("questions"),
            *[f"{escape(label)} {escape(tr('accuracy [95% CI]'))}" for label in labels],
        ]
        if len(labels) > 1:
            header.append(tr("change"))
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
        parts.append(table(header, rows, raw=True))
    alignment = [c.get("alignment") for c in checkpoints]
    if any(alignment):
        parts.append(_alignment_section(labels, alignment, tr))
    return "".join(parts)


def _alignment_section(labels: list[str], results: list[dict | None], tr: Translate) -> str:
    name = next(r["name"] for r in results if r)
    keys = sorted({k for r in results if r for k in [*r.get("rule_rates", {}), *r.get("dimension_means", {})]})
    rows = [[tr("rule pass rate (all rules)"), *[short(r.get("rule_pass_rate")) if r else "—" for r in results]]]
    first = results[0] or {}
    rows += [
        [
            f"{tr('mean') if k in first.get('dimension_means', {}) else tr('rule')}: {k}",
            *[short((r.get("dimension_means", {}) | r.get("rule_rates", {})).get(k)) if r else "—" for r in results],
        ]
        for k in keys
    ]
    rows += [
        [tr("largest bias score gap"), *[short(r.get("bias_gap_max")) if r else "—" for r in results]],
        [tr("largest bias reference gap"), *[short(r.get("reference_gap_max")) if r else "—" for r in results]],
    ]
    parts = [f"<h3>{escape(tr('Alignment suite'))}: {escape(name)}</h3>", table([tr("measure"), *labels], rows)]
    if not first.get("reward_model"):
        parts.append(
            f"<p class=muted>{escape(tr('No reward model was wired to this stage: reward scores were not measured.'))}</p>"
        )
    bias = first.get("bias", [])
    if bias:
        parts.append(f"<h4>{escape(tr('Bias probes'))}</h4>")
        rows = [[b["id"], b["axis"], ", ".join(b["groups"]), *[_bias_of(r, b["id"]) for r in results]] for b in bias]
        header = [
            tr("probe"),
            tr("axis"),
            tr("groups"),
            *[f"{label} {tr('gap (score / reference)')}" for label in labels],
        ]
        parts.append(table(header, rows))
    implicit = first.get("implicit") or {}
    if implicit.get("categories"):
        parts.append(_implicit_section(labels, results, implicit["categories"], tr))
    probes = first.get("probes", [])[:SAMPLES_SHOWN]
    if probes:
        parts.append(f"<h4>{escape(tr('Replies, before and after'))} ({escape(tr('first'))} {len(probes)})</h4>")
        rows = []
        for i, probe in enumerate(probes):
            cells = [escape(probe["prompt"])]
            for result in results:
                other = (result or {}).get("probes", [])
                reply = other[i] if i < len(other) else None
                empty = f'<span class="muted">{escape(tr("(empty reply)"))}</span>'
                text = (escape(reply["response"]) or empty) if reply else ""
                cells.append(f"<div class=reply>{text}</div>{_rule_marks(reply)}" if reply else "—")
            rows.append(cells)
        parts.append(table([tr("prompt"), *[escape(label) for label in labels]], rows, raw=True))
    return "".join(parts)


IMPLICIT_KINDS = ("association", "decision", "ambiguous", "disambiguated")


def _implicit_section(labels: list[str], results: list[dict | None], categories: dict, tr: Translate) -> str:
    """Per bias category and probe kind: each checkpoint's score with its 95% bootstrap interval."""
    rows = []
    for name, first in categories.items():
        for kind in IMPLICIT_KINDS:
            if not first.get(kind):
                continue
            cells = []
            for result in results:
                category = (((result or {}).get("implicit") or {}).get("categories") or {}).get(name) or {}
                estimate = category.get(kind)
                cells.append(Estimate.model_validate(estimate).shown() if estimate else "—")
            rows.append([name, tr(kind), *cells])
    note = tr(
        "association: IAT-style d (0: no association); decision: spread of the picks across groups (0 to 1); "
        "ambiguous / disambiguated: BBQ bias score (-1 to 1, 0: unbiased). 95% bootstrap interval in brackets."
    )
    return (
        f"<h4>{escape(tr('Implicit-bias probes'))}</h4>"
        + table([tr("category"), tr("probe kind"), *labels], rows)
        + f"<p class=muted>{escape(note)}</p>"
    )


def _delta(value: float) -> str:
    css = "ok" if value > 0 else "bad" if value < 0 else "muted"
    return f'<span class="{css}">{value:+.1f}</span>'


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
            return f"{short(bias.get('gap'))} / {short(bias.get('reference_gap'))}"
    return "—"
