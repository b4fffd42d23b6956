"""The export's model card (README.md) and its AI-generated-content provenance label.

The label follows the spirit of China's GB 45438-2025 (labelling AI-generated synthetic content): an
explicit label people can read, and an implicit, machine-readable one. A model is not content, so the
export carries (1) an explicit statement in the card, (2) a machine-readable provenance block, in the card
and in `wenmai_provenance.json`, naming the producer, run, base model and date, and (3) `implicit_label()`,
the metadata `wenmai chat --label` attaches to each generation, with the fields the standard names for
file metadata (Label, ContentProducer, ProduceID, ReservedCode1, ContentPropagator, PropagateID,
ReservedCode2). This is a labelling aid, not a compliance certificate.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.model_facts import base_model_facts, data_languages, note_text
from finetune.texts import LANGUAGES, Translate, duration, translator

PROVENANCE_FILE = "wenmai_provenance.json"
STANDARD = "GB 45438-2025 (Cybersecurity technology — Labeling method for AI-generated synthetic content)"
EXPLICIT_LABEL = "本内容由人工智能生成 · AI-generated content"
CARD_FILES = {"zh": "README.zh-CN.md", "en": "README.en.md"}  # the card in the language README.md is not in


def provenance(
    run_name: str,
    recipe: Any,
    lineage: dict,
    producer: str | None,
    created: str,
    files: dict[str, str],
    adapter_stage: str | None,
) -> dict:
    """The machine-readable provenance block: who produced this model, from what, when."""
    model = lineage.get("model", {})
    return {
        "schema": "wenmai-provenance/1",
        "ai_generated_content": {
            "explicit_label": EXPLICIT_LABEL,
            "statement": "This model generates text with artificial intelligence; its outputs are AI-generated content.",
            "implicit_label": "`wenmai chat --label` attaches AIGC metadata to each generation",
            "standard": STANDARD,
        },
        "producer": {"organisation": producer, "tool": "Wenmai", "tool_version": __version__},
        "run_id": run_name,
        "recipe": recipe.name,
        "base_model": {
            k: shipped_name(model[k]) if k in ("path", "gguf_file") else model.get(k)
            for k in ("path", "revision", "sha256", "gguf_file", "gguf_sha256")
            if model.get(k)
        }
        | ({"hub_id": hub} if (hub := base_model_facts(model).get("hub_id")) else {}),
        "adapter_stage": adapter_stage,
        "date": created,
        "files_sha256": files,
    }


def shipped_name(model_path: str) -> str:
    """How a shipped file names the base model: a local folder by its name only (a path of the machine that trained
    it says nothing to the user and tells where things are kept), a hub id, `pkg:` or `${env:...}` as is."""
    return Path(model_path).name if Path(model_path).expanduser().is_absolute() else model_path


def implicit_label(text: str, provenance_block: dict) -> dict:
    """Metadata for one generation: the AIGC fields of GB 45438-2025 plus where the model came from."""
    producer = provenance_block.get("producer", {})
    return {
        "AIGC": {
            "Label": "1",  # 1: the content is AI-generated
            "ContentProducer": producer.get("organisation") or f"Wenmai model {provenance_block.get('run_id')}",
            "ProduceID": uuid.uuid4().hex,
            "ReservedCode1": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            "ContentPropagator": "",
            "PropagateID": "",
            "ReservedCode2": "",
        },
        "model": {
            "run_id": provenance_block.get("run_id"),
            "base_model": provenance_block.get("base_model", {}).get("path"),
            "producer_tool": f"Wenmai {producer.get('tool_version', '')}".strip(),
        },
    }


# --- the card ------------------------------------------------------------------------------------


@dataclass
class CardInputs:
    """Everything a card shows; each section below reads what it needs."""

    title: str
    provenance_block: dict
    recipe: Any
    lineage: dict
    stages: list[dict]  # done stages: name, kind, summary, started, finished, evaluation (evaluate stages)
    parity_rows: list[dict]
    gguf_files: list[dict]
    cards: list[tuple[str, str, list[dict]]]
    intended_use: str | None
    license_name: str | None
    contract: dict
    base: dict = field(default_factory=dict)  # base_model_facts of the lineage's model


def card_files(language: str = "zh", **inputs: Any) -> dict[str, str]:
    """The export's model cards: README.md in `language` (with the hub's front matter) and the other language beside
    it (`CARD_FILES`), each linking to the other. `inputs` are the fields of `CardInputs`."""
    card = CardInputs(**inputs)
    card.base = base_model_facts(card.lineage.get("model") or {})
    other = next(code for code in LANGUAGES if code != language)
    return {
        "README.md": render_card(card, language, link=(_OTHER[other], CARD_FILES[other])),
        CARD_FILES[other]: render_card(card, other, front=False, link=(_OTHER[language], "README.md")),
    }


def render_card(card: CardInputs, language: str, front: bool = True, link: tuple[str, str] | None = None) -> str:
    """One model card in `language`: the front matter (when `front`), then every section of `SECTIONS` in order."""
    tr = translator(language)
    lines = front_matter(card) if front else []
    for section in SECTIONS:
        lines += section(card, tr)
    if link is not None:
        lines.insert(lines.index(f"# {card.title}") + 1, f"\n[{link[0]}]({link[1]})")
    return "\n".join(lines)


def front_matter(card: CardInputs) -> list[str]:
    """The hub's metadata: base_model only when a hub id is known (the hub accepts nothing else there)."""
    languages = data_languages(card.cards) or [card.recipe.output.language]
    licence = card.license_name or card.base.get("license") or "unknown"
    lines = ["---"]
    if card.base.get("hub_id"):
        lines += [f"base_model: {card.base['hub_id']}", "base_model_relation: finetune"]
    lines += [
        f"license: {licence}",
        f"language: [{', '.join(languages)}]",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [wenmai, lora, merged, aigc-labelled]",
        "---",
        "",
    ]
    return lines


def _title(card: CardInputs, tr: Translate) -> list[str]:
    return [f"# {card.title}", "", f"> **{EXPLICIT_LABEL}.** " + tr(LABEL_NOTE).format(standard=STANDARD), ""]


def _model(card: CardInputs, tr: Translate) -> list[str]:
    base, model, block = card.base, card.lineage.get("model") or {}, card.provenance_block
    name = base.get("hub_id") or block["base_model"].get("path", "unknown")
    facts = [tr("from the file {file}").format(file=f"`{base['file']}`")] if base.get("file") else []
    sha = model.get("gguf_sha256") or model.get("sha256")
    facts += [f"sha256 `{sha}`"] if sha else []
    facts += [
        tr("changed {time}: sha256 {sha}").format(time=c.get("seen", ""), sha=f"`{str(c.get('sha256'))[:16]}…`")
        for c in model.get("changes", [])
    ]
    lora, licence = card.recipe.lora, card.license_name or card.base.get("license")
    trained = tr(
        "Fine-tuned with Wenmai {version}: run {run} (recipe {recipe}); the adapter of stage {stage} merged into the base"
    )
    licence_line = tr("License: {licence}").format(licence=licence or tr("unknown"))
    if not card.license_name:
        licence_line += tr(" (from the base model; check the licences of your data too)")
    template = tr("Chat template: the one training used (sha256 {sha}); generation stops at token ids {ids}")
    return [
        f"## {tr('Model')}",
        "",
        f"- {tr('Base model')}: `{name}`" + (f" ({'; '.join(facts)})" if facts else ""),
        "- "
        + trained.format(
            version=block["producer"]["tool_version"],
            run=f"`{block['run_id']}`",
            recipe=f"`{card.recipe.name}`",
            stage=f"`{block.get('adapter_stage')}`",
        ),
        f"- LoRA: r {lora.r}, alpha {lora.alpha}, {lora.variant}, targets {lora.targets}",
        "- "
        + template.format(sha=f"`{card.contract['chat_template_sha256'][:16]}…`", ids=card.contract["stop_token_ids"]),
        f"- {licence_line}",
        "",
    ]


def _data(card: CardInputs, tr: Translate) -> list[str]:
    lines = [f"## {tr('Data')}", ""]
    for name, info in card.lineage.get("data", {}).items():
        where = f"`{Path(info.get('path') or info.get('review') or '').name}`"
        sha = f"`{str(info.get('sha256', ''))[:16]}…`"
        records = tr("{format} records from {file} (sha256 {sha})").format(
            format=info.get("format"), file=where, sha=sha
        )
        lines.append(f"- `{name}`: {records}")
        lines += [
            "  - "
            + tr("changed {time}: sha256 {sha}").format(time=c.get("seen", ""), sha=f"`{str(c.get('sha256'))[:16]}…`")
            for c in info.get("changes", [])
        ]
    for stage in dict.fromkeys(stage for stage, _, _ in card.cards):
        files = [(path, notes) for s, path, notes in card.cards if s == stage]
        links = ", ".join(f"[{Path(p).name}]({p})" for p, _ in files)
        lines.append("- " + tr("Data card of stage {stage}: {links}").format(stage=f"`{stage}`", links=links))
        lines += [f"  - {note_text(note, tr)}" for _, notes in files for note in notes]
    if not card.cards:
        lines.append(f"- {tr(NO_DATA_CARD)}")
    return [*lines, ""]


def _stages(card: CardInputs, tr: Translate) -> list[str]:
    header = [
        tr("stage"),
        tr("kind"),
        tr("steps"),
        tr("loss (first → last)"),
        tr("held-out loss (before → after)"),
        tr("duration"),
    ]
    lines = [f"## {tr('Stages')}", "", _row(header), _row(["---"] * len(header))]
    for s in card.stages:
        summary = s.get("summary", {})
        lines.append(
            _row(
                [
                    s["name"],
                    s["kind"],
                    str(summary.get("steps", "—")),
                    _pair(summary.get("first_loss"), summary.get("last_loss")),
                    _pair(summary.get("eval_loss_before"), summary.get("eval_loss_after")),
                    duration(s.get("started"), s.get("finished")),
                ]
            )
        )
    return [*lines, ""]


def _evaluation(card: CardInputs, tr: Translate) -> list[str]:
    """Each evaluate stage as a table: the exported model's line of descent against its baseline (the base)."""
    lines = [f"## {tr('Evaluation')}", ""]
    evaluations = [s for s in card.stages if s["kind"] == "evaluate" and s.get("evaluation")]
    if not evaluations:
        return [*lines, tr("No evaluation stage ran in this run; evaluate before relying on the model."), ""]
    for stage in evaluations:
        evaluation = stage["evaluation"]
        checkpoints = evaluation.get("checkpoints", [])[:2]
        labels = [c["label"] for c in checkpoints]
        header = [tr("measure"), *labels] + ([tr("change")] if len(labels) == 2 else [])
        lines += [f"`{stage['name']}`:", "", _row(header), _row(["---"] * len(header))]
        for measure, values in evaluation_rows(checkpoints, tr):
            change = (
                [f"{values[0] - values[1]:+.3g}"]
                if len(values) == 2 and None not in values
                else ["—"] * (len(labels) == 2)
            )
            lines.append(_row([measure, *(_num(v) for v in values), *change]))
        verdict = tr("passed") if evaluation.get("passed") else tr("failed")
        gates = ", ".join(g["gate"] for g in evaluation.get("gates", []))
        lines += ["", f"{tr('Gates')}: {verdict}" + (f" ({gates})" if gates else ""), ""]
    return lines


def evaluation_rows(checkpoints: list[dict], tr: Translate) -> list[tuple[str, list[float | None]]]:
    """(measure, value per checkpoint): multiple-choice accuracy per suite, rule pass rate, reward means."""
    rows: dict[str, list[float | None]] = {}

    def put(name: str, index: int, value: float | None) -> None:
        rows.setdefault(name, [None] * len(checkpoints))[index] = value

    for i, checkpoint in enumerate(checkpoints):
        for mc in checkpoint.get("mc") or []:
            put(f"{mc['name']} {tr('accuracy (%)')}", i, mc["overall"]["accuracy"])
        alignment = checkpoint.get("alignment") or {}
        if alignment:
            put(tr("rule pass rate (all rules)"), i, alignment.get("rule_pass_rate"))
            for dimension, value in (alignment.get("dimension_means") or {}).items():
                put(f"{tr('mean')}: {dimension}", i, value)
    return list(rows.items())


def _parity(card: CardInputs, tr: Translate) -> list[str]:
    header = [
        tr("comparison"),
        tr("compared with"),
        tr("max abs logit diff"),
        tr("mean KL"),
        tr("greedy agreement"),
        tr("passed"),
    ]
    lines = [f"## {tr('Parity checks')}", "", _row(header), _row(["---"] * len(header))]
    lines += [
        _row(
            [
                r["name"],
                r.get("reference", "—"),
                f"{r['max_abs_logit_diff']:.3g}",
                f"{r['mean_kl']:.3g}",
                f"{r['greedy_agreement']:.0%}",
                tr("yes") if r["passed"] else tr("no"),
            ]
        )
        for r in card.parity_rows
    ]
    return [*lines, ""]


def _gguf(card: CardInputs, tr: Translate) -> list[str]:
    if not card.gguf_files:
        return []
    lines = [f"## {tr('GGUF files')}", ""]
    lines += [
        f"- `{g['file']}`: {g['type'].upper()}, {g['bytes'] / 2**20:,.0f} MiB, pre-tokenizer `{g['pre_tokenizer']}`"
        for g in card.gguf_files
    ]
    # transformers, given gguf_file= on this folder, builds the tokenizer from tokenizer.json alone
    lines += ["", tr(GGUF_IN_TRANSFORMERS)]
    lines += run_locally_lines(card.gguf_files, tr)
    return [*lines, ""]


def _intended_use(card: CardInputs, tr: Translate) -> list[str]:
    return [f"## {tr('Intended use')}", "", card.intended_use or tr(DEFAULT_INTENDED_USE), ""]


def _how_to_use(card: CardInputs, tr: Translate) -> list[str]:
    return [
        f"## {tr('How to use')}",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tokenizer = AutoTokenizer.from_pretrained(EXPORT_DIR)",
        "model = AutoModelForCausalLM.from_pretrained(EXPORT_DIR)",
        'messages = [{"role": "user", "content": "你好"}]',
        'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")',
        "output = model.generate(**inputs, max_new_tokens=64)",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
        "```",
        "",
        f"{tr('or')} `wenmai chat EXPORT_DIR` ({tr('add `--label` for labelled JSON output')}).",
        "",
    ]


def _software(card: CardInputs, tr: Translate) -> list[str]:
    """The versions training ran under; those it started under too, when a resume ran under others."""
    lineage = card.lineage
    now, start = lineage.get("packages") or {}, lineage.get("packages_at_start") or {}
    names = sorted(set(now) | set(start))
    if not names:
        return []
    header = [tr("package"), tr("version")] + ([tr("at start")] if start else [])
    lines = [f"## {tr('Training software')}", "", _row(header), _row(["---"] * len(header))]
    lines += [_row([n, now.get(n, "—"), *([start.get(n, "—")] if start else [])]) for n in names]
    commit = lineage.get("git_commit")
    if commit or lineage.get("git_commit_at_start"):
        lines += ["", f"{tr('git commit')}: `{commit}`"]
        if lineage.get("git_commit_at_start"):
            lines[-1] += f" ({tr('at start')}: `{lineage['git_commit_at_start']}`)"
    return [*lines, ""]


def _provenance(card: CardInputs, tr: Translate) -> list[str]:
    block = json.dumps(card.provenance_block, indent=2, ensure_ascii=False)
    return [f"## {tr('Provenance')}", "", "```json", block, "```", ""]


# The card, top to bottom: a section is a function of the inputs and the language that returns its lines.
SECTIONS = (
    _title,
    _model,
    _data,
    _stages,
    _evaluation,
    _parity,
    _gguf,
    _intended_use,
    _how_to_use,
    _software,
    _provenance,
)

DEFAULT_INTENDED_USE = (
    "Cultural question answering and writing assistance in the domain of the training data. Not evaluated for "
    "medical, legal or financial advice, nor for facts outside that domain; outputs can be wrong and must be "
    "reviewed by a person before publication."
)
LABEL_NOTE = (
    "This model generates text with artificial intelligence; its outputs are AI-generated content. Label its outputs "
    "as AI-generated wherever they are shown or published. `wenmai chat --label` adds a machine-readable (implicit) "
    "label to each generation, in the spirit of {standard}."
)
GGUF_IN_TRANSFORMERS = (
    "In transformers, take the weights from a GGUF and the tokenizer (chat template, EOS) from this folder: "
    "`AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME)` and `AutoTokenizer.from_pretrained(folder)` "
    "(with `gguf_file=` here it loses both; a GGUF alone in a folder carries them). transformers reads no rope "
    "scaling from a GGUF: add `config=AutoConfig.from_pretrained(folder)` when config.json has one."
)
NO_DATA_CARD = "No data card was recorded for this run; check each dataset's licence and rights before publishing."
_OTHER = {"zh": "中文版模型卡", "en": "This card in English"}


def run_locally_lines(gguf_files: list[dict], tr: Translate) -> list[str]:
    """How to run the GGUF export with llama.cpp and with Ollama (the `Modelfile` beside it)."""
    first = gguf_files[0]["file"]
    return [
        "",
        f"### {tr('Run it with llama.cpp or Ollama')}",
        "",
        tr("llama.cpp (the GGUF carries the chat template and stop tokens training used):"),
        "",
        "```bash",
        f"llama-cli -m {first} -cnv          # chat in the terminal",
        f"llama-server -m {first} --jinja    # OpenAI-compatible server on http://127.0.0.1:8080",
        "```",
        "",
        tr(
            "Ollama (`Modelfile` here: FROM `{first}`, the chat template in Ollama's form, the same stop tokens):"
        ).format(first=first),
        "",
        "```bash",
        "ollama create my-model -f Modelfile",
        "ollama run my-model",
        "```",
    ]


# --- helpers -------------------------------------------------------------------------------------


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def _pair(first: float | None, last: float | None) -> str:
    return "—" if first is None else f"{first:.4g} → {last:.4g}" if last is not None else f"{first:.4g}"


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"
