"""Did federation help? The global adapter against each client's local-only adapter and against centralised training
on the pooled data, each evaluated on every client's held-out split (a simulation holds every client's data).

All start from the same seeded adapter the federation started from. A local-only adapter trains as many steps as
that client trained in the federation (rounds x local_steps); the centralised adapter trains as many steps as all
clients together (rounds x local_steps x clients) on the pooled training rows. The base model is the reference.
Written to `<stage>/comparison.json`; the report shows it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from finetune.adapters import ADAPTER_DIR
from finetune.config_io import load_run_recipe
from finetune.errors import WenmaiError
from finetune.federated.local import (
    LocalData,
    client_dataset,
    evaluate_state,
    federated_stage,
    load_local_data,
    train_round,
)
from finetune.federated.server import GlobalAdapter
from finetune.run_dir import RunDir, atomic_write_json

COMPARISON_FILE = "comparison.json"


def compare(run_dir: RunDir, log: Callable[[str], None] = print) -> dict:
    """Held-out loss per client of: the base, the global adapter, every local-only adapter, the centralised one."""
    from safetensors.torch import load_file

    recipe = load_run_recipe(run_dir).recipe
    section, options = recipe.federated, federated_stage(recipe)
    stage_dir = run_dir.root / options.stage_name
    final = stage_dir / ADAPTER_DIR / "adapter_model.safetensors"
    if not final.is_file():
        raise WenmaiError(f"{run_dir.root} has no global adapter yet ({final}); finish the federated run first")
    work = stage_dir / "comparison"
    steps = section.rounds * (section.local_steps or options.max_steps)
    start = GlobalAdapter(recipe, work / "start").state
    data = {c.name: load_local_data(recipe, client_dataset(recipe, c.name), work / c.name) for c in section.clients}
    if not all(d.eval_rows for d in data.values()):
        raise WenmaiError(f"stages: {options.stage_name} needs eval_fraction > 0: each client's held-out split")
    adapters = {"global": {k: v.float() for k, v in load_file(str(final)).items()}}
    for name, own in data.items():
        log(f"local-only adapter of {name}: {steps} steps")
        adapters[f"local:{name}"], _ = train_round(recipe, own, start, steps, options.seed, work / name)
    pooled = LocalData(
        next(iter(data.values())).tokenizer, [row for d in data.values() for row in d.train_rows], [], {}
    )
    log(f"centralised adapter on the pooled data: {steps * len(data)} steps")
    adapters["centralised"], _ = train_round(recipe, pooled, start, steps * len(data), options.seed, work / "pooled")
    losses: dict[str, dict[str, float | None]] = {}
    for name, own in data.items():
        losses[name] = {"base": evaluate_state(recipe, own, None, work / name)}
        for label, state in adapters.items():
            losses[name][label] = evaluate_state(recipe, own, state, work / name)
    result = {
        "steps_local": steps,
        "steps_centralised": steps * len(data),
        "held_out": {name: len(d.eval_rows) for name, d in data.items()},
        "eval_loss": losses,
        "mean": {label: _mean([row[label] for row in losses.values()]) for label in next(iter(losses.values()))},
    }
    atomic_write_json(stage_dir / COMPARISON_FILE, result)
    return result


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(sum(values) / len(values), 4) if values else None


def comparison_path(run_dir: RunDir, stage: str) -> Path:
    return run_dir.root / stage / COMPARISON_FILE
