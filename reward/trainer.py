"""TRL's RewardTrainer with a reward head per dimension.

One dimension: TRL's own loss (Bradley-Terry, optional margin and centring), untouched. Several: TRL's
trainer (data collation, dropout, pad token, logging, checkpoints) with our masked per-slot loss from
`reward.loss`. Both count exact pairwise accuracy per slot, logged as `accuracy_<slot>` during training
and `eval_accuracy_<slot>` over the whole held-out set at each evaluation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from trl import RewardTrainer
from trl.trainer.reward_trainer import DataCollatorForPreference

from reward.loss import pairwise_correct, preference_loss


@dataclass
class PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator (chosen rows, then rejected rows, right-padded), plus per-slot `preference` labels."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = super().torch_call(examples)
        if "preference" in examples[0]:
            batch["preference"] = torch.tensor([e["preference"] for e in examples], dtype=torch.float)
        return batch


class DimensionRewardTrainer(RewardTrainer):
    """RewardTrainer whose model has one output per dimension; `slots` names the labels, `weights` make the total."""

    def __init__(self, *args: Any, slots: list[str], weights: list[float], **kwargs: Any):
        self.slots = list(slots)
        self.total_weights = torch.tensor(weights, dtype=torch.float)
        self._pair_counts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with _shown_to_trl_as_one_label(kwargs["model"]):
            super().__init__(*args, **kwargs)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if "preference" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "preference"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        preference = inputs.pop("preference", None)
        if preference is None:  # one dimension, every pair labelled: TRL's loss as it is
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True)
            rewards_a, rewards_b = outputs.logits.chunk(2)
            preference = torch.ones_like(rewards_a)
        else:
            margin = inputs.pop("margin")
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards_a, rewards_b = outputs.logits.chunk(2)
            weights = self.total_weights.to(rewards_a.device)
            loss = preference_loss(
                rewards_a, rewards_b, preference, margin, weights, self.args.center_rewards_coefficient
            )
            self._record_rewards(outputs.logits)
        self._count_correct(rewards_a.detach(), rewards_b.detach(), preference)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        counts = self._pair_counts.pop(mode, None)
        if counts is not None:
            prefix = "eval_" if mode == "eval" else ""
            for slot, correct, labelled in zip(self.slots, *counts, strict=True):
                if labelled > 0:
                    logs[f"{prefix}accuracy_{slot}"] = round(correct.item() / labelled.item(), 4)
        super().log(logs, start_time)

    def _count_correct(self, rewards_a: torch.Tensor, rewards_b: torch.Tensor, preference: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        weights = self.total_weights.to(rewards_a.device)
        correct, labelled = pairwise_correct(rewards_a.float(), rewards_b.float(), preference, weights)
        correct = self.accelerator.reduce(correct, reduction="sum").cpu()
        labelled = self.accelerator.reduce(labelled, reduction="sum").cpu()
        if mode in self._pair_counts:
            correct, labelled = correct + self._pair_counts[mode][0], labelled + self._pair_counts[mode][1]
        self._pair_counts[mode] = (correct, labelled)

    def _record_rewards(self, rewards: torch.Tensor) -> None:
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            gathered = self.accelerator.gather_for_metrics(rewards.detach().float())
            self._metrics[mode]["mean_reward"].append(gathered.mean().item())
            self._metrics[mode]["min_reward"].append(gathered.min().item())
            self._metrics[mode]["max_reward"].append(gathered.max().item())


@contextlib.contextmanager
def _shown_to_trl_as_one_label(model: Any) -> Iterator[None]:
    """TRL refuses a model whose config has num_labels != 1; our loss handles several, so show it one while TRL checks."""
    config = model.config
    if config.num_labels == 1:
        yield
        return
    saved = dict(config.id2label), dict(config.label2id)
    config.num_labels = 1
    try:
        yield
    finally:
        config.id2label, config.label2id = saved
