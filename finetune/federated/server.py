"""The server's side of a federated run: Flower's strategy over Wenmai's run folder.

`run_rounds` is the body of Wenmai's ServerApp. Flower's strategy (`FedAvg`, `FedProx`, `FedAdam`, optionally inside
`DifferentialPrivacy*FixedClipping` with its `RdpAccountant`) does the sampling, sending and averaging; this module
keeps the run folder: after every round the global adapter is saved as a plain PEFT adapter
(`<stage>/rounds/round-NNNN/adapter/`, and `<stage>/adapter/` is the latest), one line of metrics (per client: loss,
examples, bytes each way), and `federated.json` (the rounds done, the accountant's state), so a killed server resumes
from its last finished round. The stage's `status.json` then lists the outputs every adapter stage lists, so
`wenmai merge`, `export` and `eval` read the global adapter unchanged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import model as model_path
from finetune.adapters import ADAPTER_DIR, ADAPTER_STAGE_OUTPUTS, TOKENIZER_DIR, check_adapter_weights
from finetune.config_io import load_run_recipe
from finetune.data.chat import end_of_turn_ids
from finetune.data.template import template_contract, write_contract
from finetune.errors import WenmaiError
from finetune.federated.local import federated_stage
from finetune.federated.lora import lora_state, nbytes, shape_mismatch
from finetune.recipe import Recipe
from finetune.recipe.federated import FederatedSection
from finetune.run_dir import RunDir, StageStatus, atomic_dir, atomic_write_json, atomic_write_text, utc_now

ROUNDS_DIR = "rounds"
STATE_FILE = "federated.json"
WEIGHT_KEY = "num-examples"
UNIFORM_KEY = "uniform-weight"  # DP accounting needs equal client weights: every client sends 1
Observer = Callable[[Any], None]


@dataclass
class RoundLog:
    """What one round's replies said, per client (names as the clients sent them)."""

    clients: dict[str, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def run_rounds(grid: Any, run_dir: RunDir, wait_for_clients: bool, observe: Observer | None = None) -> None:
    """Run the recipe's remaining federated rounds on `grid`, saving the global adapter after each; a failure is
    recorded in the stage's status.json (and raised), so `--resume` continues from the last saved round."""
    from flwr.app import ArrayRecord, ConfigRecord

    recipe = load_run_recipe(run_dir).recipe
    section = recipe.federated
    options = federated_stage(recipe)
    stage_dir = run_dir.stage_dir(options.stage_name)
    state = read_state(stage_dir)
    previous = run_dir.status(options.stage_name)
    status = StageStatus(
        name=options.stage_name,
        kind="sft",
        state="running",
        started=utc_now(),
        attempts=(previous.attempts + 1) if previous else 1,
    )
    run_dir.write_status(status)
    try:
        global_model = GlobalAdapter(recipe, stage_dir)
        done = len(state["rounds"])
        initial = global_model.state if done == 0 else global_model.load_round(done)
        if wait_for_clients:
            wait_for(grid, section)
        strategy = build_strategy(section, has_eval=bool(options.eval_fraction), state=state)
        recorder = RecordingGrid(grid, section, initial, observe)
        started = [time.monotonic()]

        def save_round(flower_round: int, arrays: Any) -> Any:
            if flower_round == 0:
                return None
            number = done + flower_round
            global_model.save_round(number, arrays.to_torch_state_dict())
            state["rounds"].append(round_record(number, recorder.take(), time.monotonic() - started[0], strategy))
            if getattr(strategy, "accountant", None) is not None:
                state["accountant"] = strategy.accountant.state_dict()
            atomic_write_json(stage_dir / STATE_FILE, state)
            write_metrics(run_dir.metrics_path(options.stage_name), options.stage_name, state["rounds"])
            started[0] = time.monotonic()
            return None

        local_steps = section.local_steps or options.max_steps
        if done < section.rounds:
            strategy.start(
                grid=recorder,
                initial_arrays=ArrayRecord(initial),
                num_rounds=section.rounds - done,
                timeout=section.round_timeout_s,
                train_config=ConfigRecord({"local-steps": local_steps, "round-offset": done}),
                evaluate_config=ConfigRecord({"round-offset": done}),
                evaluate_fn=save_round,
            )
    except BaseException as err:
        status.state, status.finished, status.error = "failed", utc_now(), f"{type(err).__name__}: {err}"[:2000]
        run_dir.write_status(status)
        raise
    status.state, status.finished = "done", utc_now()
    status.outputs = {k: v for k, v in ADAPTER_STAGE_OUTPUTS.items() if k not in ("data_card", "register")}
    status.outputs["federated"] = STATE_FILE
    status.summary = summary(state, section)
    run_dir.write_status(status)


class GlobalAdapter:
    """The server's copy of the base model with the global adapter: the first round's tensors, and every saved round."""

    def __init__(self, recipe: Recipe, stage_dir: Path):
        from transformers import set_seed

        options = federated_stage(recipe)
        source = model_path.resolve_source(recipe.model)
        set_seed(options.seed)  # the starting adapter is random: same seed, same start
        self.model = model_path.attach_new_adapter(model_path.load_model(recipe.model, source), recipe.lora)
        self.state = lora_state(self.model)
        self.stage_dir = stage_dir
        stage_dir.mkdir(parents=True, exist_ok=True)
        if not (stage_dir / TOKENIZER_DIR).is_dir():  # the template contract starts here, as at an sft stage
            tokenizer = model_path.load_tokenizer(recipe.model, source)
            with atomic_dir(stage_dir / TOKENIZER_DIR) as tmp:
                tokenizer.save_pretrained(tmp)
            write_contract(template_contract(tokenizer, end_of_turn_ids(tokenizer)), stage_dir)

    def save_round(self, number: int, state: dict[str, Any]) -> Path:
        """Save round `number`'s global adapter (plain PEFT files), and make it the stage's `adapter/`."""
        from peft import set_peft_model_state_dict

        problem = shape_mismatch(self.state, state, "the aggregated adapter", "the server's model")
        if problem:
            raise WenmaiError(problem)
        set_peft_model_state_dict(self.model, state)
        folder = round_dir(self.stage_dir, number)
        folder.parent.mkdir(parents=True, exist_ok=True)
        for target in (folder, self.stage_dir / ADAPTER_DIR):
            with atomic_dir(target) as tmp:
                self.model.save_pretrained(str(tmp))
                check_adapter_weights(tmp)
        return folder

    def load_round(self, number: int) -> dict[str, Any]:
        """The LoRA tensors of saved round `number` (to resume from it)."""
        from safetensors.torch import load_file

        path = round_dir(self.stage_dir, number) / "adapter_model.safetensors"
        if not path.is_file():
            raise WenmaiError(f"{path} is missing: the run folder lost round {number}'s adapter; start a new run")
        state = load_file(str(path))
        problem = shape_mismatch(self.state, state, f"round {number}'s saved adapter", "this recipe's model and lora")
        if problem:
            raise WenmaiError(problem)
        return {k: v.float() for k, v in state.items()}


class RecordingGrid:
    """Flower's Grid, recording each reply (client name, examples, loss, bytes) and refusing replies that do not fit:
    an unknown client name, LoRA tensors of another shape, or fewer replies than the recipe's minimum."""

    def __init__(self, grid: Any, section: FederatedSection, expected: dict[str, Any], observe: Observer | None):
        self.grid, self.section, self.expected, self.observe = grid, section, expected, observe
        self.log = RoundLog()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        messages = list(messages)
        sent = nbytes(messages[0].content["arrays"].to_torch_state_dict()) if messages else 0
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        kept = []
        for reply in replies:
            if self.observe is not None:
                self.observe(reply)
            reason = self._refusal(reply)
            if reason:
                self.log.failures.append(reason)
                continue
            kept.append(reply)
            self._record(reply, sent)
        kind = messages[0].metadata.message_type if messages else ""
        if kind == "train" and messages and len(kept) < self.section.required_clients():
            why = "; ".join(self.log.failures) or "no reply before the round timeout"
            raise WenmaiError(
                f"only {len(kept)} of {len(messages)} clients returned a usable update, and the recipe needs "
                f"{self.section.required_clients()} (federated.min_clients): {why}"
            )
        return kept

    def take(self) -> RoundLog:
        log, self.log = self.log, RoundLog()
        return log

    def _refusal(self, reply: Any) -> str | None:
        node = reply.metadata.src_node_id
        if reply.has_error():
            return f"node {node}: {reply.error.reason}"
        name = str(reply.content["client"]["name"]) if "client" in reply.content else "?"
        if name not in self.section.names():
            return f"node {node} calls itself {name!r}, which is not in federated.clients ({', '.join(self.section.names())})"
        if reply.metadata.message_type == "train":
            problem = shape_mismatch(
                self.expected, reply.content["arrays"].to_torch_state_dict(), f"client {name}'s update", "the server's"
            )
            if problem:
                return f"client {name}: {problem}"
        return None

    def _record(self, reply: Any, sent: int) -> None:
        name = str(reply.content["client"]["name"])
        metrics = dict(reply.content["metrics"])
        entry = self.log.clients.setdefault(name, {})
        if reply.metadata.message_type == "train":
            entry.update(
                examples=int(metrics.get(WEIGHT_KEY, 0)),
                train_loss=round(float(metrics.get("train-loss", 0.0)), 4),
                steps=int(metrics.get("steps", 0)),
                bytes_to_client=sent,
                bytes_from_client=nbytes(reply.content["arrays"].to_torch_state_dict()),
            )
        else:
            entry.update(eval_loss=round(float(metrics["eval-loss"]), 4), eval_examples=int(metrics[WEIGHT_KEY]))


def build_strategy(section: FederatedSection, has_eval: bool, state: dict) -> Any:
    """Flower's strategy for the section: FedAvg / FedProx / FedAdam, inside DP fixed clipping when asked."""
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    required = section.required_clients()
    dp = section.differential_privacy
    common = {
        "fraction_train": section.fraction,
        "fraction_evaluate": 1.0 if has_eval else 0.0,
        "min_train_nodes": required,
        "min_evaluate_nodes": required if has_eval else 0,
        "min_available_nodes": required,
        "weighted_by_key": UNIFORM_KEY if dp else WEIGHT_KEY,
    }
    if section.strategy == "fedprox":
        strategy = FedProx(**common, proximal_mu=section.proximal_mu)
    elif section.strategy == "fedadam":
        strategy = FedAdam(**common, eta=section.server_learning_rate, tau=section.tau)
    else:
        strategy = FedAvg(**common)
    if dp is None:
        return strategy
    from flwr.serverapp.strategy import (
        DifferentialPrivacyClientSideFixedClipping,
        DifferentialPrivacyServerSideFixedClipping,
    )

    accountant = privacy_accountant(section)
    if state.get("accountant"):
        accountant.load_state_dict(state["accountant"])
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if dp.clipping == "server"
        else DifferentialPrivacyClientSideFixedClipping
    )
    return wrapper(strategy, dp.noise_multiplier, dp.clipping_norm, len(section.clients), accountant=accountant)


def privacy_accountant(section: FederatedSection) -> Any:
    """Flower's RdpAccountant for the section's DP settings: every client in every round, no sampling amplification."""
    from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    dp = section.differential_privacy
    config = PrivacyConfig(
        target_delta=dp.delta,
        population_size=len(section.clients),
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
        max_epsilon=dp.max_epsilon,
    )
    return RdpAccountant(config)


def wait_for(grid: Any, section: FederatedSection) -> None:
    """Wait (at most connect_timeout_s) until every named client is connected, then go on with at least min_clients."""
    deadline = time.monotonic() + section.connect_timeout_s
    while len(list(grid.get_node_ids())) < len(section.clients) and time.monotonic() < deadline:
        time.sleep(1)
    connected = len(list(grid.get_node_ids()))
    if connected < section.required_clients():
        raise WenmaiError(
            f"{connected} of {len(section.clients)} clients connected within {section.connect_timeout_s:g} s "
            f"(federated.connect_timeout_s); the recipe needs {section.required_clients()}. Start each client with "
            "`wenmai federate client RECIPE --name NAME --superlink ADDRESS`"
        )


def round_record(number: int, log: RoundLog, wall_s: float, strategy: Any) -> dict:
    """One round in federated.json and the metrics: per client, the weighted means, bytes, time, epsilon."""
    clients = log.clients
    examples = sum(c.get("examples", 0) for c in clients.values())
    record = {
        "round": number,
        "clients": clients,
        "failures": log.failures,
        "examples": examples,
        "train_loss": _weighted(clients, "train_loss", "examples"),
        "eval_loss": _weighted(clients, "eval_loss", "eval_examples"),
        "bytes": sum(c.get("bytes_to_client", 0) + c.get("bytes_from_client", 0) for c in clients.values()),
        "wall_s": round(wall_s, 2),
        "finished": utc_now(),
    }
    spent = strategy.privacy_spent() if hasattr(strategy, "privacy_spent") else None
    if spent is not None:
        record["epsilon"], record["delta"] = spent.epsilon, spent.delta
    return record


def write_metrics(path: Path, stage: str, rounds: list[dict]) -> None:
    """metrics.jsonl from the finished rounds (rewritten whole, so a resumed run has each round once); step = round."""
    rows = []
    for r in rounds:
        row = {"stage": stage, "step": r["round"], "loss": r["train_loss"], "bytes": r["bytes"], "wall_s": r["wall_s"]}
        row.update({k: r[k] for k in ("eval_loss", "epsilon") if r.get(k) is not None})
        row.update({f"{name}/train_loss": c["train_loss"] for name, c in r["clients"].items() if "train_loss" in c})
        rows.append(json.dumps(row))
    atomic_write_text(path, "\n".join(rows) + "\n")


def summary(state: dict, section: FederatedSection) -> dict:
    rounds = state["rounds"]
    last = rounds[-1] if rounds else {}
    out = {
        "strategy": section.strategy,
        "rounds": len(rounds),
        "clients": section.names(),
        "first_train_loss": rounds[0]["train_loss"] if rounds else None,
        "last_train_loss": last.get("train_loss"),
        "last_eval_loss": last.get("eval_loss"),
        "bytes_per_round": last.get("bytes"),
    }
    if "epsilon" in last:
        out.update(epsilon=last["epsilon"], delta=last["delta"])
    return out


def read_state(stage_dir: Path) -> dict:
    """`federated.json`: the finished rounds (and the DP accountant's state); empty for a new run."""
    path = stage_dir / STATE_FILE
    if not path.is_file():
        return {"rounds": []}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise WenmaiError(f"{path} is damaged ({err}); restore it or start a new run") from None


def round_dir(stage_dir: Path, number: int) -> Path:
    return stage_dir / ROUNDS_DIR / f"round-{number:04d}" / ADAPTER_DIR


def _weighted(clients: dict[str, dict], key: str, weight: str) -> float | None:
    pairs = [(c[key], c.get(weight, 0)) for c in clients.values() if key in c]
    total = sum(w for _, w in pairs)
    return round(sum(v * w for v, w in pairs) / total, 4) if pairs and total else None
