"""The reward model on disk: one folder holding everything needed to score without the recipe or run.

```
reward_model/
  adapter/            PEFT adapter (task SEQ_CLS) with the score head (`modules_to_save`)
  tokenizer/          the tokenizer and chat template it was trained with (its own pad token, see below)
  template.json       the template contract
  reward_model.json   dimensions and weights, the base model section, seq_len, pad token
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from finetune import model as model_path
from finetune.adapters import save_adapter
from finetune.data.template import read_contract, verify_contract, write_contract
from finetune.distributed.ranks import is_main_process
from finetune.errors import WenmaiError
from finetune.recipe import ModelSection, RewardDimension
from finetune.run_dir import STATUS_FILE, RunDir, atomic_dir, atomic_write_text

CARD_FILE = "reward_model.json"
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


class RewardModelCard(BaseModel):
    """`reward_model.json`: what a scorer needs besides the weights."""

    format_version: int = FORMAT_VERSION
    dimensions: list[RewardDimension] = Field(
        ..., description="Heads in output order, with their weights in the total."
    )
    base_model: dict[str, Any] = Field(..., description="The recipe's `model` section the adapter was trained on.")
    seq_len: int = Field(..., description="Longest sequence; longer inputs keep their end (the response).")
    pad_token: str
    pad_token_id: int
    recipe: str = ""
    stage: str = ""

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dimensions]


def choose_pad_token(tokenizer: Any, end_ids: list[int]) -> None:
    """Give the tokenizer a pad token that is not an end-of-turn token.

    A sequence-classification model reads the score at the last token that is not `pad_token_id`; every
    reward input ends with the end-of-turn token, so if pad were that token (SmolLM2: pad = eos =
    <|im_end|>) the score would be read one token early. Prefer unk, then other special tokens.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in end_ids:
        return
    special = [i for i, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special]
    for token_id in [tokenizer.unk_token_id, tokenizer.bos_token_id, *special]:
        if token_id is not None and token_id not in end_ids:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(token_id)
            return
    raise WenmaiError(
        "the tokenizer has no special token besides its end-of-turn token to pad reward inputs with; "
        "use a tokenizer with an unk, bos or <|endoftext|> token"
    )


def save_reward_model(folder: Path, trainer: Any, tokenizer: Any, card: RewardModelCard, contract: dict) -> None:
    """Write the reward model folder; each part atomically, `reward_model.json` last (a folder with it is complete).

    Every process calls this (under ZeRO-3 / FSDP saving gathers the shards); rank 0 alone writes.
    """

    folder = Path(folder)
    if is_main_process():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CARD_FILE).unlink(missing_ok=True)  # a rerun's folder is incomplete until the new card is written
    save_adapter(trainer, folder / ADAPTER_DIR)  # the score head rides along (PEFT modules_to_save)
    if is_main_process():
        with atomic_dir(folder / TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(tmp)
        write_contract(contract, folder)
        atomic_write_text(folder / CARD_FILE, card.model_dump_json(indent=2))


def load_reward_model(folder: Path) -> tuple[Any, Any, RewardModelCard]:
    """(model in eval mode, tokenizer, card) from a reward model folder alone."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    card = read_card(folder)
    section = ModelSection.model_validate(card.base_model)
    source = model_path.resolve_source(section)
    base = model_path.load_model(
        section, source, task="sequence-classification", num_labels=len(card.dimensions), pad_token_id=card.pad_token_id
    )
    model = model_path.load_adapter(base, folder / ADAPTER_DIR, trainable=False).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / TOKENIZER_DIR)
    verify_contract(tokenizer, read_contract(folder), f"reward model {folder}")
    return model, tokenizer, card


def read_card(folder: Path) -> RewardModelCard:
    path = Path(folder) / CARD_FILE
    try:
        return RewardModelCard.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WenmaiError(
            f"{path}: cannot read the reward model description ({err}); is {folder} a reward model folder?"
        ) from None


def find_reward_model(path: str | Path, stage: str | None = None) -> Path:
    """The reward model folder from itself, its stage folder, or a run folder (and the stage name if it has several)."""

    path = Path(path)
    if (path / CARD_FILE).is_file():
        return path
    if (path / STATUS_FILE).is_file():
        return RunDir(path.parent).output(path.name, "reward_model")
    run_dir = RunDir.open(path)
    reward_stages = [
        p.parent.name
        for p in sorted(path.glob("*/status.json"))
        if json.loads(p.read_text(encoding="utf-8")).get("kind") == "reward"
    ]
    if stage is not None:
        if stage not in reward_stages:
            raise WenmaiError(
                f"{path} has no reward stage named {stage!r} (reward stages: {', '.join(reward_stages) or 'none'})"
            )
        return run_dir.output(stage, "reward_model")
    if not reward_stages:
        raise WenmaiError(f"{path} has no reward stage; train one with a `- reward:` stage in the recipe")
    if len(reward_stages) > 1:
        raise WenmaiError(f"{path} has several reward stages ({', '.join(reward_stages)}); choose one with --stage")
    return run_dir.output(reward_stages[0], "reward_model")
