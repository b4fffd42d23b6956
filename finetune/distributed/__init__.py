"""Scaling out: the recipe's `distributed` section on several GPUs and nodes.

- `config`: DeepSpeed / FSDP settings for the Trainer (through `finetune.training.build_training_args`).
- `preflight`: the compatibility check (recipe x installed versions x this machine) and its findings.
- `memory`: the per-GPU memory estimate of a trainer stage.
- `launch`: the torchrun command of `wenmai launch`.
- `ranks`: which process this is; rank 0 owns the run folder, the others wait.
"""
