"""The stage registry: a stage kind is a name mapped to its module (`Config` class and `run(ctx)`).

Stage modules import only pydantic at import time, so the registry is cheap to load.
"""

from finetune.stages import dpo, evaluate, export, kto, merge, orpo, reward, rlhf, sft

STAGES = {
    "sft": sft,
    "reward": reward,
    "dpo": dpo,
    "kto": kto,
    "orpo": orpo,
    "rlhf": rlhf,
    "evaluate": evaluate,
    "merge": merge,
    "export": export,
}
