"""Chat templates: named templates, and the template contract recorded at training time.

The first training stage writes `template.json` (template text, EOS/pad ids, stop ids); every later
stage and the export compare the tokenizer they load against it, so a model never ships with a
template or EOS different from the one it learned.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.chat import end_of_turn_ids
from finetune.errors import WenmaiError
from finetune.recipe import ModelSection, Recipe
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
# The model zoo's templates (configs/models/): name -> (where the text comes from, file).
# `trl:` files are read from the installed TRL (trl/chat_templates/); `wenmai:` files ship in finetune/data/templates/
# (their sources: SOURCES.md there). Thinking models train with TRL's training variants, which render every turn the
# same whatever follows it (the originals rewrite earlier turns, so assistant turns could not be located).
ZOO_TEMPLATES: dict[str, tuple[str, str]] = {
    "qwen2_5": ("trl", "qwen2_5.jinja"),
    "qwen3": ("trl", "qwen3_training.jinja"),  # thinking: assistant turns carry their <think> block
    "qwen3_nothink": ("trl", "qwen3_training.jinja"),  # non-thinking: the prompt ends with an empty <think> block
    "llama3_1": ("trl", "llama3_1.jinja"),
    "llama3_2": ("trl", "llama3_2.jinja"),
    "deepseek_r1_distill": ("trl", "deepseek_r1_distill_training.jinja"),
    "glm4": ("wenmai", "glm4.jinja"),
    "internlm3": ("wenmai", "internlm3.jinja"),
    "mistral": ("wenmai", "mistral.jinja"),
}
# Settings fixed in front of a template: Qwen3 without thinking, and Llama 3.2's "Today Date" pinned to the template's
# own fallback so a run renders (and caches) the same text every day.
_TEMPLATE_SETTINGS = {
    "qwen3_nothink": "{%- set enable_thinking = false %}\n",
    "llama3_2": '{%- set date_string = "26 Jul 2024" %}\n',
}
THINKING = {"qwen3": True, "qwen3_nothink": False, "deepseek_r1_distill": True}


def template_names() -> list[str]:
    """Every name `model.chat_template` accepts besides a file path."""
    return [*NAMED_TEMPLATES, *ZOO_TEMPLATES]


def resolve_template(value: str) -> str:
    """The template text for `model.chat_template`: a named template or a .jinja file."""
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if value in ZOO_TEMPLATES:
        return _TEMPLATE_SETTINGS.get(value, "") + _zoo_file(value).read_text(encoding="utf-8")
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    close = difflib.get_close_matches(value, template_names(), n=1)
    hint = f" — did you mean {close[0]}?" if close else ""
    raise WenmaiError(
        f"model.chat_template: {value!r} is neither a named template ({', '.join(template_names())}) nor a file{hint}"
    )


def template_name(value: str | None) -> str | None:
    """The name a recipe's `model.chat_template` gives its template (None for the tokenizer's own or a file)."""
    return value if value in NAMED_TEMPLATES or value in ZOO_TEMPLATES else None


def _zoo_file(name: str) -> Path:
    where, file = ZOO_TEMPLATES[name]
    if where == "trl":  # found without importing TRL (heavy), so `wenmai validate` stays quick
        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.origin:
            raise WenmaiError(f"model.chat_template: {name} is read from TRL's templates, and TRL is not installed")
        return Path(spec.origin).parent / "chat_templates" / file
    return Path(__file__).parent / "templates" / file


def template_contract(tokenizer: Any, stop_token_ids: list[int], name: str | None = None) -> dict:
    """What a training stage records about its tokenizer and template (`name`: the recipe's named template)."""
    template = tokenizer.chat_template or ""
    return {
        "chat_template": template,
        "chat_template_name": name,
        "thinking": THINKING.get(name or ""),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token": tokenizer.pad_token,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": sorted(set(stop_token_ids)),
        "vocab_size": len(tokenizer),
    }


def training_contract(tokenizer: Any, section: ModelSection) -> dict:
    """The contract a training stage records: template, EOS/pad, the end-of-turn stops, and which named template
    (for Qwen3: thinking or not) trained."""
    stops = end_of_turn_ids(tokenizer, section.end_of_turn)
    return template_contract(tokenizer, stops, template_name(section.chat_template))


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
