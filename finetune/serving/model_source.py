"""What `wenmai serve` serves: an export folder, or a run folder (one of its stages), loaded once.

An export is loaded by `finetune.generate.ExportedModel` (its tokenizer checked against `template.json`); a run
folder goes through `finetune.evaluation.targets` (the one model-loading path: base + the stage's adapter), and
its tokenizer is checked against the template contract its first training stage recorded. Either way the
server gets the model, a verified tokenizer, the stop ids training used and the provenance block for the
implicit label.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data.template import trained_tokenizer, verify_contract
from finetune.errors import WenmaiError
from finetune.evaluation import targets
from finetune.generate import ExportedModel, find_export
from finetune.run_dir import RECIPE_FILE, RunDir
from finetune.stages.export import provenance_block


@dataclass
class ServedModel:
    """A loaded model with everything the server needs to render prompts, stop, and label answers."""

    model_id: str
    model: Any
    tokenizer: Any
    contract: dict
    stop_ids: list[int]
    provenance: dict
    context_length: int
    source: str

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The conversation rendered with the model's own chat template, ready for the assistant's turn."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def load_model_source(source: str | Path, adapter_stage: str | None = None, model_id: str | None = None) -> ServedModel:
    """An export folder (or a run with an `export` stage), or a run folder: its last model stage or `adapter_stage`."""
    path = Path(source).expanduser()
    if adapter_stage is None:
        try:
            folder = find_export(path)
        except WenmaiError:
            folder = None
        if folder is not None:
            return _from_export(folder, model_id)
    if adapter_stage is None and not (path / RECIPE_FILE).is_file():
        raise WenmaiError(
            f"{path} is neither a Wenmai export (config.json with template.json) nor a run folder (with "
            f"{RECIPE_FILE}); give the folder `wenmai export` wrote, or a run folder"
        )
    return _from_run(RunDir.open(path), adapter_stage, model_id)


def _from_export(folder: Path, model_id: str | None) -> ServedModel:
    exported = ExportedModel(folder)
    run_id = exported.provenance.get("run_id")
    return ServedModel(
        model_id=model_id or run_id or folder.name,
        model=exported.model,
        tokenizer=exported.tokenizer,
        contract=exported.contract,
        stop_ids=list(exported.stop_ids),
        provenance=exported.provenance,
        context_length=_context_length(exported.model),
        source=str(folder),
    )


def _from_run(run_dir: RunDir, adapter_stage: str | None, model_id: str | None) -> ServedModel:
    if adapter_stage is not None and ("/" in adapter_stage or run_dir.status(adapter_stage) is None):
        stages = ", ".join(c.stage_name for c in targets.run_recipe(run_dir).stage_configs())
        raise WenmaiError(f"--adapter {adapter_stage}: {run_dir.root} has no such stage (its stages: {stages})")
    target = (
        targets.parse_target(adapter_stage, run=run_dir) if adapter_stage else targets.parse_target(str(run_dir.root))
    )
    recipe = targets.run_recipe(run_dir)
    stage = target.source.get("stage")
    if not stage:
        raise WenmaiError(f"{run_dir.root}: {adapter_stage!r} is not a finished stage with a model or an adapter")
    trained = trained_tokenizer(run_dir, recipe, run_dir.outputs(stage), f"serve {run_dir.name}/{stage}")
    model, tokenizer = targets.load(target)
    verify_contract(tokenizer, trained.contract, f"serve {run_dir.name}/{stage}")
    producer = None
    provenance_file = run_dir.root / "export" / "model" / "wenmai_provenance.json"
    if provenance_file.is_file():  # the producer an export named, when the run has one
        producer = json.loads(provenance_file.read_text(encoding="utf-8")).get("producer", {}).get("organisation")
    return ServedModel(
        model_id=model_id or target.label,
        model=model,
        tokenizer=tokenizer,
        contract=trained.contract,
        stop_ids=list(trained.contract["stop_token_ids"]),
        provenance=provenance_block(run_dir, recipe, stage, producer),
        context_length=_context_length(model),
        source=f"{run_dir.root}/{stage}",
    )


def _context_length(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    length = getattr(config, "max_position_embeddings", None)
    if not length:
        raise WenmaiError(f"{type(model).__name__}: its config names no max_position_embeddings (context length)")
    return int(length)
