"""The multi-dimension Bradley-Terry loss: one term per labelled (pair, slot), nothing for unlabelled slots.

A slot is a dimension's head, or the weighted total (the weighted mean of the heads) when a pair judges
the answer as a whole. Like ArmoRM's per-attribute heads, a missing label is masked out, so a pair
labelled only for `safety` moves the `safety` head and the shared backbone, and no other head.
With one dimension and every pair labelled, this is exactly TRL's RewardTrainer loss (tested).
"""

from __future__ import annotations

from typing import Any


def slot_rewards(rewards: Any, weights: Any, n_slots: int) -> Any:
    """[batch, dimensions] rewards -> [batch, slots]: the heads, then the weighted total when there is a total slot."""
    import torch

    if n_slots == rewards.shape[-1]:
        return rewards
    total = rewards @ (weights / weights.sum()).to(rewards.dtype)
    return torch.cat([rewards, total.unsqueeze(-1)], dim=-1)


def preference_loss(
    rewards_a: Any, rewards_b: Any, preference: Any, margin: Any, weights: Any, center_coefficient: float | None = None
) -> Any:
    """Mean of -log σ(preference · (r_a - r_b) - margin) over labelled slots, plus optional reward centring.

    `preference` is +1 where `a` is better, -1 where `b` is, 0 where the pair has no label for that slot;
    centring adds `center_coefficient` · (r_a + r_b)² on the same labelled slots (TRL's, Eisenstein et al. 2023).
    """
    import torch
    from torch.nn.functional import logsigmoid

    slots_a = slot_rewards(rewards_a, weights, preference.shape[-1])
    slots_b = slot_rewards(rewards_b, weights, preference.shape[-1])
    labelled = preference != 0
    count = labelled.sum().clamp(min=1)
    terms = -logsigmoid(preference * (slots_a - slots_b) - margin)
    loss = torch.where(labelled, terms, torch.zeros_like(terms)).sum() / count
    if center_coefficient:
        squares = (slots_a + slots_b) ** 2
        loss = loss + center_coefficient * torch.where(labelled, squares, torch.zeros_like(squares)).sum() / count
    return loss


def pairwise_correct(rewards_a: Any, rewards_b: Any, preference: Any, weights: Any) -> tuple[Any, Any]:
    """Per slot: how many labelled pairs the rewards order correctly, and how many are labelled."""
    slots_a = slot_rewards(rewards_a, weights, preference.shape[-1])
    slots_b = slot_rewards(rewards_b, weights, preference.shape[-1])
    labelled = preference != 0
    correct = (preference * (slots_a - slots_b) > 0) & labelled
    return correct.sum(dim=0), labelled.sum(dim=0)
