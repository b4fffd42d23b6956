"""Reward models for Wenmai: one score head per reward dimension on a shared LoRA backbone.

- `reward.data`: preference records -> pairs (`ratings_to_pairs`, `tiers_to_pairs`, `split_transcript`) -> examples
- `reward.loss`: the masked per-dimension Bradley-Terry loss
- `reward.trainer`: TRL's RewardTrainer with that loss for several dimensions
- `reward.train`: the `reward` stage's work; `reward.model`: the saved reward model folder
- `reward.score`: `RewardScorer.from_stage(folder).score(prompts, responses)` for RLHF, evaluation and the CLI
"""
