"""Running a recipe: loading it with every check, pre-flight, the run folder, each stage in order, resume.

`load_recipe` and `validate` are what `wenmai validate` calls; `start` and `resume` what `wenmai run`
calls. Each stage's method is `finetune.stages.STAGES[kind].run`; the lineage is `finetune.lineage`.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from finetune import speed
from finetune.checks import preflight as compatibility
from finetune.config_io import LoadedRecipe, load_run_recipe
from finetune.config_io import load_recipe as load_recipe_file
from finetune.data import load_records, policy_file_problems
from finetune.distributed.ranks import Ranks, barrier, connect, is_main_process, main_only
from finetune.errors import ConfigError, Problem, WenmaiError
from finetune.lineage import write_lineage
from finetune.model import check_hardware, model_config_dict, resolve_source
from finetune.recipe import Recipe, TrainingOptions, used_datasets, wiring
from finetune.recipe.secrets import public_run_name, redact, secrets_of
from finetune.report import write_report
from finetune.run_dir import RunDir, StageContext, StageStatus, atomic_write_text, truncate_metrics, utc_now
from finetune.stages import STAGES, stage_problems
from finetune.stages import machine_problems as stage_machine_problems
from finetune.tracking import backend_env, check_backends, dashboard_env, dashboard_runs
from finetune.training import stage_scope

Log = Callable[[str], None]
RECIPE_CHECKS = (policy_file_problems, stage_problems)  # what needs files or installed packages, beyond the schema


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> LoadedRecipe:
    """Read and validate a recipe with every check that needs no weights: the schema, wiring, the stages' files
    and installed packages; raise `ConfigError` listing every problem at its file:line."""
    return load_recipe_file(path, overrides, checks=RECIPE_CHECKS)


@dataclass
class Validation:
    """What `wenmai validate` shows after the resolved recipe: data counts, warnings, the pre-flight, speed choices."""

    counts: dict[str, dict]
    warnings: list[str]
    report: compatibility.Report
    speed_lines: list[str]


def validate(recipe: Recipe, gpus: int = 1, nodes: int = 1) -> Validation:
    """Read every dataset, run the pre-flight for `gpus` x `nodes` processes, plan the speed options; load no weights."""
    counts = check_data(recipe)
    warnings = model_presence(recipe) + preflight(recipe, distributed=False)
    report = compatibility.check(recipe, world_size=gpus * nodes, gpus_per_node=gpus, with_estimates=True)
    return Validation(counts, warnings, report, speed.plan_lines(recipe))


def model_presence(recipe: Recipe) -> list[str]:
    """Whether the model is on this machine: a local folder (or pkg:, GGUF file) that is not there is a problem;
    a hub id not in the Hugging Face cache yet is a warning, saying why the memory table is missing."""
    try:
        source = resolve_source(recipe.model, convert=False)
    except WenmaiError as err:
        key, _, message = str(err).partition(": ")
        raise ConfigError([Problem(key, message)], "the model is not on this machine") from None
    if model_config_dict(recipe.model) is not None:
        return []
    return [
        f"model.path: {source.location} is not on this machine yet (not in the Hugging Face cache), so the model "
        "itself was not checked and there is no memory table (it needs the model's config.json); `wenmai run` "
        "downloads it, or point HF_HOME at the cache that holds it"
    ]


def preflight(recipe: Recipe, world_size: int = 1, distributed: bool = True) -> list[str]:
    """Problems that stop a run before anything heavy: hardware for the model, missing dashboard packages,
    and (with `distributed`) the errors of the compatibility check: recipe x installed versions x this machine."""
    problems = check_hardware(recipe.model) + check_backends(recipe.tracking) + speed.machine_problems_here(recipe)
    problems += stage_machine_problems(recipe)
    try:
        resolve_source(recipe.model, convert=False)
    except WenmaiError as err:
        problems.append(str(err))
    if distributed:
        problems += [str(f) for f in compatibility.check(recipe, world_size).blocking()]
    return problems


def check_data(recipe: Recipe) -> dict[str, dict]:
    """Read and validate every dataset a stage uses; returns per-dataset counts. Raises on bad data."""
    counts = {}
    for name in used_datasets(recipe):
        records = load_records(recipe, name)
        counts[name] = {
            "records": len(records.records),
            "skipped": len(records.skipped),
            "report": records.report,
        }  # what the data layer kept out, and why
    return counts


def start(
    loaded: LoadedRecipe, run_dir_path: str | Path | None = None, log: Log = print, force: bool = False
) -> RunDir:
    """Check everything that can fail early, create the run folder, and run every stage."""
    recipe = loaded.recipe
    ranks = connect(recipe.distributed)  # several processes (wenmai launch): join them first
    log = main_only(log)
    file_problems = [] if loaded.checked else [p for check in RECIPE_CHECKS for p in check(recipe)]
    if file_problems:  # a recipe read without them (`config_io.load_recipe`) is checked here
        raise ConfigError([loaded.locate(p) for p in file_problems])
    without_data = [c.stage_name for c in recipe.stage_configs() if c.kind == "sft" and c.dataset is None]
    if without_data:  # only a federated server's recipe may leave it out: its clients hold the data
        raise WenmaiError(
            f"stage {without_data[0]!r} names no dataset: this recipe is a federated server's (its clients hold the "
            "data); run it with `wenmai federate server` or `simulate`, or give the stage a `dataset`"
        )
    problems = preflight(recipe, ranks.world_size)
    if problems:
        raise WenmaiError("pre-flight found problems:\n  - " + "\n  - ".join(problems))
    pinned = pin_review_data(recipe)
    check_data(recipe)
    if ranks.world_size > 1 and run_dir_path is None:
        raise WenmaiError(
            "a run with several processes needs the same --run-dir on every process; start it with `wenmai launch`"
        )
    _convert_once_per_node(recipe, ranks)
    with contextlib.ExitStack() as held:
        if ranks.is_main:  # rank 0 owns the run folder and holds its lock; the others wait until it exists
            run_dir = RunDir.create(recipe.output.root, recipe.name, run_dir_path)
            held.enter_context(run_dir.lock(log))
            atomic_write_text(run_dir.recipe_path, loaded.to_yaml())
            log(f"run folder: {run_dir.root}")
        barrier()
        if not ranks.is_main:
            run_dir = RunDir.open(run_dir_path)
            if pinned:  # every process reads the feedback rank 0 pinned
                recipe = load_run_recipe(run_dir).recipe
        return run_stages(recipe, run_dir, log, force)


def pin_review_data(recipe: Recipe) -> list[str]:
    """Give each review-session dataset without an `as_of` the current time, so the run (and a resume of it) reads
    the feedback stored when it started; returns the datasets pinned."""
    pinned = []
    for name, section in recipe.data.items():
        if section.format == "review" and section.as_of is None:
            section.as_of = datetime.now(timezone.utc)
            pinned.append(name)
    return pinned


def resume(
    run_dir_path: str | Path,
    recipe_path: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    log: Log = print,
    force: bool = False,
) -> RunDir:
    """Continue a run: finished stages are skipped, an interrupted one restarts from its last checkpoint."""
    run_dir = RunDir.open(run_dir_path)
    log = main_only(log)
    with own_run_folder(run_dir, log):
        return _resume(run_dir, recipe_path, overrides, log, force)


def own_run_folder(run_dir: RunDir, log: Log) -> contextlib.AbstractContextManager[None]:
    """For a command that continues a run folder: rank 0 holds its lock (`RunDir.lock`) for the whole command and
    first removes what interrupted atomic writes left; the other ranks of a launch write nothing there and take none."""
    return _locked_and_cleared(run_dir, log) if is_main_process() else contextlib.nullcontext()


@contextlib.contextmanager
def _locked_and_cleared(run_dir: RunDir, log: Log) -> Iterator[None]:
    with run_dir.lock(log):
        for path in run_dir.remove_leftovers():
            log(f"removed {run_dir.relative(path)}, left by an interrupted write")
        yield


def _resume(
    run_dir: RunDir, recipe_path: str | Path | None, overrides: tuple[str, ...], log: Log, force: bool
) -> RunDir:
    stored = load_run_recipe(run_dir)
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
    problems = preflight(stored.recipe, ranks.world_size)
    if problems:
        raise WenmaiError("pre-flight found problems:\n  - " + "\n  - ".join(problems))
    _convert_once_per_node(stored.recipe, ranks)
    log(f"resuming {run_dir.root}")
    return run_stages(stored.recipe, run_dir, log, force)


def _convert_once_per_node(recipe: Recipe, ranks: Ranks) -> None:
    """A GGUF model is converted into the node's cache by one process while the others wait."""
    if recipe.model.gguf_file and ranks.world_size > 1:
        if ranks.local_rank == 0:
            resolve_source(recipe.model)
        barrier()


def run_stages(
    recipe: Recipe, run_dir: RunDir, log: Log = print, force: bool = False, only: Collection[str] | None = None
) -> RunDir:
    """Run each stage not yet done (of `only`, when given), in order; write its status last, then the lineage;
    then the report.

    `force` lets the stages after a failing evaluate gate run (the gate records that it was forced).
    """
    resolved_inputs, problems = wiring(recipe)
    if problems:
        raise ConfigError(problems)
    main = is_main_process()  # only rank 0 writes statuses, metrics, lineage and the report; every rank trains
    if main:
        write_lineage(recipe, run_dir, log)
    try:
        _run_each(recipe, run_dir, resolved_inputs, log, force, main, only)
    finally:
        if main:
            _write_report(run_dir, log)
    return run_dir


def _run_each(
    recipe: Recipe,
    run_dir: RunDir,
    resolved_inputs: dict,
    log: Log,
    force: bool,
    main: bool,
    only: Collection[str] | None = None,
) -> None:
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
            name=name,
            kind=config.kind,
            state="running",
            started=utc_now(),
            inputs=inputs,
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
            _write_report(run_dir, log, quiet=True)  # the report shows the stage running
        barrier()  # the stage folder exists before any rank uses it
        if checkpoint is not None:
            log(f"[{number}/{len(configs)}] {name}: resuming from {checkpoint.name}")
        else:
            log(f"[{number}/{len(configs)}] {name} ({config.kind})")
        ctx = StageContext(
            recipe=recipe,
            config=config,
            run_dir=run_dir,
            inputs={field: run_dir.outputs(stage) for field, stage in inputs.items()},
            input_stages=inputs,
            resume_from=checkpoint,
            extra={"force": force},
        )
        run_name = recipe.tracking.run_name or run_dir.name
        try:
            with (
                dashboard_env(backend_env(recipe.tracking, run_dir.root, name, run_name)),
                _dashboard_runs(recipe, run_dir, config, main),
                stage_scope(recipe, config, ctx.stage_dir, run_dir.name),
            ):
                result = STAGES[config.kind].run(ctx)
        except BaseException as err:
            if main:
                status.state, status.finished = "failed", utc_now()
                status.error = redact(f"{type(err).__name__}: {err}", secrets_of(recipe))[:2000]
                run_dir.write_status(status)
                try:
                    write_lineage(recipe, run_dir, log)
                except WenmaiError as lineage_error:  # the stage's own error is the one to show
                    log(f"lineage.json not updated: {lineage_error}")
            if isinstance(err, KeyboardInterrupt):
                err.run_dir = run_dir.root  # the CLI names the folder to resume
            raise
        finally:
            release_memory()  # the stage's models are gone; give their memory back before the next stage
        if main:
            status.state, status.finished = "done", utc_now()
            status.outputs, status.summary = result.outputs, result.summary
            run_dir.write_status(status)
            write_lineage(recipe, run_dir, log)
            _write_report(run_dir, log, quiet=True)  # open during a run, it shows every finished stage
        barrier()  # the next stage reads this one's status.json
        log(f"[{number}/{len(configs)}] {name}: done")


def _dashboard_runs(recipe: Recipe, run_dir: RunDir, config, main: bool):
    """A W&B / MLflow run of its own for a trainer stage (on the logging process), else nothing."""
    if not main or not isinstance(config, TrainingOptions) or not set(recipe.tracking.backends) & {"wandb", "mlflow"}:
        return contextlib.nullcontext()
    text = run_dir.recipe_path.read_text(encoding="utf-8")
    name = public_run_name(recipe, run_dir.name)
    return dashboard_runs(recipe.tracking, run_dir.root, config.stage_name, config.kind, name, text)


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


def _write_report(run_dir: RunDir, log: Log, quiet: bool = False) -> None:
    """The HTML run report, when a stage starts and ends and after every run (finished or stopped; named then unless
    `quiet`); a report problem never hides the run's own error."""
    try:
        path = write_report(run_dir)
        if not quiet:
            log(f"report: {path}")
    except Exception as err:  # the report is a view: the run's own outcome stands
        log(f"report not written ({type(err).__name__}: {err}); retry with `wenmai report {run_dir.root}`")


def _differences(a: object, b: object, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(key), b.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [path]
