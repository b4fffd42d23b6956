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
from pathlib import Path
from typing import Any

from finetune import __version__
from finetune.data.card import DataCard

PROVENANCE_FILE = "wenmai_provenance.json"
STANDARD = "GB 45438-2025 (Cybersecurity technology — Labeling method for AI-generated synthetic content)"
EXPLICIT_LABEL = "本内容由人工智能生成 · AI-generated content"
DATA_CARD_FILES = ("data_card.json", "data_card.md")


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
            k: shipped_name(model[k]) if k == "path" else model.get(k)
            for k in ("path", "revision", "gguf_file", "gguf_sha256")
            if model.get(k)
        },
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


def data_cards(run_root: Path, stage_names: list[str]) -> list[tuple[str, Path, list[str]]]:
    """Data cards the data layer left in stage folders: (stage, file, licence and rights lines found in it)."""
    found = []
    for stage in stage_names:
        for name in DATA_CARD_FILES:
            path = run_root / stage / name
            if path.is_file():
                notes = (_card_lines(path) or _rights_lines(path)) if name.endswith(".json") else []
                found.append((stage, path, notes))
    return found


def render_card(
    *,
    title: str,
    provenance_block: dict,
    recipe: Any,
    lineage: dict,
    stages: list[dict],
    parity_rows: list[dict],
    gguf_files: list[dict],
    cards: list[tuple[str, str, list[str]]],
    intended_use: str | None,
    license_name: str | None,
    contract: dict,
) -> str:
    """README.md for the export: base model, data, stages, evaluation, parity, intended use, provenance."""
    base = provenance_block["base_model"]
    front = [
        "---",
        f"base_model: {json.dumps(base.get('path', 'unknown'))}",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [wenmai, lora, merged, aigc-labelled]",
    ]
    if license_name:
        front.append(f"license: {license_name}")
    lines = front + [
        "---",
        "",
        f"# {title}",
        "",
        f"> **{EXPLICIT_LABEL}.** {provenance_block['ai_generated_content']['statement']} Label its outputs as "
        "AI-generated wherever they are shown or published. `wenmai chat --label` adds a machine-readable "
        f"(implicit) label to each generation, in the spirit of {STANDARD}.",
        "",
    ]
    lines += [
        "## Model",
        "",
        f"- Base model: `{base.get('path', 'unknown')}`"
        + (
            f" (GGUF `{base['gguf_file']}`, sha256 `{base.get('gguf_sha256', '')[:16]}…`)"
            if base.get("gguf_file")
            else ""
        ),
        f"- Fine-tuned with Wenmai {provenance_block['producer']['tool_version']}, run `{provenance_block['run_id']}` "
        f"(recipe `{recipe.name}`); adapter of stage `{provenance_block.get('adapter_stage')}` merged into the base",
        f"- LoRA: r {recipe.lora.r}, alpha {recipe.lora.alpha}, variant {recipe.lora.variant}, targets {recipe.lora.targets}",
        f"- Chat template: the one training used (sha256 `{contract['chat_template_sha256'][:16]}…`); "
        f"generation stops at token ids {contract['stop_token_ids']}",
        "",
    ]
    lines += ["## Data", ""]
    for name, info in lineage.get("data", {}).items():
        lines.append(
            f"- `{name}`: {info.get('format')} records from `{Path(info.get('path', '')).name}` "
            f"(sha256 `{str(info.get('sha256', ''))[:16]}…`)"
        )
    for stage in dict.fromkeys(stage for stage, _, _ in cards):
        files = [(path, notes) for s, path, notes in cards if s == stage]
        lines.append(f"- Data card of stage `{stage}`: " + ", ".join(f"[{Path(p).name}]({p})" for p, _ in files))
        lines += [f"  - {note}" for _, notes in files for note in notes]
    if not cards:
        lines.append(
            "- No data card was recorded for this run; check each dataset's licence and rights before publishing."
        )
    lines += ["", "## Stages", "", "| stage | kind | key figures |", "| --- | --- | --- |"]
    lines += [f"| {s['name']} | {s['kind']} | {_figures(s.get('summary', {}))} |" for s in stages]
    evaluations = [s for s in stages if s["kind"] == "evaluate"]
    lines += ["", "## Evaluation", ""]
    lines += [f"- `{s['name']}`: {_figures(s.get('summary', {}))}" for s in evaluations] or [
        "No evaluation stage ran in this run; evaluate before relying on the model."
    ]
    lines += [
        "",
        "## Parity checks",
        "",
        "| model | compared with | max abs logit diff | mean KL | greedy agreement | passed |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['name']} | {r.get('reference', '—')} | {r['max_abs_logit_diff']:.3g} | {r['mean_kl']:.3g} | "
        f"{r['greedy_agreement']:.0%} | {'yes' if r['passed'] else 'no'} |"
        for r in parity_rows
    ]
    if gguf_files:
        lines += ["", "## GGUF files", ""]
        lines += [
            f"- `{g['file']}`: {g['type'].upper()}, {g['bytes'] / 2**20:,.0f} MiB, pre-tokenizer `{g['pre_tokenizer']}`"
            for g in gguf_files
        ]
        lines += [  # transformers, given gguf_file= on this folder, builds the tokenizer from tokenizer.json alone
            "",
            "In transformers, take the weights from a GGUF and the tokenizer (chat template, EOS) from this folder: "
            "`AutoModelForCausalLM.from_pretrained(folder, gguf_file=NAME)` and `AutoTokenizer.from_pretrained(folder)`"
            " (with `gguf_file=` here it loses both; a GGUF alone in a folder carries them). transformers reads no "
            "rope scaling from a GGUF: add `config=AutoConfig.from_pretrained(folder)` when config.json has one.",
        ]
        lines += run_locally_lines(gguf_files)
    lines += [
        "",
        "## Intended use",
        "",
        intended_use
        or (
            "Cultural question answering and writing assistance in the domain of the training data. Not evaluated for "
            "medical, legal or financial advice, nor for facts outside that domain; outputs can be wrong and must be "
            "reviewed by a person before publication."
        ),
        "",
    ]
    lines += [
        "## How to use",
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
        "or `wenmai chat EXPORT_DIR` (add `--label` for labelled JSON output).",
        "",
    ]
    lines += ["## Provenance", "", "```json", json.dumps(provenance_block, indent=2, ensure_ascii=False), "```", ""]
    return "\n".join(lines)


def run_locally_lines(gguf_files: list[dict]) -> list[str]:
    """How to run the GGUF export with llama.cpp and with Ollama (the `Modelfile` beside it)."""
    first = gguf_files[0]["file"]
    return [
        "",
        "### Run it with llama.cpp or Ollama",
        "",
        "llama.cpp (the GGUF carries the chat template and stop tokens training used):",
        "",
        "```bash",
        f"llama-cli -m {first} -cnv          # chat in the terminal",
        f"llama-server -m {first} --jinja    # OpenAI-compatible server on http://127.0.0.1:8080",
        "```",
        "",
        f"Ollama (`Modelfile` here: FROM `{first}`, the chat template in Ollama's form, the same stop tokens):",
        "",
        "```bash",
        "ollama create my-model -f Modelfile",
        "ollama run my-model",
        "```",
    ]


# --- helpers -------------------------------------------------------------------------------------


def _figures(summary: dict) -> str:
    parts = []
    for key, value in summary.items():
        if isinstance(value, bool | int | str) or value is None:
            parts.append(f"{key}={value}")
        elif isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
    return ", ".join(parts) or "—"


def _card_lines(path: Path) -> list[str]:
    """One line per dataset of a data layer card: records kept, licences, sources, grades, personal data."""
    try:
        card = DataCard.model_validate_json(path.read_text(encoding="utf-8"))
    except (ImportError, OSError, ValueError):
        return []
    lines = []
    for d in card.datasets:
        counts = lambda table: ", ".join(f"{k} ×{v}" for k, v in table.items()) or "none recorded"  # noqa: E731
        lines.append(
            f"`{d.name}`: {d.kept} records kept of {d.records_read}; licences {counts(d.licences)}; "
            f"sources {counts(d.sources)}; sensitivity {counts(d.grades)}; personal data found "
            f"{counts(d.pii_found)} ({d.pii_action})"
        )
    if card.policy.get("intended_use"):
        lines.append(f"data policy: intended use {card.policy['intended_use']}")
    return lines


def _rights_lines(path: Path) -> list[str]:
    """`key: value` lines for every licence / rights entry anywhere in a data card JSON."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return [f"(unreadable: {path.name})"]
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if any(word in str(key).lower() for word in ("licen", "rights")) and not isinstance(value, dict | list):
                    found.append(f"{here}: {value}")
                elif any(word in str(key).lower() for word in ("licen", "rights")) and isinstance(value, dict):
                    found.append(f"{here}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(data, "")
    return found[:20]
