"""The recipe's `federated` section: federated LoRA on Flower (`wenmai federate simulate/server/client`).

Each institution trains the recipe's `sft` stage locally on its own dataset; only the LoRA A/B tensors, example
counts and metrics travel. The server's recipe names the clients (no data paths needed); each client's recipe
names its own dataset. Combinations Flower cannot run are refused here, before anything starts.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

STRATEGIES = ("fedavg", "fedprox", "fedadam")
CLIENT_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class FederatedClient(BaseModel):
    """One institution taking part: its name, and (in its own recipe, or in a simulation) the dataset it trains on."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., pattern=CLIENT_NAME, description="The client's name (lineage and metrics name it).")
    dataset: str | None = Field(
        None,
        description="A name in `data`: the client's own records (simulation, or the client's recipe). "
        "The server's recipe may leave it out: the server never reads client data.",
    )


class DifferentialPrivacy(BaseModel):
    """Flower's DifferentialPrivacy*FixedClipping around FedAvg/FedProx, with its RDP accountant (flwr[dp])."""

    model_config = ConfigDict(extra="forbid")
    clipping: Literal["server", "client"] = Field(
        "server", description="Where each client's update is clipped: on the server, or on the client before sending."
    )
    noise_multiplier: float = Field(..., gt=0, description="Gaussian noise stdev as a multiple of the clipping norm.")
    clipping_norm: float = Field(..., gt=0, description="L2 bound on each client's update (all LoRA tensors together).")
    delta: float = Field(1e-5, gt=0, lt=1, description="The delta at which the spent epsilon is reported.")
    max_epsilon: float | None = Field(None, gt=0, description="Stop before a round would spend more than this epsilon.")


class FederatedSection(BaseModel):
    """Federated LoRA across institutions on Flower: rounds, sampling, strategy, privacy, and the clients."""

    model_config = ConfigDict(extra="forbid")
    rounds: int = Field(3, ge=1, description="Federated rounds; each trains `local_steps` on every sampled client.")
    stage: str | None = Field(
        None,
        description="The `sft` stage whose options train each client locally (default: the recipe's first sft stage).",
    )
    local_steps: int | None = Field(
        None, gt=0, description="Optimizer steps per client per round (default: the stage's max_steps)."
    )
    fraction: float = Field(1.0, gt=0, le=1, description="Share of the connected clients sampled each round.")
    min_clients: int | None = Field(
        None,
        ge=1,
        description="Clients a round needs; a round with fewer replies fails the run (default: every client).",
    )
    strategy: str = Field(
        "fedavg",
        description="fedavg: mean weighted by example counts; fedprox: fedavg, and each client's trainer adds "
        "(mu/2)·|w - w_global|² to its loss; fedadam: server-side Adam on the averaged update.",
    )
    proximal_mu: float = Field(0.01, ge=0, description="fedprox: the proximal term's weight mu.")
    server_learning_rate: float = Field(0.01, gt=0, description="fedadam: the server optimizer's step size (eta).")
    tau: float = Field(1e-3, gt=0, description="fedadam: adaptivity (the epsilon of the server's Adam).")
    send: Literal["lora"] = Field(
        "lora", description="What travels: the LoRA A and B matrices only; base weights never leave a machine."
    )
    differential_privacy: DifferentialPrivacy | None = Field(
        None, description="Clip each client's update and add Gaussian noise to the average; epsilon is reported."
    )
    secure_aggregation: bool = Field(
        False,
        description="SecAgg+ masking of client updates. Flower 1.42 offers it only in its legacy workflow API, "
        "which Wenmai's Message-API app cannot use; true is refused.",
    )
    round_timeout_s: float = Field(3600, gt=0, description="How long the server waits for a round's replies.")
    connect_timeout_s: float = Field(
        600, gt=0, description="Deployment: how long the server waits for every named client to connect."
    )
    clients: list[FederatedClient] = Field(..., min_length=1, description="The institutions, by name.")

    @field_validator("strategy", mode="before")
    @classmethod
    def _known_strategy(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in STRATEGIES:
            guess = difflib.get_close_matches(value, STRATEGIES, n=1, cutoff=0.6)
            hint = f"did you mean {guess[0]}? " if guess else ""
            raise ValueError(f"unknown strategy {value!r}; {hint}choose one of {', '.join(STRATEGIES)}")
        return value

    def names(self) -> list[str]:
        return [client.name for client in self.clients]

    def client(self, name: str) -> FederatedClient:
        """The client called `name`; a ValueError naming the known clients (with did-you-mean) otherwise."""
        for client in self.clients:
            if client.name == name:
                return client
        guess = difflib.get_close_matches(name, self.names(), n=1, cutoff=0.6)
        hint = f"did you mean {guess[0]}? " if guess else ""
        raise ValueError(f"unknown client {name!r}; {hint}the recipe's federated.clients are {', '.join(self.names())}")

    def required_clients(self) -> int:
        return self.min_clients or len(self.clients)

    def check(self) -> list[tuple[str, str]]:
        """Contradictions inside the section, and combinations Flower cannot run."""
        problems = []
        names = self.names()
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((f"clients[{i}].name", f"client {name!r} is listed twice; give each client one entry"))
        if self.min_clients and self.min_clients > len(self.clients):
            problems.append(
                ("min_clients", f"{self.min_clients} is more than the {len(self.clients)} clients listed in `clients`")
            )
        if self.strategy != "fedprox" and "proximal_mu" in self.model_fields_set:
            problems.append(("proximal_mu", f"applies to strategy fedprox, and strategy is {self.strategy}"))
        for key in ("server_learning_rate", "tau"):
            if self.strategy != "fedadam" and key in self.model_fields_set:
                problems.append((key, f"applies to strategy fedadam, and strategy is {self.strategy}"))
        dp = self.differential_privacy
        if dp is not None and self.strategy == "fedadam":
            problems.append(
                (
                    "differential_privacy",
                    "Flower's DP accounting needs FedAvg's aggregation (fedavg or fedprox); FedAdam's server "
                    "optimizer is not accounted. Use strategy fedavg or fedprox, or remove differential_privacy",
                )
            )
        if dp is not None and self.fraction < 1:
            problems.append(
                (
                    "fraction",
                    "with differential_privacy every client takes part in every round (Flower's fixed-clipping "
                    "accounting has no sampling amplification); set fraction: 1",
                )
            )
        if dp is not None and self.min_clients and self.min_clients != len(self.clients):
            problems.append(
                (
                    "min_clients",
                    "with differential_privacy every round needs exactly the clients it accounted for; "
                    "leave min_clients out (every client)",
                )
            )
        if self.secure_aggregation:
            why = "SecAgg+ with differential_privacy is not composable in Flower 1.42; " if dp is not None else ""
            problems.append(
                (
                    "secure_aggregation",
                    f"{why}Flower 1.42 runs SecAgg+ only in its legacy workflow API (SecAggPlusWorkflow), not with "
                    "the Message-API strategies Wenmai's app uses; set secure_aggregation: false (updates are "
                    "protected in transit by TLS, and DP bounds what the average reveals)",
                )
            )
        return problems
