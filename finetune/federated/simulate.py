"""`wenmai federate simulate`: server and clients on this machine, through Flower's simulation engine (Ray).

It runs Flower's `run_simulation` with Wenmai's ServerApp and ClientApp objects. Flower 1.42 deprecates it in favour
of `flwr run` with a local simulation federation, but that route starts a detached local SuperLink on fixed ports
(39091 and 39093 unless FLWR_LOCAL_*_PORT say otherwise) that outlives the command and is shared by every user of
the machine, and its apps are loaded from a FAB by module path, so a test cannot see the messages;
`run_simulation` starts and stops everything inside the command. Deployment (`wenmai federate server`) does use
`flower-superlink` and `flwr run`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from finetune.config_io import LoadedRecipe, load_run_recipe
from finetune.errors import WenmaiError
from finetune.federated.apps import ClientSettings, ServerSettings, client_app, server_app
from finetune.federated.compare import compare
from finetune.federated.record import finish_run
from finetune.federated.server import Observer
from finetune.run_dir import RunDir, atomic_write_text

CLIENTS_DIR = "clients"  # simulation only: each pretend institution's local folder (data card, register)
FLOWER_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def simulate(
    loaded: LoadedRecipe | None,
    clients: int | None = None,
    run_dir_path: str | Path | None = None,
    resume: str | Path | None = None,
    log: Callable[[str], None] = print,
    observe: Observer | None = None,
    compare_after: bool = False,
) -> RunDir:
    """Run a recipe's federated rounds with every client on this machine; `resume`: continue that run folder;
    `compare_after`: then train local-only and centralised adapters and compare them (`finetune.federated.compare`)."""
    os.environ.update(FLOWER_ENV)  # before flwr is imported: no telemetry, no update check
    if resume is not None:
        run_dir = RunDir.open(resume)
        recipe = load_run_recipe(run_dir).recipe
    else:
        recipe = chosen_clients(loaded, clients)
        run_dir = RunDir.create(recipe.output.root, recipe.name, run_dir_path)
        atomic_write_text(run_dir.recipe_path, loaded.to_yaml())
    log(f"run folder: {run_dir.root}")
    with run_dir.lock(log):
        run_dir.remove_leftovers()
        try:
            run_simulation(run_dir, len(recipe.federated.clients), observe)
            if compare_after:
                compare(run_dir, log)
        finally:
            finish_run(run_dir, log)
    return run_dir


def chosen_clients(loaded: LoadedRecipe, clients: int | None):
    """The recipe with its first `clients` clients (all by default), each with a dataset (a simulation has them all)."""
    recipe = loaded.recipe
    section = recipe.federated
    if section is None:
        raise WenmaiError(f"{loaded.path} has no `federated` section; add one (see recipes/federated-museums.yaml)")
    if clients is not None:
        if not 1 <= clients <= len(section.clients):
            raise WenmaiError(
                f"--clients {clients}: the recipe lists {len(section.clients)} clients in federated.clients; "
                f"give 1 to {len(section.clients)}"
            )
        if section.min_clients and section.min_clients > clients:
            raise WenmaiError(f"--clients {clients} is fewer than federated.min_clients ({section.min_clients})")
        section.clients = section.clients[:clients]
    without = [c.name for c in section.clients if c.dataset is None]
    if without:
        raise WenmaiError(
            f"a simulation holds every client's data: give federated.clients entries {', '.join(without)} a `dataset`"
        )
    return recipe


def run_simulation(run_dir: RunDir, clients: int, observe: Observer | None) -> None:
    """Flower's simulation engine with one virtual SuperNode per client, one CPU each, Ray's dashboard off."""
    from flwr.simulation import run_simulation as flower_simulation

    server = server_app(ServerSettings(str(run_dir.root), observe=observe))
    client = client_app(ClientSettings(str(run_dir.recipe_path), str(run_dir.root / CLIENTS_DIR), resolved=True))
    cpus = max(1, min(clients, os.cpu_count() or 1))
    flower_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": True},
        },
    )
