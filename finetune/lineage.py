"""`lineage.json`: what went into a run (recipe, model, data files, package versions, code) and what each stage made."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from pydantic import BaseModel, Field

import finetune
from finetune.model import resolve_source
from finetune.recipe import DatasetSection, Recipe, used_datasets
from finetune.run_dir import RunDir, atomic_write_json, sha256_file, utc_now

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
    "liger-kernel",
)


class StageLineage(BaseModel):
    name: str
    kind: str
    state: str
    inputs: dict[str, str] = Field(default_factory=dict)  # input field -> stage name
    outputs: dict[str, str] = Field(default_factory=dict)  # output kind -> path relative to the run folder
    started: str | None = None
    finished: str | None = None
    gate: dict | None = None  # an evaluate stage's gate: passed, forced (wenmai run --force), failed gates
    used: dict | None = None  # what a stage started from: the policy adapter (path, sha256), the reward model


class Lineage(BaseModel):
    """What went into a run and what each stage made of it."""

    run: str
    recipe: str
    created: str
    updated: str
    wenmai_version: str
    git_commit: str | None
    packages: dict[str, str]
    model: dict
    data: dict[str, dict]
    stages: list[StageLineage]
    round: dict | None = None  # a `wenmai iterate` round: its parent run, number and feedback


def write_lineage(recipe: Recipe, run_dir: RunDir) -> None:
    """(Re)write lineage.json from the recipe, the input files, and every stage's status."""
    previous = {}
    if run_dir.lineage_path.is_file():
        previous = Lineage.model_validate_json(run_dir.lineage_path.read_text(encoding="utf-8")).model_dump()
    stages = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        stages.append(
            StageLineage(
                name=config.stage_name,
                kind=config.kind,
                state=status.state if status else "pending",
                inputs=status.inputs if status else {},
                outputs={k: f"{config.stage_name}/{v}" for k, v in (status.outputs if status else {}).items()},
                started=status.started if status else None,
                finished=status.finished if status else None,
                gate=status.summary.get("gate") if status else None,
                used=status.summary.get("used") if status else None,
            )
        )
    lineage = Lineage(
        run=run_dir.name,
        recipe=recipe.name,
        created=previous.get("created") or utc_now(),
        updated=utc_now(),
        wenmai_version=finetune.__version__,
        git_commit=previous.get("git_commit") or _git_commit(),
        packages=previous.get("packages") or _package_versions(),
        model=previous.get("model") or _model_lineage(recipe),
        data=previous.get("data") or {name: _dataset_lineage(recipe.data[name]) for name in used_datasets(recipe)},
        stages=stages,
        round=recipe.round.model_dump() if recipe.round is not None else None,
    )
    atomic_write_json(run_dir.lineage_path, lineage.model_dump())


def _model_lineage(recipe: Recipe) -> dict:
    info = {
        "path": recipe.model.path,
        "revision": recipe.model.revision,
        "dtype": recipe.model.dtype,
        "quantization": recipe.model.quantization,
    }
    source = resolve_source(recipe.model, convert=False)
    info.update(source.describe())
    if source.gguf_path is not None:
        info["gguf_sha256"] = sha256_file(source.gguf_path)
    return info


def _dataset_lineage(section: DatasetSection) -> dict:
    if section.format == "review":  # the store changes as reviews arrive: the data card counts what was read
        return {
            "review": section.location,
            "session": section.session,
            "format": section.record_format,
            "as_of": section.as_of.isoformat() if section.as_of else None,
        }
    path = Path(section.path)
    return {"path": str(path), "format": section.format, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
