"""What runs on a client's machine: its own data through the data layer, a round of local SFT, evaluation.

Local training is the `sft` stage's own trainer (`finetune.stages.sft.build_trainer`: same model loading, adapter,
trainer arguments and speed plan) started from the global LoRA tensors, for `steps` optimizer steps. With FedProx the
trainer's loss gets the proximal term (mu/2)·|w - w_global|² over the LoRA tensors (Flower only sends mu).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune import model as model_path
from finetune.data import tokenize_records
from finetune.errors import WenmaiError
from finetune.federated.lora import is_lora_tensor, load_lora_state, lora_state
from finetune.recipe import Recipe, SftOptions
from finetune.stages.sft import build_trainer

SERVER_SIDE = "the server's adapter"
CLIENT_SIDE = "this client's recipe (model and lora sections)"


@dataclass
class LocalData:
    """A client's tokenized records: what trains, what is held out, and the data layer's counts."""

    tokenizer: Any
    train_rows: list[dict]
    eval_rows: list[dict]
    stats: dict = field(default_factory=dict)


def federated_stage(recipe: Recipe) -> SftOptions:
    """The sft stage whose options train every client (`federated.stage`, or the first sft stage)."""
    wanted = recipe.federated.stage if recipe.federated else None
    for config in recipe.stage_configs():
        if config.kind == "sft" and (wanted is None or config.stage_name == wanted):
            return config
    raise WenmaiError("federated training needs an sft stage in `stages` (its options train each client)")


def client_dataset(recipe: Recipe, name: str) -> str:
    """The dataset client `name` trains on: its entry's `dataset`, else the federated stage's dataset."""
    try:
        client = recipe.federated.client(name)
    except ValueError as err:
        raise WenmaiError(f"federated.clients: {err}") from None
    dataset = client.dataset or federated_stage(recipe).dataset
    if dataset is None:
        raise WenmaiError(
            f"client {name!r} has no data in this recipe: give its federated.clients entry a `dataset` naming an entry "
            "of `data` (each institution's own recipe names its own records; the server's recipe may leave it out)"
        )
    return dataset


def load_local_data(recipe: Recipe, dataset: str, folder: Path) -> LocalData:
    """The client's dataset through the data layer (policy, PII, dedup; data card and register into `folder`),
    tokenized, with the stage's `eval_fraction` held out (same seed, same split every round)."""
    from datasets import Dataset

    options = federated_stage(recipe)
    tokenizer = model_path.load_tokenizer(recipe.model, model_path.resolve_source(recipe.model))
    folder.mkdir(parents=True, exist_ok=True)
    tokenized = tokenize_records(
        recipe, dataset, tokenizer, options.seq_len, options.loss_on == "assistant", stage_dir=folder
    )
    rows, held_out = tokenized.rows, []
    if options.eval_fraction and len(rows) > 1:
        split = Dataset.from_list(rows).train_test_split(test_size=options.eval_fraction, seed=options.seed)
        rows, held_out = split["train"].to_list(), split["test"].to_list()
    if not rows:
        raise WenmaiError(f"dataset {dataset!r} has no records left to train on after the data layer")
    return LocalData(tokenizer, rows, held_out, tokenized.stats)


def train_round(
    recipe: Recipe,
    data: LocalData,
    global_state: dict[str, Any],
    steps: int,
    seed: int,
    folder: Path,
    proximal_mu: float = 0.0,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Train the global adapter `steps` steps on the client's rows; the new LoRA tensors and the round's metrics."""
    options = federated_stage(recipe)
    trainer = _trainer(recipe, options.model_copy(update={"max_steps": steps}), data, None, folder, seed)
    load_lora_state(trainer.model, global_state, SERVER_SIDE, CLIENT_SIDE)
    if proximal_mu > 0:
        add_proximal_term(trainer, proximal_mu)
    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    metrics = {"train-loss": float(sum(losses) / len(losses)) if losses else 0.0, "steps": trainer.state.global_step}
    return lora_state(trainer.model), metrics


def evaluate_state(recipe: Recipe, data: LocalData, state: dict[str, Any] | None, folder: Path) -> float | None:
    """Held-out loss of an adapter (LoRA tensors; None: a fresh adapter, i.e. the base) on the client's held-out rows."""
    if not data.eval_rows:
        return None
    options = federated_stage(recipe)
    trainer = _trainer(recipe, options, data, data.eval_rows, folder, options.seed)
    if state is not None:
        load_lora_state(trainer.model, state, SERVER_SIDE, CLIENT_SIDE)
    return float(trainer.evaluate()["eval_loss"])


def add_proximal_term(trainer: Any, mu: float) -> None:
    """FedProx: add (mu/2)·Σ|w - w_global|² over the LoRA tensors to the trainer's loss (w_global: as received)."""
    pairs = [
        (p, p.detach().clone()) for n, p in trainer.model.named_parameters() if p.requires_grad and is_lora_tensor(n)
    ]
    compute_loss = trainer.compute_loss

    def with_proximal_term(model, inputs, return_outputs=False, **kwargs):
        result = compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        loss, outputs = result if return_outputs else (result, None)
        proximal = sum(((p - g) ** 2).sum() for p, g in pairs)
        loss = loss + (mu / 2) * proximal
        return (loss, outputs) if return_outputs else loss

    trainer.compute_loss = with_proximal_term


def _trainer(
    recipe: Recipe, options: SftOptions, data: LocalData, eval_rows: list[dict] | None, folder: Path, seed: int
) -> Any:
    """The sft stage's trainer for one local round: no checkpoints, no dashboards, nothing written but the data card."""
    trainer, _ = build_trainer(
        recipe,
        options,
        data.tokenizer,
        data.train_rows,
        eval_rows,
        folder,
        folder.name,
        [],
        save_strategy="no",
        report_to="none",
        eval_strategy="no",
        eval_on_start=False,
        seed=seed,
        data_seed=seed,
        disable_tqdm=True,
    )
    return trainer
