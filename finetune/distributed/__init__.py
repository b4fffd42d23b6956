"""Scaling out: the recipe's `distributed` section on several GPUs and nodes.

- `config`: DeepSpeed / FSDP settings for the Trainer (through `finetune.training.build_training_args`).
- `memory`: the per-GPU memory estimate of a trainer stage; `hardware`: what this machine offers.
- `launch`: the torchrun command of `wenmai launch`.
- `ranks`: which process this is; rank 0 owns the run folder, the others wait.
The pre-flight that uses them is `finetune.checks.preflight`.
"""
