"""The stage registry: a stage kind is a name mapped to its module (`Config` class and `run(ctx)`).

Stage modules import only pydantic at import time, so the registry is cheap to load.
"""

from finetune.stages import evaluate, export, merge, reward, sft

STAGES = {
    "sft": sft,
    "reward": reward,
    "evaluate": evaluate,
    "merge": merge,
    "export": export,
}
