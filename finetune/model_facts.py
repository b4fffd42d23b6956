"""What a model card says about its inputs: the base model's hub id, licence and file, and the data cards' notes."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from finetune.data.card import DataCard

DATA_CARD_FILES = ("data_card.json", "data_card.md")
# a GGUF file is named after its model: `SmolLM2-135M-Instruct.Q4_1.gguf`, `x-f16.gguf`
GGUF_TYPE_SUFFIX = re.compile(r"[.-](?:[QqIi]+\d\w*|[Ff]16|[Ff]32|[Bb][Ff]16)$")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def base_model_facts(model: dict) -> dict:
    """What is known of the base model from its lineage entry: `hub_id` (a hub id given, a hub-cache folder, or the
    GGUF file's metadata), `license` (GGUF metadata or the folder's README front matter), `file` it came from."""
    path, location = str(model.get("path") or ""), str(model.get("location") or "")
    facts: dict[str, Any] = {}
    if HUB_ID.fullmatch(path) and not model.get("local"):
        facts["hub_id"] = path
    for where in (location, path):
        cached = re.search(r"models--([\w.-]+?)--([\w.-]+)", where)
        if cached and "hub_id" not in facts:
            facts["hub_id"] = f"{cached[1]}/{cached[2]}"
    if model.get("gguf_file"):
        gguf = Path(model["gguf_file"])
        facts["file"] = gguf.name
        facts = _gguf_facts(gguf) | facts
    elif model.get("local") and location:
        facts.setdefault("license", _readme_licence(Path(location) / "README.md"))
    return {k: v for k, v in facts.items() if v}


def _gguf_facts(path: Path) -> dict:
    """The hub id and licence a GGUF file's `general.*` metadata names (nothing without the gguf package)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(str(path)).fields
    except (ImportError, OSError, ValueError):
        return {}

    def get(key: str) -> str | None:
        value = fields[key].contents() if key in fields else None
        return value if isinstance(value, str) and value else None

    facts = {"license": get("general.license")}
    for key in ("general.source.huggingface.repository", "general.base_model.0.repo_url", "general.source.url"):
        value = get(key) or ""
        found = re.search(r"huggingface\.co/([\w.-]+/[\w.-]+)", value) or HUB_ID.fullmatch(value)
        if found:
            facts["hub_id"] = found[1] if found.re.groups else found[0]
            return facts
    if get("general.organization"):  # the file is named after the model: <name>.<type>.gguf
        facts["hub_id"] = f"{get('general.organization')}/{GGUF_TYPE_SUFFIX.sub('', path.stem)}"
    return facts


def _readme_licence(readme: Path) -> str | None:
    try:
        front = readme.read_text(encoding="utf-8").split("---")[1]
        return str(yaml.safe_load(front).get("license") or "") or None
    except (OSError, IndexError, AttributeError, yaml.YAMLError):
        return None


def data_cards(run_root: Path, stage_names: list[str]) -> list[tuple[str, Path, list[dict]]]:
    """Data cards the data layer left in stage folders: (stage, file, notes found in it: one dict per dataset of a
    data layer card, its policy's intended use, or the licence and rights lines of a card of another shape)."""
    found = []
    for stage in stage_names:
        for name in DATA_CARD_FILES:
            path = run_root / stage / name
            if path.is_file():
                notes = (_card_notes(path) or _rights_notes(path)) if name.endswith(".json") else []
                found.append((stage, path, notes))
    return found


def data_languages(cards: list[tuple[str, str, list[dict]]]) -> list[str]:
    """The languages of the training data, most records first (from the data cards)."""
    counts: dict[str, int] = {}
    for _, _, notes in cards:
        for note in notes:
            for code, n in (note.get("languages") or {}).items():
                counts[code] = counts.get(code, 0) + n
    return [
        code for code, _ in sorted(counts.items(), key=lambda item: -item[1]) if code in ("zh", "en") or len(code) == 2
    ]


def note_text(note: dict, tr: Callable[[str], str]) -> str:
    """A data card note as the card prints it, in the language of `tr`."""
    if "line" in note:
        return note["line"]
    if "intended_use" in note:
        return tr("data policy: intended use {use}").format(use=note["intended_use"])

    def counts(table: dict) -> str:
        return ", ".join(f"{k} ×{v}" for k, v in table.items()) or tr("none recorded")

    return f"`{note['name']}`: " + tr(
        "{kept} records kept of {read}; licences {licences}; sources {sources}; sensitivity {grades}; "
        "personal data found {pii} ({action})"
    ).format(
        kept=note["kept"],
        read=note["records_read"],
        licences=counts(note["licences"]),
        sources=counts(note["sources"]),
        grades=counts(note["grades"]),
        pii=counts(note["pii_found"]),
        action=note["pii_action"],
    )


def _card_notes(path: Path) -> list[dict]:
    """One note per dataset of a data layer card (its report), and the policy's intended use."""
    try:
        card = DataCard.model_validate_json(path.read_text(encoding="utf-8"))
    except (ImportError, OSError, ValueError):
        return []
    notes: list[dict] = [d.model_dump(exclude={"path"}) for d in card.datasets]
    if card.policy.get("intended_use"):
        notes.append({"intended_use": card.policy["intended_use"]})
    return notes


def _rights_notes(path: Path) -> list[dict]:
    """`key: value` lines for every licence / rights entry anywhere in a data card JSON of another shape."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return [{"line": f"(unreadable: {path.name})"}]
    found: list[str] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                rights = any(word in str(key).lower() for word in ("licen", "rights"))
                if rights and not isinstance(value, dict | list):
                    found.append(f"{here}: {value}")
                elif rights and isinstance(value, dict):
                    found.append(f"{here}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
                else:
                    walk(value, here)
        elif isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{where}[{i}]")

    walk(data, "")
    return [{"line": line} for line in found[:20]]
