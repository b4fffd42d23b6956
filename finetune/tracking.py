"""Metrics: `metrics.jsonl` in every stage folder, and the dashboards (through transformers' `report_to`)."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import netrc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from finetune.errors import WenmaiError
from finetune.recipe import TrackingSection
from finetune.recipe.secrets import from_env

DASHBOARDS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "wenmai[mlflow]"),
}


def report_to(tracking: TrackingSection) -> list[str]:
    """The transformers `report_to` list for the recipe's dashboards."""
    return [b for b in tracking.backends if b in DASHBOARDS] or ["none"]


def check_backends(tracking: TrackingSection) -> list[str]:
    """Dashboards whose package is missing, as messages that say how to install it."""
    problems = []
    for backend in tracking.backends:
        if backend in _PACKAGES and importlib.util.find_spec(_PACKAGES[backend][0]) is None:
            problems.append(f"tracking.backends: {backend} is not installed; pip install {_PACKAGES[backend][1]}")
    return problems + mlflow_uri_problems(tracking)


def backend_env(tracking: TrackingSection, run_root: Path, stage: str, run_name: str) -> dict[str, str]:
    """Environment variables that point transformers' dashboard callbacks at this run and stage.

    A `run_name` that came from `${env:...}` is replaced by the run folder's name (`finetune.recipe.secrets`)."""
    if from_env(tracking, "run_name") and run_name == tracking.run_name:
        run_name = run_root.name
    env = {}
    if "tensorboard" in tracking.backends:
        env["TENSORBOARD_LOGGING_DIR"] = str(run_root / stage / "tensorboard")
    if "wandb" in tracking.backends:
        env["WANDB_PROJECT"] = tracking.project
        env["WANDB_DIR"] = str(run_root)
        env["WANDB_RUN_GROUP"] = run_name
        mode = tracking.wandb_mode
        if mode == "auto":
            mode = "online" if _wandb_logged_in() else "offline"
        env["WANDB_MODE"] = mode
    if "mlflow" in tracking.backends:
        env["MLFLOW_TRACKING_URI"] = tracking.mlflow_tracking_uri or default_mlflow_uri(run_root)
        env["MLFLOW_EXPERIMENT_NAME"] = tracking.project
    return env


def default_mlflow_uri(run_root: Path) -> str:
    """A SQLite store in the run folder: MLflow 3 refuses its old file store (`./mlruns`) unless told otherwise."""
    return f"sqlite:///{(Path(run_root) / MLFLOW_DB).resolve()}"


MLFLOW_DB = "mlflow.db"
MLFLOW_ARTIFACTS = "mlflow-artifacts"


def mlflow_uri_problems(tracking: TrackingSection) -> list[str]:
    """A tracking URI MLflow would refuse at the first logged metric (`wenmai validate` says so before a run)."""
    uri = tracking.mlflow_tracking_uri
    if "mlflow" not in tracking.backends or not uri:
        return []
    if uri.startswith("file:") or "://" not in uri:
        return [
            f"tracking.mlflow_tracking_uri: {uri!r} is a file store, which MLflow 3 refuses (maintenance mode); "
            "use a database, e.g. sqlite:///path/to/mlflow.db, or a server URL (http://host:5000); leave it unset "
            f"for {MLFLOW_DB} in the run folder"
        ]
    return []


@contextlib.contextmanager
def dashboard_runs(
    tracking: TrackingSection, run_root: Path, stage: str, kind: str, run_name: str, recipe_text: str
) -> Iterator[None]:
    """One dashboard run per trainer stage, grouped by the run folder, with the recipe (as `recipe.yaml` holds it:
    `${env:...}` references, never their values) as its config.

    transformers' W&B and MLflow callbacks log into a run that is already open instead of opening their own, so
    without this every stage of a run would land in one W&B run (its step restarting at 1 each stage, its config
    overwritten) and in one MLflow run. A resumed stage continues its own run (W&B: the same id; MLflow: the
    unfinished run with the same tags). Call it on the process that logs (rank 0), inside `dashboard_env`.
    """
    import yaml

    config = {"wenmai": {"recipe": yaml.safe_load(recipe_text) or {}, "stage": stage, "kind": kind, "run": run_name}}
    ident = _stage_run_id(run_root, stage)
    stack = contextlib.ExitStack()
    with stack:
        if "wandb" in tracking.backends:
            stack.enter_context(_wandb_run(tracking, run_root, stage, kind, run_name, ident, config))
        if "mlflow" in tracking.backends:
            stack.enter_context(_mlflow_run(run_root, stage, kind, run_name, ident, recipe_text))
        yield


def _stage_run_id(run_root: Path, stage: str) -> str:
    import hashlib

    return hashlib.sha256(f"{Path(run_root).resolve()}\0{stage}".encode()).hexdigest()[:16]


@contextlib.contextmanager
def _wandb_run(tracking, run_root: Path, stage: str, kind: str, run_name: str, ident: str, config: dict):
    import wandb

    run = wandb.init(
        project=tracking.project,
        group=run_name,
        name=f"{run_name}/{stage}",
        job_type=kind,
        id=ident,
        resume="allow",
        dir=str(run_root),
        config=config,
        reinit="finish_previous",
    )
    try:
        yield run
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


@contextlib.contextmanager
def _mlflow_run(run_root: Path, stage: str, kind: str, run_name: str, ident: str, recipe_text: str):
    import mlflow

    uri, name = os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_EXPERIMENT_NAME"]
    mlflow.set_tracking_uri(uri)
    if uri == default_mlflow_uri(run_root) and mlflow.get_experiment_by_name(name) is None:
        # beside its store, not in ./mlruns of whatever folder the run was started from
        mlflow.create_experiment(name, artifact_location=(Path(run_root) / MLFLOW_ARTIFACTS).resolve().as_uri())
    experiment = mlflow.set_experiment(name)
    unfinished = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.`wenmai.stage_run` = '{ident}' and attributes.status != 'FINISHED'",
        output_format="list",
    )
    tags = {"wenmai.run": run_name, "wenmai.stage": stage, "wenmai.kind": kind, "wenmai.stage_run": ident}
    if unfinished:
        active = mlflow.start_run(run_id=unfinished[0].info.run_id)
    else:
        active = mlflow.start_run(run_name=f"{run_name}/{stage}", tags=tags)
        mlflow.log_text(recipe_text, "recipe.yaml")
    try:
        yield active
    except BaseException as err:
        mlflow.end_run(status="KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    mlflow.end_run()


@contextlib.contextmanager
def dashboard_env(env: dict[str, str]) -> Iterator[None]:
    """Set the dashboards' environment for one stage and restore it afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def append_metrics(path: Path, row: dict[str, Any]) -> None:
    """Append one row to a metrics.jsonl (one line, flushed: a kill loses at most this line)."""
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False, default=float) + "\n")
        f.flush()


def jsonl_callback(path: Path, stage: str):
    """A transformers TrainerCallback that writes every log row to `path`."""
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"stage": stage, "step": state.global_step, "epoch": state.epoch, "time": time.time()}
                row.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
                append_metrics(path, row)

    return JsonlMetrics()


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    with contextlib.suppress(OSError, netrc.NetrcParseError):
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    return False


def ensure_backends(tracking: TrackingSection) -> None:
    problems = check_backends(tracking)
    if problems:
        raise WenmaiError("\n".join(problems))


@contextlib.contextmanager
def progress_line(trainer: Any) -> Iterator[None]:
    """One rich progress line for the stage `trainer` trains (steps, loss, tokens/s, time left) in place of
    transformers' tqdm bars and the dict it prints at every log; only the main process shows it."""
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    line = progress_callback(Path(trainer.args.output_dir).parent.name)
    trainer.add_callback(line)
    try:
        yield
    finally:
        line.close()  # also when training stops with an error or Ctrl-C: the terminal gets its cursor back


def progress_callback(label: str, console: Any = None):
    """A transformers TrainerCallback that draws one progress line named `label` on stderr (or `console`)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Column
    from transformers import TrainerCallback

    class ProgressLine(TrainerCallback):
        def __init__(self) -> None:
            self.progress: Progress | None = None
            self.task = None
            self.first: tuple[float, float] | None = None  # (time, tokens) at the first log with a token count
            self.first_step: tuple[float, int] | None = None
            self.figures: dict[str, str] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            if not state.is_world_process_zero or self.progress is not None:
                return
            self.progress = Progress(
                TextColumn("{task.description}", markup=False, style="bold cyan", table_column=Column(no_wrap=True)),
                BarColumn(bar_width=12),
                MofNCompleteColumn(table_column=Column(no_wrap=True)),
                TextColumn("{task.fields[figures]}", markup=False, table_column=Column(ratio=1, no_wrap=True)),
                TimeRemainingColumn(table_column=Column(no_wrap=True)),
                console=console or Console(stderr=True),
            )
            self.progress.start()
            self.task = self.progress.add_task(label, total=state.max_steps, completed=state.global_step, figures="")
            self.first_step = (time.monotonic(), state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.progress is not None:
                self.progress.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if self.progress is None or not logs:
                return
            now = time.monotonic()
            if "loss" in logs:
                self.figures["loss"] = f"loss {logs['loss']:.4g}"
            if "eval_loss" in logs:
                self.figures["eval"] = f"eval loss {logs['eval_loss']:.4g}"
            tokens = logs.get("num_tokens", logs.get("num_input_tokens_seen"))
            if isinstance(tokens, int | float) and tokens > 0:
                if self.first is None:
                    self.first = (now, float(tokens))
                elif now > self.first[0]:
                    self.figures["speed"] = f"{(tokens - self.first[1]) / (now - self.first[0]):,.0f} tokens/s"
                    self.figures.pop("steps", None)
            elif self.first_step is not None and now > self.first_step[0] and "speed" not in self.figures:
                steps = (state.global_step - self.first_step[1]) / (now - self.first_step[0])
                self.figures["steps"] = f"{steps:.2f} steps/s"
            text = " · ".join(self.figures[k] for k in ("loss", "eval", "speed", "steps") if k in self.figures)
            self.progress.update(self.task, completed=state.global_step, figures=text)

        def close(self) -> None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None

    return ProgressLine()
