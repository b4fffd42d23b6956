"""Reward models for Wenmai: one score head per reward dimension on a shared LoRA backbone.

- `reward.data`: preference pairs (`finetune.data.pairs`) -> training examples with a label per head
- `reward.loss`: the masked per-dimension Bradley-Terry loss
- `reward.trainer`: TRL's RewardTrainer with that loss for several dimensions
- `reward.model`: the saved reward model folder; `reward.rules`: rule rewards for the `rlhf` stage
- `reward.score`: `RewardScorer.from_stage(folder).score(prompts, responses)` for RLHF, evaluation and the CLI
The `reward` stage that trains one is `finetune/stages/reward.py`; this package imports no stage.
"""
