"""Chat templates: named templates, and the template contract recorded at training time.

The first training stage writes `template.json` (template text, EOS/pad ids, stop ids); every later
stage and the export compare the tokenizer they load against it, so a model never ships with a
template or EOS different from the one it learned.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from finetune.errors import WenmaiError

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
    from finetune.run_dir import atomic_write_text

    atomic_write_text(folder / CONTRACT_FILE, json.dumps(contract, indent=2, ensure_ascii=False))


def read_contract(folder: Path) -> dict:
    path = folder / CONTRACT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise WenmaiError(f"{path}: cannot read the template contract ({err}); the training stage's folder is incomplete") from None


def verify_contract(tokenizer: Any, contract: dict, where: str) -> None:
    """Raise if `tokenizer` differs from what training recorded (template text, EOS, pad, vocabulary)."""
    current = template_contract(tokenizer, contract.get("stop_token_ids", []))
    keys = ("chat_template_sha256", "eos_token", "eos_token_id", "pad_token_id", "vocab_size")
    drift = [f"{k}: trained with {contract.get(k)!r}, found {current[k]!r}" for k in keys if contract.get(k) != current[k]]
    if drift:
        raise WenmaiError(
            f"template contract broken at {where}: the tokenizer differs from the one training used\n  - "
            + "\n  - ".join(drift)
            + "\nRestore the tokenizer files saved by the training stage (its tokenizer/ folder); "
            "a model used with another template or EOS answers badly or never stops."
        )
