"""Running a recipe: pre-flight, the run folder, each stage in order, resume, and lineage."""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import subprocess
from collections.abc import Callable, Collection
from pathlib import Path

from pydantic import BaseModel, Field

import finetune
from finetune.config_io import LoadedRecipe, load_recipe, load_resolved
from finetune.distributed.config import stage_scope
from finetune.distributed.ranks import Ranks, barrier, connect, is_main_process, main_only
from finetune.errors import ConfigError, Problem, WenmaiError
from finetune.recipe import Recipe, wiring
from finetune.run_dir import (
    RunDir,
    StageStatus,
    atomic_write_json,
    atomic_write_text,
    sha256_file,
    truncate_metrics,
    utc_now,
)
from finetune.stages import STAGES
from finetune.stages.base import StageContext

Log = Callable[[str], None]
TRACKED_PACKAGES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "deepspeed", "liger-kernel")


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


def preflight(recipe: Recipe, world_size: int = 1, distributed: bool = True) -> list[str]:
    """Problems that stop a run before anything heavy: hardware for the model, missing dashboard packages,
    and (with `distributed`) the errors of the compatibility check: recipe x installed versions x this machine."""
    from finetune.distributed.preflight import check
    from finetune.model import check_hardware, resolve_source
    from finetune.speed import machine_problems_here as speed_machine_problems
    from finetune.tracking import check_backends

    problems = check_hardware(recipe.model) + check_backends(recipe.tracking) + speed_machine_problems(recipe)
    problems += [p for c in recipe.stage_configs() for p in (c.machine_problems() if hasattr(c, "machine_problems") else [])]
    try:
        resolve_source(recipe.model, convert=False)
    except WenmaiError as err:
        problems.append(str(err))
    if distributed:
        problems += [str(f) for f in check(recipe, world_size).blocking()]
    return problems


def check_data(recipe: Recipe) -> dict[str, dict]:
    """Read and validate every dataset a stage uses; returns per-dataset counts. Raises on bad data."""
    from finetune.data import load_records

    counts = {}
    for name in used_datasets(recipe):
        records = load_records(recipe, name)
        counts[name] = {"records": len(records.records), "skipped": len(records.skipped),
                        "report": getattr(records, "report", None)}  # what the data layer kept out, and why
    return counts


def used_datasets(recipe: Recipe) -> list[str]:
    names: list[str] = []
    for config in recipe.stage_configs():
        for field_name, info in type(config).model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            value = getattr(config, field_name)
            if "dataset" in extra and value and value not in names:
                names.append(value)
    return names


def start(loaded: LoadedRecipe, run_dir_path: str | Path | None = None, log: Log = print, force: bool = False) -> RunDir:
    """Check everything that can fail early, create the run folder, and run every stage."""
    recipe = loaded.recipe
    ranks = connect(recipe.distributed)  # several processes (wenmai launch): join them first
    log = main_only(log)
    problems = preflight(recipe, ranks.world_size)
    if problems:
        raise WenmaiError("pre-flight found problems:\n  - " + "\n  - ".join(problems))
    check_data(recipe)
    if ranks.world_size > 1 and run_dir_path is None:
        raise WenmaiError("a run with several processes needs the same --run-dir on every process; start it with `wenmai launch`")
    _convert_once_per_node(recipe, ranks)
    if ranks.is_main:  # rank 0 owns the run folder; the others wait until it exists
        run_dir = RunDir.create(recipe.output.root, recipe.name, run_dir_path)
        atomic_write_text(run_dir.recipe_path, loaded.to_yaml())
        log(f"run folder: {run_dir.root}")
    barrier()
    if not ranks.is_main:
        run_dir = RunDir.open(run_dir_path)
    return run_stages(recipe, run_dir, log, force)


def resume(run_dir_path: str | Path, recipe_path: str | Path | None = None, overrides: tuple[str, ...] = (), log: Log = print,
           force: bool = False) -> RunDir:
    """Continue a run: finished stages are skipped, an interrupted one restarts from its last checkpoint."""
    run_dir = RunDir.open(run_dir_path)
    stored = load_resolved(run_dir.recipe_path.read_text(encoding="utf-8"), run_dir.recipe_path)
    if overrides and recipe_path is None:
        raise WenmaiError("--set cannot change a run being resumed; start a new run to change settings")
    if recipe_path is not None:
        given = load_recipe(recipe_path, overrides)
        differences = _differences(stored.recipe.model_dump(mode="json"), given.recipe.model_dump(mode="json"))
        if differences:
            raise ConfigError(
                [Problem(path, "differs from the run being resumed") for path in differences[:20]],
                f"{recipe_path} is not the recipe {run_dir.root} was started with; resume with `wenmai run --resume "
                f"{run_dir.root}` alone, or start a new run",
            )
    ranks = connect(stored.recipe.distributed)
    log = main_only(log)
    problems = preflight(stored.recipe, ranks.world_size)
    if problems:
        raise WenmaiError("pre-flight found problems:\n  - " + "\n  - ".join(problems))
    _convert_once_per_node(stored.recipe, ranks)
    log(f"resuming {run_dir.root}")
    return run_stages(stored.recipe, run_dir, log, force)


def _convert_once_per_node(recipe: Recipe, ranks: Ranks) -> None:
    """A GGUF model is converted into the node's cache by one process while the others wait."""
    if recipe.model.gguf_file and ranks.world_size > 1:
        from finetune.model import resolve_source

        if ranks.local_rank == 0:
            resolve_source(recipe.model)
        barrier()


def run_stages(recipe: Recipe, run_dir: RunDir, log: Log = print, force: bool = False,
               only: Collection[str] | None = None) -> RunDir:
    """Run each stage not yet done (of `only`, when given), in order; write its status last, then the lineage;
    then the report.

    `force` lets the stages after a failing evaluate gate run (the gate records that it was forced).
    """
    resolved_inputs, problems = wiring(recipe)
    if problems:
        raise ConfigError(problems)
    main = is_main_process()  # only rank 0 writes statuses, metrics, lineage and the report; every rank trains
    if main:
        write_lineage(recipe, run_dir)
    try:
        _run_each(recipe, run_dir, resolved_inputs, log, force, main, only)
    finally:
        if main:
            _write_report(run_dir, log)
    return run_dir


def _run_each(recipe: Recipe, run_dir: RunDir, resolved_inputs: dict, log: Log, force: bool, main: bool,
              only: Collection[str] | None = None) -> None:
    from finetune.tracking import backend_env, dashboard_env

    configs = recipe.stage_configs()
    for number, config in enumerate(configs, start=1):
        name = config.stage_name
        if only is not None and name not in only:
            continue
        previous = run_dir.status(name)
        if previous is not None and previous.state == "done":
            log(f"[{number}/{len(configs)}] {name}: done already, skipped")
            continue
        checkpoint = run_dir.latest_checkpoint(name) if previous is not None else None
        inputs = {field: stage for field, stage in resolved_inputs[name].items()}
        status = StageStatus(
            name=name, kind=config.kind, state="running", started=utc_now(), inputs=inputs,
            attempts=(previous.attempts + 1) if previous else 1,
        )
        barrier()  # every rank has read the previous state before rank 0 rewrites it
        if main:
            metrics = run_dir.metrics_path(name)
            if checkpoint is not None:
                truncate_metrics(metrics, int(checkpoint.name.rsplit("-", 1)[-1]))
            else:
                metrics.unlink(missing_ok=True)
            run_dir.write_status(status)
        barrier()  # the stage folder exists before any rank uses it
        if checkpoint is not None:
            log(f"[{number}/{len(configs)}] {name}: resuming from {checkpoint.name}")
        else:
            log(f"[{number}/{len(configs)}] {name} ({config.kind})")
        ctx = StageContext(
            recipe=recipe,
            config=config,
            run_dir=run_dir,
            inputs={field: _outputs(run_dir, stage) for field, stage in inputs.items()},
            input_stages=inputs,
            resume_from=checkpoint,
            extra={"force": force},
        )
        run_name = recipe.tracking.run_name or run_dir.name
        try:
            with dashboard_env(backend_env(recipe.tracking, run_dir.root, name, run_name)), \
                    stage_scope(recipe, config, ctx.stage_dir, run_dir.name):
                result = STAGES[config.kind].run(ctx)
        except BaseException as err:
            if main:
                status.state, status.finished = "failed", utc_now()
                status.error = f"{type(err).__name__}: {err}"[:2000]
                run_dir.write_status(status)
                write_lineage(recipe, run_dir)
            raise
        finally:
            release_memory()  # the stage's models are gone; give their memory back before the next stage
        if main:
            status.state, status.finished = "done", utc_now()
            status.outputs, status.summary = result.outputs, result.summary
            run_dir.write_status(status)
            write_lineage(recipe, run_dir)
        barrier()  # the next stage reads this one's status.json
        log(f"[{number}/{len(configs)}] {name}: done")


def release_memory() -> None:
    """Give a finished stage's memory back before the next stage loads its models.

    The stages keep no references to their models, but the allocators do keep the freed memory: the
    accelerator's caching allocator (emptied by accelerate) and glibc's malloc arenas on Linux, which held
    ~1.2 GB of a finished quickstart SFT stage until `malloc_trim` (measured: 1.85 GB -> 0.63 GB RSS).
    """
    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        return libc if hasattr(libc, "malloc_trim") else None  # musl, macOS: no malloc_trim
    except OSError:
        return None


def _write_report(run_dir: RunDir, log: Log) -> None:
    """The HTML run report, after every run (finished or stopped); a report problem never hides the run's own error."""
    from finetune.report import write_report

    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as err:  # the report is a view: the run's own outcome stands
        log(f"report not written ({type(err).__name__}: {err}); retry with `wenmai report {run_dir.root}`")


def _outputs(run_dir: RunDir, stage: str) -> dict[str, str]:
    status = run_dir.status(stage)
    if status is None or status.state != "done":
        raise WenmaiError(f"stage '{stage}' has not finished, so later stages cannot read its outputs")
    return {kind: str(run_dir.root / stage / rel) for kind, rel in status.outputs.items()}


def write_lineage(recipe: Recipe, run_dir: RunDir) -> None:
    """(Re)write lineage.json from the recipe, the input files, and every stage's status."""
    previous = {}
    if run_dir.lineage_path.is_file():
        previous = Lineage.model_validate_json(run_dir.lineage_path.read_text(encoding="utf-8")).model_dump()
    stages = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        stages.append(StageLineage(
            name=config.stage_name, kind=config.kind, state=status.state if status else "pending",
            inputs=status.inputs if status else {},
            outputs={k: f"{config.stage_name}/{v}" for k, v in (status.outputs if status else {}).items()},
            started=status.started if status else None, finished=status.finished if status else None,
            gate=status.summary.get("gate") if status else None, used=status.summary.get("used") if status else None,
        ))
    lineage = Lineage(
        run=run_dir.name,
        recipe=recipe.name,
        created=previous.get("created") or utc_now(),
        updated=utc_now(),
        wenmai_version=finetune.__version__,
        git_commit=previous.get("git_commit") or _git_commit(),
        packages=previous.get("packages") or _package_versions(),
        model=previous.get("model") or _model_lineage(recipe),
        data=previous.get("data") or {name: _file_lineage(Path(recipe.data[name].path), recipe.data[name].format)
                                      for name in used_datasets(recipe)},
        stages=stages,
    )
    atomic_write_json(run_dir.lineage_path, lineage.model_dump())


def _model_lineage(recipe: Recipe) -> dict:
    from finetune.model import resolve_source

    info = {"path": recipe.model.path, "revision": recipe.model.revision, "dtype": recipe.model.dtype,
            "quantization": recipe.model.quantization}
    source = resolve_source(recipe.model, convert=False)
    info.update(source.describe())
    if source.gguf_path is not None:
        info["gguf_sha256"] = sha256_file(source.gguf_path)
    return info


def _file_lineage(path: Path, fmt: str) -> dict:
    return {"path": str(path), "format": fmt, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _package_versions() -> dict[str, str]:
    versions = {"python": __import__("platform").python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]
