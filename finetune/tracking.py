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
    return problems


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
        env["MLFLOW_TRACKING_URI"] = tracking.mlflow_tracking_uri or (run_root / "mlruns").resolve().as_uri()
        env["MLFLOW_EXPERIMENT_NAME"] = tracking.project
    return env


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
