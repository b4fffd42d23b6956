"""The policy a preference or RL stage trains: loaded from the adapter its `policy:` names, saved as one adapter.

`load_policy` attaches the adapter of the stage named by `policy:` (trainable) to the base model, with the
tokenizer and template contract that stage trained with (checked against the run's first training stage),
or a fresh adapter on the base for `policy: base`. `save_policy` drops TRL's frozen reference copy and
saves the result like SFT does: `adapter/` (one complete adapter, the starting delta included),
`tokenizer/` and `template.json`, so `merge`, `evaluate` and `export` read it like any other stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.stages.base import StageContext

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the starting adapter


@dataclass
class Policy:
    """The model to train (a PeftModel whose `default` adapter trains), its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    contract: dict
    source: dict = field(default_factory=dict)  # for the summary and lineage: stage, adapter path, digest


def load_policy(ctx: StageContext) -> Policy:
    """The policy adapter of the stage named by `policy:` on the base model, trainable; or a new adapter (`base`)."""
    from transformers import set_seed

    from finetune import model as model_path
    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract
    from finetune.merging import trained_tokenizer

    recipe, config = ctx.recipe, ctx.config
    stage = ctx.input_stages.get("policy")
    source = model_path.resolve_source(recipe.model)
    set_seed(config.seed)  # a new adapter starts random, and dropout draws: same seed, same run
    if stage is None:  # policy: base
        tokenizer = model_path.load_tokenizer(recipe.model, source)
        model = model_path.attach_new_adapter(model_path.load_model(recipe.model, source), recipe.lora)
        return Policy(model, tokenizer, template_contract(tokenizer, end_of_turn_ids(tokenizer)), {"stage": "base"})
    produced = ctx.inputs["policy"]
    trained = trained_tokenizer(ctx.run_dir, recipe, produced, f"stage {config.stage_name} (policy: {stage})")
    adapter = Path(produced["adapter"])
    model = model_path.load_adapter(model_path.load_model(recipe.model, source), adapter, trainable=True)
    described = {"stage": stage, "adapter": relative_to_run(adapter, ctx.run_dir.root), "sha256": adapter_digest(adapter)}
    return Policy(model, trained.tokenizer, trained.contract, described)


def drop_fresh_reference(trainer: Any, policy: Policy) -> None:
    """For `policy: base`, remove the frozen copy TRL made of the new adapter: it is the base itself.

    A new LoRA adapter starts as a zero delta, so its copy scores exactly like the base; without the copy TRL
    switches the adapter off for the reference (the same numbers) and only one adapter sits on the base, as
    `adapters_on_base` tells the pre-flight. An adapter trained by an earlier stage keeps its copy.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if policy.source.get("stage") == "base" and REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)


def save_policy(trainer: Any, ctx: StageContext, policy: Policy) -> dict[str, str]:
    """Save the trained adapter (without TRL's reference copy), the tokenizer and the template contract; the outputs."""
    from finetune.training import save_adapter_stage

    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)  # PEFT would save it as a second adapter in a subfolder
    return save_adapter_stage(trainer, ctx.stage_dir, policy.tokenizer, policy.contract)


def adapter_digest(folder: Path) -> str | None:
    """sha256 of an adapter's weights file, so the lineage says exactly which adapter a stage started from."""
    from finetune.run_dir import sha256_file

    path = Path(folder) / "adapter_model.safetensors"
    return sha256_file(path) if path.is_file() else None


def relative_to_run(path: str | Path, root: Path) -> str:
    """`path` relative to the run folder (as the lineage lists outputs), or as given when outside it."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
