"""LoRA adapters a stage trains: the policy a preference or RL stage starts from, and saving any trained adapter.

`load_policy` attaches the adapter of the stage named by `policy:` (trainable) to the base model, with the
tokenizer and template contract that stage trained with (checked against the run's first training stage),
or a fresh adapter on the base for `policy: base`. `save_adapter_stage` is what every adapter-training
stage (sft, dpo, kto, orpo, rlhf) leaves: `adapter/` (one complete adapter, plain PEFT files), `tokenizer/`
and `template.json`, so `merge`, `evaluate` and `export` read them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import model as model_path
from finetune.data.template import trained_tokenizer, training_contract, write_contract
from finetune.distributed.ranks import barrier, is_main_process
from finetune.errors import WenmaiError
from finetune.recipe import Recipe
from finetune.run_dir import DATA_CARD_FILE, METRICS_FILE, REGISTER_FILE, RunDir, atomic_dir, sha256_file

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the starting adapter
ADAPTER_DIR = "adapter"
TOKENIZER_DIR = "tokenizer"
ADAPTER_STAGE_OUTPUTS = {
    "adapter": ADAPTER_DIR,
    "tokenizer": TOKENIZER_DIR,
    "template": "template.json",
    "metrics": METRICS_FILE,
    "data_card": DATA_CARD_FILE,
    "register": REGISTER_FILE,
}


@dataclass
class Policy:
    """The model to train (a PeftModel whose `default` adapter trains), its tokenizer, and where it came from."""

    model: Any
    tokenizer: Any
    contract: dict
    source: dict = field(default_factory=dict)  # for the summary and lineage: stage, adapter path, digest


def load_policy(
    recipe: Recipe, run_dir: RunDir, stage: str | None, produced: dict[str, str] | None, seed: int, where: str
) -> Policy:
    """The adapter `produced` by `stage` on the base model, trainable; or a new adapter on the base (`stage` None).

    `where` names the stage loading it in error messages.
    """
    from transformers import set_seed

    source = model_path.resolve_source(recipe.model)
    set_seed(seed)  # a new adapter starts random, and dropout draws: same seed, same run
    if stage is None:  # policy: base
        tokenizer = model_path.load_tokenizer(recipe.model, source)
        model = model_path.attach_new_adapter(model_path.load_model(recipe.model, source), recipe.lora)
        return Policy(model, tokenizer, training_contract(tokenizer, recipe.model), {"stage": "base"})
    trained = trained_tokenizer(run_dir, recipe, produced, f"{where} (policy: {stage})")
    adapter = Path(produced["adapter"])
    model = model_path.load_adapter(model_path.load_model(recipe.model, source), adapter, trainable=True)
    described = {"stage": stage, "adapter": run_dir.relative(adapter), "sha256": adapter_digest(adapter)}
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


def save_policy(trainer: Any, stage_dir: Path, policy: Policy) -> dict[str, str]:
    """Save the trained adapter (without TRL's reference copy), the tokenizer and the template contract; the outputs."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        model.delete_adapter(REFERENCE_ADAPTER)  # PEFT would save it as a second adapter in a subfolder
    return save_adapter_stage(trainer, stage_dir, policy.tokenizer, policy.contract)


def save_adapter_stage(trainer: Any, stage_dir: Path, tokenizer: Any, contract: dict) -> dict[str, str]:
    """What every adapter-training stage leaves: `adapter/`, `tokenizer/` and `template.json`; returns its outputs."""
    save_adapter(trainer, stage_dir / ADAPTER_DIR)  # every rank: ZeRO-3 / FSDP gather the shards
    if is_main_process():
        with atomic_dir(stage_dir / TOKENIZER_DIR) as tmp:
            tokenizer.save_pretrained(tmp)
        write_contract(contract, stage_dir)
    return dict(ADAPTER_STAGE_OUTPUTS)


def save_adapter(trainer: Any, folder: Path) -> None:
    """Save the trained adapter as plain PEFT files, loadable without DeepSpeed.

    Every process calls this: under ZeRO-3 or FSDP the Trainer gathers the adapter's shards from all of
    them. Only rank 0 writes, into a temporary folder renamed into place, after checking that the weights
    are really there (an ungathered ZeRO-3 save writes zero-sized tensors: DeepSpeed #7900).
    """
    if is_main_process():
        with atomic_dir(folder) as tmp:
            trainer.save_model(str(tmp))
            check_adapter_weights(tmp)
    else:
        trainer.save_model(str(folder))  # joins the gather; writes nothing off rank 0
    barrier()


def check_adapter_weights(folder: Path) -> int:
    """The number of weights in a saved adapter; an error if the file is missing or any tensor is empty."""
    from safetensors import safe_open

    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise WenmaiError(f"saving the adapter wrote no {path.name}; the adapter was not saved")
    total, empty = 0, []
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            size = f.get_slice(key).get_shape()
            count = 1
            for dim in size:
                count *= dim
            total += count
            if count == 0:
                empty.append(key)
    if empty or total == 0:
        raise WenmaiError(
            f"the saved adapter has {len(empty)} empty tensors (e.g. {empty[:1] or 'all'}): the weights were not gathered "
            "from the processes that hold them; with DeepSpeed ZeRO-3 set stage3_gather_16bit_weights_on_model_save: true"
        )
    return total


def adapter_digest(folder: Path) -> str | None:
    """sha256 of an adapter's weights file, so the lineage says exactly which adapter a stage started from."""
    path = Path(folder) / "adapter_model.safetensors"
    return sha256_file(path) if path.is_file() else None
