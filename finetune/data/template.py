"""Chat templates: named templates, and the template contract recorded at training time.

The first training stage writes `template.json` (template text, EOS/pad ids, stop ids); every later
stage and the export compare the tokenizer they load against it, so a model never ships with a
template or EOS different from the one it learned.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import WenmaiError
from finetune.recipe import Recipe
from finetune.run_dir import RunDir, atomic_write_text

CONTRACT_FILE = "template.json"

NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
}


def resolve_template(value: str) -> str:
    """The template text for `model.chat_template`: a named template or a .jinja file."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise WenmaiError(
        f"model.chat_template: {value!r} is neither a named template ({', '.join(NAMED_TEMPLATES)}) nor a file"
    )


def template_contract(tokenizer: Any, stop_token_ids: list[int]) -> dict:
    """What a training stage records about its tokenizer and template."""
    template = tokenizer.chat_template or ""
    return {
        "chat_template": template,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": sorted(set(stop_token_ids)),
        "vocab_size": len(tokenizer),
    }


def write_contract(contract: dict, folder: Path) -> None:
    atomic_write_text(folder / CONTRACT_FILE, json.dumps(contract, indent=2, ensure_ascii=False))


def read_contract(folder: Path) -> dict:
    path = folder / CONTRACT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise WenmaiError(
            f"{path}: cannot read the template contract ({err}); the training stage's folder is incomplete"
        ) from None


def verify_contract(tokenizer: Any, contract: dict, where: str) -> None:
    """Raise if `tokenizer` differs from what training recorded (template text, EOS, pad, vocabulary)."""
    current = template_contract(tokenizer, contract.get("stop_token_ids", []))
    keys = ("chat_template_sha256", "eos_token", "eos_token_id", "pad_token_id", "vocab_size")
    drift = [
        f"{k}: trained with {contract.get(k)!r}, found {current[k]!r}" for k in keys if contract.get(k) != current[k]
    ]
    if drift:
        raise WenmaiError(
            f"template contract broken at {where}: the tokenizer differs from the one training used\n  - "
            + "\n  - ".join(drift)
            + "\nRestore the tokenizer files saved by the training stage (its tokenizer/ folder); "
            "a model used with another template or EOS answers badly or never stops."
        )


@dataclass
class TrainedTokenizer:
    """The tokenizer training used, verified against the contract the first training stage recorded."""

    tokenizer: Any
    contract: dict
    folder: Path
    contract_file: Path


def trained_tokenizer(run_dir: RunDir, recipe: Recipe, produced_by: dict[str, str], where: str) -> TrainedTokenizer:
    """Load and verify the tokenizer for the stage whose outputs are `produced_by`.

    The first finished stage of the run with a `template` output recorded the training contract; the
    producing stage's own tokenizer and contract (if it has them) must match it.
    """
    from transformers import AutoTokenizer

    with_contract = [o for o in finished_outputs(run_dir, recipe) if "template" in o and "tokenizer" in o]
    if not with_contract:
        raise WenmaiError(
            f"{run_dir.root} has no finished training stage that recorded a template contract "
            f"({CONTRACT_FILE}); run or resume training first"
        )
    first = with_contract[0]
    contract_file = Path(first["template"])
    contract = read_contract(contract_file.parent)
    own = produced_by if "template" in produced_by and "tokenizer" in produced_by else first
    own_contract = read_contract(Path(own["template"]).parent)
    if own_contract.get("chat_template_sha256") != contract.get("chat_template_sha256") or own_contract.get(
        "stop_token_ids"
    ) != contract.get("stop_token_ids"):
        raise WenmaiError(
            f"template contract broken at {where}: {own['template']} records a different chat template or "
            f"stop tokens than {contract_file}, which the first training stage wrote"
        )
    folder = Path(own["tokenizer"])
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as err:
        raise WenmaiError(f"cannot load the trained tokenizer from {folder}: {err}") from None
    verify_contract(tokenizer, contract, f"{where} ({folder})")
    return TrainedTokenizer(tokenizer, contract, folder, contract_file)


def finished_outputs(run_dir: RunDir, recipe: Recipe) -> list[dict[str, str]]:
    """The outputs (absolute paths) of every finished stage of a run, in recipe order."""
    outputs = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if status is not None and status.state == "done":
            outputs.append({kind: str(run_dir.root / config.stage_name / rel) for kind, rel in status.outputs.items()})
    return outputs
