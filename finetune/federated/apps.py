"""Wenmai's Flower App: a ClientApp that trains the global adapter on the client's own data, and a ServerApp that
runs the rounds over the run folder (Flower's Message API: `@app.train()`, `@app.evaluate()`, `@app.main()`).

A client's reply holds exactly three records: `arrays` (the LoRA A/B tensors), `metrics` (example count, loss,
steps) and `client` (its name). No text, no token ids, no data card: those stay in the client's own folder.
Settings come from the caller (simulation) or from Flower's context (deployment: the SuperNode's `--node-config`
gives `recipe`, `name` and `folder`; `flwr run --run-config` gives the server's `run-dir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.config_io import load_resolved
from finetune.errors import WenmaiError
from finetune.federated.local import client_dataset, evaluate_state, federated_stage, load_local_data, train_round
from finetune.federated.server import UNIFORM_KEY, WEIGHT_KEY, Observer, run_rounds
from finetune.pipeline import load_recipe
from finetune.recipe import Recipe
from finetune.run_dir import RunDir

CLIPPING_NORM_KEY = "clipping_norm"  # what Flower's client-side DP wrapper sends (flwr.supercore.differential_privacy)


@dataclass
class ClientSettings:
    """Where a client's recipe is and where its local files go; `name` None: the simulation partition's client."""

    recipe: str
    folder: str
    name: str | None = None
    resolved: bool = False  # `recipe` is a run folder's resolved recipe.yaml (simulation)

    @classmethod
    def from_context(cls, context: Any) -> ClientSettings:
        config = context.node_config
        missing = [key for key in ("recipe", "name", "folder") if key not in config]
        if missing:
            raise WenmaiError(f"the SuperNode was started without {', '.join(missing)} in --node-config")
        return cls(str(config["recipe"]), str(config["folder"]), str(config["name"]))

    def load(self, context: Any) -> tuple[Recipe, str]:
        """The client's recipe and its name (checked against the recipe's federated.clients)."""
        path = Path(self.recipe)
        recipe = (load_resolved(path.read_text(encoding="utf-8"), path) if self.resolved else load_recipe(path)).recipe
        if recipe.federated is None:
            raise WenmaiError(f"{path} has no `federated` section")
        name = self.name or recipe.federated.clients[int(context.node_config["partition-id"])].name
        client_dataset(recipe, name)  # an unknown name fails here, naming the known ones
        return recipe, name


@dataclass
class ServerSettings:
    """The run folder the server keeps; `wait_for_clients` (deployment): wait for every named client first."""

    run_dir: str
    wait_for_clients: bool = False
    observe: Observer | None = None  # sees every reply as it arrives (tests intercept the messages with it)


def client_app(settings: ClientSettings | None = None) -> Any:
    """Wenmai's ClientApp (settings from the SuperNode's node config when None)."""
    from flwr.clientapp import ClientApp
    from flwr.clientapp.mod import fixedclipping_mod

    def client_side_clipping(msg: Any, context: Any, call_next: Any) -> Any:
        # Flower's DP wrapper with client-side clipping sends the norm; then Flower's mod clips our update
        if msg.metadata.message_type == "train" and CLIPPING_NORM_KEY in msg.content["config"]:
            return fixedclipping_mod(msg, context, call_next)
        return call_next(msg, context)

    app = ClientApp(mods=[client_side_clipping])

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        recipe, name, folder = _client(settings, context)
        config = msg.content["config"]
        round_number = int(config["round-offset"]) + int(config["server-round"])
        data = load_local_data(recipe, client_dataset(recipe, name), folder)
        state, metrics = train_round(
            recipe,
            data,
            msg.content["arrays"].to_torch_state_dict(),
            steps=int(config["local-steps"]),
            seed=federated_stage(recipe).seed + round_number,
            folder=folder,
            proximal_mu=float(config.get("proximal-mu", 0.0)),
        )
        return _reply(msg, name, {WEIGHT_KEY: len(data.train_rows), UNIFORM_KEY: 1, **metrics}, state)

    @app.evaluate()
    def evaluate(msg: Any, context: Any) -> Any:
        recipe, name, folder = _client(settings, context)
        data = load_local_data(recipe, client_dataset(recipe, name), folder)
        loss = evaluate_state(recipe, data, msg.content["arrays"].to_torch_state_dict(), folder)
        metrics = {WEIGHT_KEY: len(data.eval_rows), UNIFORM_KEY: 1, "eval-loss": loss if loss is not None else 0.0}
        return _reply(msg, name, metrics)

    return app


def server_app(settings: ServerSettings | None = None) -> Any:
    """Wenmai's ServerApp (settings from `flwr run --run-config run-dir=...` when None)."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        chosen = settings or ServerSettings(str(context.run_config["run-dir"]), wait_for_clients=True)
        run_rounds(grid, RunDir.open(chosen.run_dir), chosen.wait_for_clients, chosen.observe)

    return app


def _client(settings: ClientSettings | None, context: Any) -> tuple[Recipe, str, Path]:
    chosen = settings or ClientSettings.from_context(context)
    recipe, name = chosen.load(context)
    return recipe, name, Path(chosen.folder) / name if chosen.name is None else Path(chosen.folder)


def _reply(msg: Any, name: str, metrics: dict, state: dict | None = None) -> Any:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    records: dict[str, Any] = {"metrics": MetricRecord(metrics), "client": ConfigRecord({"name": name})}
    if state is not None:
        records["arrays"] = ArrayRecord(state)
    return Message(RecordDict(records), reply_to=msg)
