"""`wenmai federate server` and `wenmai federate client`: Flower's own deployment processes, started for the user.

The server starts `flower-superlink` (never installing dependencies: `--disable-runtime-dependency-installation`)
and submits Wenmai's Flower App with `flwr run` from a temporary FLWR_HOME that names this SuperLink; the app's
ServerApp (`finetune.federated.flower_app:server`) keeps the run folder. A client starts `flower-supernode` with
its recipe, name and local folder in `--node-config`; its ClientApp runs the data layer and training on its own
machine. Every Flower process gets FLWR_TELEMETRY_ENABLED=0 and FLWR_DISABLE_UPDATE_CHECK=1. TLS certificates
come from paths; without them only a loopback address is allowed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.config_io import LoadedRecipe, load_run_recipe
from finetune.errors import WenmaiError
from finetune.federated.local import client_dataset
from finetune.federated.record import finish_run
from finetune.federated.simulate import FLOWER_ENV
from finetune.net import is_loopback
from finetune.run_dir import RunDir, atomic_write_text

APP_NAME = "wenmai-federated"
APP_TOML = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "{name}"
version = "1.0.0"
description = "Wenmai's federated LoRA app (the code is the installed wenmai package)"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "wenmai"

[tool.flwr.app.components]
serverapp = "finetune.federated.flower_app:server"
clientapp = "finetune.federated.flower_app:client"

[tool.flwr.app.config]
run-dir = ""
"""
Log = Callable[[str], None]


@dataclass
class Tls:
    """Certificate paths; all None: no TLS (loopback only)."""

    root_certificates: Path | None = None
    certificate: Path | None = None
    key: Path | None = None

    def check(self, address: str, server: bool) -> None:
        given = [p for p in (self.root_certificates, self.certificate, self.key) if p is not None]
        for path in given:
            if not Path(path).is_file():
                raise WenmaiError(f"certificate file {path} not found")
        wanted = 3 if server else 1
        if given and len(given) != wanted:
            raise WenmaiError(
                "TLS on the server needs --root-certificates (the CA), --certificate and --key"
                if server
                else "TLS on a client needs --root-certificates (the CA that signed the server's certificate)"
            )
        if not given and not is_loopback(address):
            flags = "--root-certificates, --certificate and --key" if server else "--root-certificates CA"
            raise WenmaiError(
                f"{address} is not a loopback address: Wenmai talks to another machine only over TLS; give {flags}"
            )

    @property
    def on(self) -> bool:
        return self.root_certificates is not None


def serve(
    loaded: LoadedRecipe | None,
    host: str = "127.0.0.1",
    port: int = 9092,
    tls: Tls | None = None,
    run_dir_path: str | Path | None = None,
    resume: str | Path | None = None,
    log: Log = print,
    timeout_s: float | None = None,
) -> RunDir:
    """Start a SuperLink, submit Wenmai's app to it, wait for the run, stop the SuperLink; returns the run folder."""
    tls = tls or Tls()
    tls.check(host, server=True)
    if resume is not None:
        run_dir = RunDir.open(resume)
        recipe = load_run_recipe(run_dir).recipe
    else:
        recipe = loaded.recipe
        if recipe.federated is None:
            raise WenmaiError(f"{loaded.path} has no `federated` section")
        run_dir = RunDir.create(recipe.output.root, recipe.name, run_dir_path)
        atomic_write_text(run_dir.recipe_path, loaded.to_yaml())
    log(f"run folder: {run_dir.root}")
    budget = timeout_s or (
        recipe.federated.connect_timeout_s + recipe.federated.rounds * recipe.federated.round_timeout_s * 2
    )
    with run_dir.lock(log), flower_home() as home:
        run_dir.remove_leftovers()
        superlink = [
            "flower-superlink",
            "--disable-runtime-dependency-installation",
            "--host",
            host,
            "--port",
            str(port),
            "--database",
            str(home / "superlink.db"),
            *(_server_tls(tls) if tls.on else ["--insecure"]),
        ]
        try:
            with running(superlink, home / "superlink.log", log):
                wait_for_port(host, port, 60)
                app = write_app(home)
                write_connection(home, f"{host}:{port}", tls)
                command = ["flwr", "run", str(app), "wenmai", "--stream", "--run-config", f"run-dir='{run_dir.root}'"]
                log(f"submitting Wenmai's app: {' '.join(command)}")
                _wait_for_run(command, home, run_dir, budget, log)
        finally:
            finish_run(run_dir, log)
    status = run_dir.status(recipe.federated.stage or _stage_name(run_dir))
    if status is None or status.state != "done":
        error = status.error if status else "the ServerApp never started (see the SuperLink log above)"
        raise WenmaiError(f"the federated run stopped: {error}; continue it with --resume {run_dir.root}")
    return run_dir


def join(
    recipe_path: Path,
    name: str,
    superlink: str,
    tls: Tls | None = None,
    folder: Path | None = None,
    port: int = 9094,
    log: Log = print,
    timeout_s: float | None = None,
    give_up_after_s: float = 600,
) -> None:
    """Run a SuperNode for client `name` until it has not reached the SuperLink for `give_up_after_s` (the server
    finished or is gone), or `timeout_s`."""
    from finetune.pipeline import load_recipe

    tls = tls or Tls()
    tls.check(superlink.rsplit(":", 1)[0], server=False)
    recipe = load_recipe(recipe_path).recipe
    if recipe.federated is None:
        raise WenmaiError(f"{recipe_path} has no `federated` section")
    client_dataset(recipe, name)  # an unknown name or a missing dataset stops here, before connecting
    folder = Path(folder or Path(recipe.output.root) / f"{recipe.name}-client-{name}").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    node_config = f"recipe='{Path(recipe_path).resolve()}' name='{name}' folder='{folder}'"
    command = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        node_config,
        "--max-wait-time",
        str(give_up_after_s),
        *(["--root-certificates", str(tls.root_certificates)] if tls.on else ["--insecure"]),
    ]
    log(f"client {name}: local files in {folder}; joining {superlink}")
    with flower_home() as home, running(command, home / "supernode.log", log) as process:
        deadline = time.monotonic() + (timeout_s or float("inf"))
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)


@contextlib.contextmanager
def flower_home() -> Iterator[Path]:
    """A temporary FLWR_HOME for the Flower processes of one command, removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="wenmai-flwr-"))
    try:
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def running(command: list[str], log_file: Path, log: Log) -> Iterator[subprocess.Popen]:
    """A Flower process (in its own process group, output into `log_file`), stopped on the way out."""
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(log_file.parent)}
    executable = shutil.which(command[0], path=str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""))
    if executable is None:
        raise WenmaiError(f"{command[0]} not found; install the federated extra: pip install 'wenmai[federated]'")
    with open(log_file, "ab") as output:
        process = subprocess.Popen(
            [executable, *command[1:]], env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        stop(process)


def stop(process: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group, SIGKILL after `grace_s`."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(grace_s)


def write_app(home: Path) -> Path:
    """The Flower App folder `flwr run` packs: only its pyproject.toml (the code is the installed wenmai package)."""
    app = home / "app"
    app.mkdir()
    (app / "pyproject.toml").write_text(APP_TOML.format(name=APP_NAME), encoding="utf-8")
    return app


def write_connection(home: Path, address: str, tls: Tls) -> None:
    """FLWR_HOME/config.toml naming the SuperLink connection `wenmai` (TLS: its CA; else insecure)."""
    security = f'root-certificates = "{tls.root_certificates}"' if tls.on else "insecure = true"
    text = f'[superlink]\ndefault = "wenmai"\n\n[superlink.wenmai]\naddress = "{address}"\n{security}\n'
    (home / "config.toml").write_text(text, encoding="utf-8")


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.5)
    raise WenmaiError(f"the SuperLink did not open {host}:{port} within {timeout_s:g} s (is the port in use?)")


def _server_tls(tls: Tls) -> list[str]:
    return [
        "--ssl-ca-certfile",
        str(tls.root_certificates),
        "--ssl-certfile",
        str(tls.certificate),
        "--ssl-keyfile",
        str(tls.key),
    ]


def _wait_for_run(command: list[str], home: Path, run_dir: RunDir, budget: float, log: Log) -> None:
    with running(command, home / "flwr-run.log", log) as process:
        deadline = time.monotonic() + budget
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if process.poll() is None:
            raise WenmaiError(
                f"the federated run did not finish within {budget:g} s; continue it with --resume {run_dir.root}"
            )
    tail = (home / "flwr-run.log").read_text(encoding="utf-8", errors="replace")[-3000:]
    if process.returncode:
        raise WenmaiError(f"flwr run failed (exit {process.returncode}):\n{tail}")
    log(tail)


def _stage_name(run_dir: RunDir) -> str:
    from finetune.federated.local import federated_stage

    return federated_stage(load_run_recipe(run_dir).recipe).stage_name
