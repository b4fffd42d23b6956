"""What can be evaluated: `base`, a model folder, a run folder, or one stage of a run (`RUN_DIR/<stage>`).

A target is resolved without loading weights; `load` then goes through `finetune.model`, the one
model-loading path: the base model of the recipe, plus the stage's adapter when it has one, with the
tokenizer (and chat template) that training saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import model as model_path
from finetune.config_io import load_run_recipe
from finetune.errors import WenmaiError
from finetune.recipe import ModelSection, Recipe
from finetune.run_dir import RECIPE_FILE, STATUS_FILE, RunDir

MODEL_OUTPUTS = ("model", "adapter")  # output kinds an evaluate stage can read


@dataclass
class Target:
    """A checkpoint to evaluate: a model section, optionally an adapter, and the tokenizer folder to use."""

    label: str
    section: ModelSection
    adapter: Path | None = None
    tokenizer_dir: Path | None = None
    source: dict = field(default_factory=dict)


def base_target(recipe: Recipe, label: str = "base") -> Target:
    """The recipe's base model, as the recipe loads it."""
    return Target(label, recipe.model, source={"kind": "base", "model": recipe.model.path})


def folder_target(
    path: Path, label: str | None = None, like: ModelSection | None = None, own_model: bool = False
) -> Target:
    """A plain `from_pretrained` folder (merged or exported model); dtype and attention as in `like`.

    `own_model`: the folder holds the model of `like` (a run's merged stage), so it also runs that model's code
    where `like` trusts it; any other folder never inherits `trust_remote_code` from a recipe."""
    path = Path(path).resolve()
    fields = {"dtype", "attention"} | ({"trust_remote_code"} if own_model else set())
    options = like.model_dump(include=fields) if like else {}
    section = ModelSection(path=str(path), **options)
    return Target(label or path.name, section, source={"kind": "model folder", "path": str(path)})


def stage_target(run_dir: RunDir, recipe: Recipe, stage: str, label: str | None = None) -> Target:
    """A finished stage's model: its `model` folder, or the base model plus its `adapter`."""
    status = run_dir.status(stage)
    if status is None or status.state != "done":
        state = status.state if status else "not run"
        raise WenmaiError(f"stage '{stage}' of {run_dir.root} is {state}; only a finished stage can be evaluated")
    outputs = {kind: run_dir.root / stage / rel for kind, rel in status.outputs.items()}
    label = label or f"{run_dir.name}/{stage}"
    if "model" in outputs:
        target = folder_target(outputs["model"], label, recipe.model, own_model=True)
        target.source.update(kind="stage model", run=str(run_dir.root), stage=stage)
        return target
    if "adapter" in outputs:
        return Target(
            label,
            recipe.model,
            adapter=outputs["adapter"],
            tokenizer_dir=_training_tokenizer(run_dir, recipe, stage),
            source={"kind": "adapter", "run": str(run_dir.root), "stage": stage, "model": recipe.model.path},
        )
    raise WenmaiError(
        f"stage '{stage}' produced no model or adapter to evaluate (it has: {', '.join(outputs) or 'nothing'})"
    )


def parse_target(spec: str, run: RunDir | None = None, recipe: Recipe | None = None) -> Target:
    """`base`, a stage name of `run`, a run folder, `RUN_DIR/<stage>`, or a model folder."""
    path = Path(spec).expanduser()
    if spec == "base":
        if recipe is None:
            raise WenmaiError("'base' needs a recipe: give a run folder as well, or --recipe FILE")
        return base_target(recipe)
    if (path / RECIPE_FILE).is_file():
        folder = RunDir.open(path)
        return stage_target(folder, run_recipe(folder), last_model_stage(folder))
    if (path / STATUS_FILE).is_file() and (path.parent / RECIPE_FILE).is_file():
        folder = RunDir.open(path.parent)
        return stage_target(folder, run_recipe(folder), path.name)
    if (path / "config.json").is_file():
        return folder_target(path, like=recipe.model if recipe else None)
    if run is not None and "/" not in spec and (run.root / spec / STATUS_FILE).is_file():
        return stage_target(run, recipe or run_recipe(run), spec)
    raise WenmaiError(
        f"cannot evaluate {spec!r}: give `base`, a run folder, RUN_DIR/<stage>, a stage name of the run, "
        "or a model folder (with config.json)"
    )


def run_recipe(run_dir: RunDir) -> Recipe:
    """The resolved recipe a run was started with."""
    return load_run_recipe(run_dir).recipe


def last_model_stage(run_dir: RunDir) -> str:
    """The last finished stage of a run that produced a model or an adapter."""
    recipe = run_recipe(run_dir)
    found = None
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        if status is not None and status.state == "done" and set(MODEL_OUTPUTS) & set(status.outputs):
            found = config.stage_name
    if found is None:
        raise WenmaiError(
            f"{run_dir.root} has no finished stage with a model or adapter; evaluate `base` or finish the run"
        )
    return found


def load(target: Target) -> tuple[Any, Any]:
    """The model (in eval mode, adapter folded in when the base is not quantized) and its tokenizer."""

    source = model_path.resolve_source(target.section)
    tokenizer_source = model_path.ModelSource(str(target.tokenizer_dir), True) if target.tokenizer_dir else source
    tokenizer = model_path.load_tokenizer(target.section, tokenizer_source)
    model = model_path.load_model(target.section, source)
    if target.adapter is not None:
        model = model_path.load_adapter(model, target.adapter, trainable=False)
        if target.section.quantization == "none":
            model = model.merge_and_unload()  # same outputs, faster inference
    return model.eval(), tokenizer


def _training_tokenizer(run_dir: RunDir, recipe: Recipe, stage: str) -> Path | None:
    """The tokenizer folder that the stage, or else the first training stage before it, saved."""
    names = [c.stage_name for c in recipe.stage_configs()]
    candidates = [stage] + names[: names.index(stage)] if stage in names else [stage]
    for name in candidates:
        status = run_dir.status(name)
        if status is not None and status.state == "done" and "tokenizer" in status.outputs:
            return run_dir.root / name / status.outputs["tokenizer"]
    return None
