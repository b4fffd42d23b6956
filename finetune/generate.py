"""Talking to an exported model with its own chat template: `wenmai chat EXPORT_DIR`.

The export's tokenizer is checked against its `template.json` on load (the template contract), generation
stops at every stop id training used, and a reply can carry the AI-generated-content implicit label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.template import read_contract, verify_contract
from finetune.errors import WenmaiError
from finetune.model_card import EXPLICIT_LABEL, PROVENANCE_FILE, implicit_label


@dataclass
class Reply:
    """One generated answer: its text, whether it ended at a stop token or was cut at the token limit, and its
    label metadata if asked."""

    text: str
    token_ids: list[int]
    stopped: bool
    metadata: dict | None = None
    hit_max_new_tokens: bool = False

    def to_json(self) -> dict:

        out: dict[str, Any] = {
            "role": "assistant",
            "content": self.text,
            "stopped_at_eos": self.stopped,
            "hit_max_new_tokens": self.hit_max_new_tokens,
        }
        if self.metadata is not None:
            out["explicit_label"] = EXPLICIT_LABEL
            out["metadata"] = self.metadata
        return out


class ExportedModel:
    """An export folder loaded for chat: model, verified tokenizer, stop ids and provenance."""

    def __init__(self, export_dir: str | Path, gguf_file: str | None = None):
        from transformers import AutoModelForCausalLM

        self.folder, self.tokenizer, self.contract = export_tokenizer(export_dir, "load of")
        if gguf_file is not None and not (self.folder / gguf_file).is_file():
            found = ", ".join(p.name for p in self.folder.glob("*.gguf")) or "none"
            raise WenmaiError(f"--gguf: {gguf_file} is not in {self.folder} (GGUF files there: {found})")
        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(self.folder), **kwargs).eval()
        self.stop_ids = list(self.contract["stop_token_ids"])
        provenance_file = self.folder / PROVENANCE_FILE
        self.provenance = json.loads(provenance_file.read_text(encoding="utf-8")) if provenance_file.is_file() else {}

    def reply(
        self, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0, label: bool = False
    ) -> Reply:
        """The model's next assistant turn for `messages`, rendered with the training chat template."""
        import torch

        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stop_ids,
                pad_token_id=self.contract["pad_token_id"],
                **sampling,
            )
        new = out[0, ids.shape[1] :].tolist()
        stopped = bool(new) and new[-1] in self.stop_ids
        cut = not stopped and len(new) >= max_new_tokens
        answer = self.tokenizer.decode(new[:-1] if stopped else new, skip_special_tokens=True)
        if cut:  # the limit can fall inside a character: its first bytes decode to U+FFFD; leave them out
            answer = answer.rstrip("\ufffd")
        answer = answer.strip()
        return Reply(answer, new, stopped, implicit_label(answer, self.provenance) if label else None, cut)


def export_tokenizer(export_dir: str | Path, purpose: str) -> tuple[Path, Any, dict]:
    """An export's folder, its tokenizer checked against the template contract training recorded (errors name
    `purpose` and the folder), and the contract."""
    from transformers import AutoTokenizer

    folder = find_export(Path(export_dir))
    contract = read_contract(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    verify_contract(tokenizer, contract, f"{purpose} {folder}")
    return folder, tokenizer, contract


def find_export(path: Path) -> Path:
    """The export folder itself, given it, its stage folder, or a run folder with an `export` stage."""
    for candidate in (path, path / "model", path / "export" / "model"):
        if (candidate / "config.json").is_file() and (candidate / "template.json").is_file():
            return candidate
    raise WenmaiError(
        f"{path} is not a Wenmai export (no config.json with template.json); give the folder that "
        "`wenmai export` wrote (runs/<run>/export/model)"
    )
