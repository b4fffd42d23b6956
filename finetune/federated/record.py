"""A federated run's lineage and report: the clients and rounds by name, never their data.

`lineage.json` has the fields of every run's lineage (`finetune.lineage.Lineage`) with `data` empty (the server
never sees a client's files, not even their hashes) and a `federated` block: strategy, privacy, and per round the
clients that took part with their example counts and the global adapter's sha256.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import finetune
from finetune.adapters import adapter_digest
from finetune.config_io import load_run_recipe
from finetune.federated.local import federated_stage
from finetune.federated.server import read_state, round_dir
from finetune.lineage import TRACKED_PACKAGES, Lineage, StageLineage, package_versions
from finetune.recipe.secrets import redact_data, secrets_of
from finetune.report import write_report
from finetune.run_dir import RunDir, atomic_write_json, utc_now


def finish_run(run_dir: RunDir, log: Callable[[str], None]) -> None:
    """Write lineage.json and report.html after the rounds (finished or stopped)."""
    write_federated_lineage(run_dir)
    try:
        log(f"report: {write_report(run_dir)}")
    except Exception as err:  # the report is a view: the run's own outcome stands
        log(f"report not written ({type(err).__name__}: {err}); retry with `wenmai report {run_dir.root}`")


def write_federated_lineage(run_dir: RunDir) -> None:
    recipe = load_run_recipe(run_dir).recipe
    options = federated_stage(recipe)
    stage_dir = run_dir.root / options.stage_name
    status = run_dir.status(options.stage_name)
    state = read_state(stage_dir) if stage_dir.is_dir() else {"rounds": []}
    previous = {}
    if run_dir.lineage_path.is_file():
        previous = json.loads(run_dir.lineage_path.read_text(encoding="utf-8"))
    section = recipe.federated
    lineage = Lineage(
        run=run_dir.name,
        recipe=recipe.name,
        created=previous.get("created") or utc_now(),
        updated=utc_now(),
        wenmai_version=finetune.__version__,
        git_commit=None,
        packages=package_versions((*TRACKED_PACKAGES, "flwr")),
        # a model path given as ${env:...} is written as the reference (finetune.recipe.secrets)
        model=redact_data(
            {"path": recipe.model.path, "revision": recipe.model.revision, "gguf_file": recipe.model.gguf_file},
            secrets_of(recipe),
        ),
        data={},
        stages=[
            StageLineage(
                name=options.stage_name,
                kind="sft",
                state=status.state if status else "pending",
                outputs={k: f"{options.stage_name}/{v}" for k, v in (status.outputs if status else {}).items()},
                started=status.started if status else None,
                finished=status.finished if status else None,
            )
        ],
    ).model_dump()
    lineage["federated"] = {
        "strategy": section.strategy,
        "clients": section.names(),
        "differential_privacy": section.differential_privacy.model_dump() if section.differential_privacy else None,
        "rounds": [
            {
                "round": r["round"],
                "clients": {name: {"examples": c.get("examples")} for name, c in r["clients"].items()},
                "adapter_sha256": adapter_digest(round_dir(stage_dir, r["round"])),
                **({"epsilon": r["epsilon"]} if "epsilon" in r else {}),
            }
            for r in state["rounds"]
        ],
    }
    atomic_write_json(run_dir.lineage_path, lineage)
