"""`wenmai iterate`: the next LoRA round of a finished run, trained on a review session's cleaned feedback and
gated against its parent.

    rounds.iterate("runs/museum-...", "review.db", "visitors-r1")   # -> runs/museum-round2-<UTC time>/

The round is an ordinary run folder made from the parent's recipe: its base model is the parent's merged model
(the parent is merged first when it was not), its datasets are the session (`format: review`, pinned to the
time the round starts), its stages are whichever the feedback holds data for (sft on corrections, a reward
refresh on ratings, dpo on A/B pairs), then the parent's `evaluate` stage with the parent as baseline, judged by
the parent's reward model, and gates that refuse any drop beyond the tolerance; merge and export only after the
gate passes. Its recipe and lineage name the parent and the round number.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import yaml

from finetune.config_io import load_recipe, load_resolved, load_run_recipe
from finetune.errors import WenmaiError
from finetune.pipeline import start
from finetune.post_run import extend_run
from finetune.recipe import Recipe
from finetune.recipe.review import ReviewCleaning
from finetune.review.records import session_records
from finetune.review.store import ReviewStore
from finetune.run_dir import RECIPE_FILE, RunDir

Log = Callable[[str], None]
POLICY_KINDS = ("sft", "dpo", "kto", "orpo", "rlhf")
FEEDBACK = {"chat": "feedback_chat", "ratings": "feedback_ratings", "pairs": "feedback_pairs"}


def iterate(
    parent: str | Path,
    db: str | Path,
    session: str,
    recipe_path: str | Path | None = None,
    run_dir: str | Path | None = None,
    reward_tolerance: float = 0.0,
    mc_tolerance: float | None = None,
    cleaning: ReviewCleaning | None = None,
    rights: dict | None = None,
    log: Log = print,
) -> RunDir:
    """Train, evaluate against the parent, and (when no gate fails) merge and export the next round.

    `rights` ({licence, rights_holder, source}) are the feedback's defaults where the session names none (the
    recipe's data policy decides whether feedback without a licence may train).
    """
    parent_dir = RunDir.open(parent)
    parent_recipe = load_run_recipe(parent_dir).recipe
    _check_finished(parent_dir, parent_recipe)
    recipe = load_recipe(recipe_path).recipe if recipe_path else parent_recipe
    _check_same_model(recipe, parent_recipe, recipe_path)
    counts = _feedback_counts(db, session, cleaning or ReviewCleaning(), log)
    evaluate = _parent_stage(recipe, "evaluate")
    if evaluate is None:
        raise WenmaiError(
            f"{recipe_path or parent_dir.recipe_path} has no evaluate stage: a round is only exported when it is "
            "no worse than its parent, so give --recipe with an evaluate stage (mc: and/or suite:)"
        )
    base = _merged_model(parent_dir, parent_recipe, log)
    number = (parent_recipe.round.number if parent_recipe.round else 1) + 1
    data = _child_recipe(recipe, parent_dir, parent_recipe, base, db, session, counts, number, rights)
    _gate_against_parent(data, evaluate, parent_dir, parent_recipe, reward_tolerance, mc_tolerance)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = Path(run_dir) if run_dir else Path(recipe.output.root) / f"{recipe.name}-round{number}-{stamp}"
    loaded = load_resolved(text, folder / RECIPE_FILE)
    trained = ", ".join(f"{kind} {n}" for kind, n in counts.items() if n) or "nothing"
    log(f"round {number} of {parent_dir.root}: feedback records {trained}; base {base}")
    return start(loaded, folder, log=log)


def _check_finished(run_dir: RunDir, recipe: Recipe) -> None:
    unfinished = [
        c.stage_name for c in recipe.stage_configs() if (s := run_dir.status(c.stage_name)) is None or s.state != "done"
    ]
    if unfinished:
        raise WenmaiError(
            f"the parent run {run_dir.root} has not finished ({', '.join(unfinished)} not done); "
            f"finish it first (wenmai run --resume {run_dir.root})"
        )


def _check_same_model(recipe: Recipe, parent: Recipe, recipe_path: str | Path | None) -> None:
    ours = (recipe.model.path, recipe.model.gguf_file)
    theirs = (parent.model.path, parent.model.gguf_file)
    if ours != theirs:
        raise WenmaiError(
            f"{recipe_path}: model.path is {recipe.model.path!r} but the parent run was trained on "
            f"{parent.model.path!r}; a round continues its parent's model: use the parent's model section"
        )


def _feedback_counts(db: str | Path, session: str, cleaning: ReviewCleaning, log: Log) -> dict[str, int]:
    """Records of each kind the session gives after cleaning (ratings only when they can refresh a reward model);
    refuses a session with none."""
    store = ReviewStore.open(db, must_exist=True)
    try:
        found = session_records(store, session, cleaning)
    finally:
        store.close()
    counts = {kind: len(rows) for kind, rows in found.records.items()}
    responses: dict[str, set[str]] = {}
    for _, record in found.records["ratings"]:
        responses.setdefault(json.dumps(record["prompt"], ensure_ascii=False), set()).add(record["response"])
    if counts["ratings"] and not any(len(answers) > 1 for answers in responses.values()):
        log(
            f"{counts['ratings']} ratings left out: a reward model learns from two or more rated answers to the "
            "same prompt, and every prompt of this session has one (create A/B sessions with --against)"
        )
        counts["ratings"] = 0
    if not any(counts.values()):
        held = len(found.cleaning.held_back)
        raise WenmaiError(
            f"review session {session!r} gives nothing to train on (no kept reviews"
            + (f"; {held} items held back by cleaning" if held else "")
            + "): review items first (wenmai review serve) or export it to see the cleaning report"
        )
    return counts


def _merged_model(run_dir: RunDir, recipe: Recipe, log: Log) -> str:
    """The parent's merged model folder; the parent's final adapter is merged first when it was not."""
    for config in reversed(recipe.stage_configs()):
        if config.kind == "merge":
            return str(run_dir.output(config.stage_name, "model"))
    final = next((c.stage_name for c in reversed(recipe.stage_configs()) if c.kind in POLICY_KINDS), None)
    if final is None:
        raise WenmaiError(f"the parent run {run_dir.root} trained no adapter; a round continues a trained model")
    log(f"merging the parent's final adapter ({final}) first: wenmai merge {run_dir.root} --adapter {final}")
    extend_run(run_dir.root, [("merge", {"adapter": final})], log=log)
    return str(RunDir.open(run_dir.root).output("merge", "model"))


def _child_recipe(
    recipe: Recipe,
    parent_dir: RunDir,
    parent: Recipe,
    base: str,
    db: str | Path,
    session: str,
    counts: dict[str, int],
    number: int,
    rights: dict | None = None,
) -> dict:
    """The round's recipe: the parent's, on the merged model, with the feedback datasets and stages."""
    data = recipe.model_dump(mode="json", exclude_none=True)
    data["model"].update(path=base)
    data["model"].pop("gguf_file", None)
    # the parent's rules carry over: its data policy, and its counterfactual augmentation (for the feedback's chat
    # set: the datasets the parent's `augment` named are not in this round)
    data["data"] = {key: data["data"][key] for key in ("policy", "augment") if key in data["data"]}
    data["data"].get("augment", {}).pop("datasets", None)
    db_text = str(Path(db).resolve()) if "://" not in str(db) else str(db)
    stages: list[dict] = []
    for kind, dataset in FEEDBACK.items():
        if counts.get(kind):
            data["data"][dataset] = {"format": "review", "db": db_text, "session": session, "records": kind}
            if rights:
                data["data"][dataset]["defaults"] = {k: v for k, v in rights.items() if v is not None}
    if counts.get("chat"):
        stages.append({"sft": _options(recipe, "sft", dataset=FEEDBACK["chat"], name="sft")})
    if counts.get("ratings"):
        stages.append({"reward": _options(recipe, "reward", dataset=FEEDBACK["ratings"], name="reward")})
    if counts.get("pairs"):
        policy = "sft" if counts.get("chat") else "base"
        stages.append({"dpo": _options(recipe, "dpo", dataset=FEEDBACK["pairs"], name="dpo", policy=policy)})
    policies = [next(iter(s)) for s in stages if next(iter(s)) in POLICY_KINDS]
    if policies:
        stages.append({"evaluate": {"name": "evaluate", "model": policies[-1]}})
        stages.append({"merge": {"name": "merge", "adapter": policies[-1]}})
        export = _parent_stage(recipe, "export")
        if export is not None:
            stages.append({"export": _dump(export) | {"name": "export"}})
    data["stages"] = stages
    data["round"] = {"parent": str(parent_dir.root.resolve()), "number": number, "feedback": f"{db_text}#{session}"}
    return data


def _gate_against_parent(
    data: dict, evaluate, parent_dir: RunDir, parent: Recipe, reward_tolerance: float, mc_tolerance: float | None
) -> None:
    """The parent's evaluate options, with the parent (the round's base) as baseline, its reward model as judge."""
    for entry in data["stages"]:
        if "evaluate" not in entry:
            continue
        options = _dump(evaluate) | entry["evaluate"]
        options["baseline"] = "base"  # the round's base model is the parent's merged model
        options.pop("reward_model", None)
        gates = dict(options.get("gates") or {})
        if options.get("mc"):
            gates["mc_subject_max_drop"] = (
                mc_tolerance
                if mc_tolerance is not None
                else gates.get("mc_subject_max_drop", gates.get("mc_max_drop", 0.0))
            )
        judge = _parent_stage(parent, "reward")
        if options.get("suite") and judge is not None:
            options["judge"] = str(parent_dir.root / judge.stage_name)
            gates["reward_max_drop"] = reward_tolerance
        options["gates"] = gates
        entry["evaluate"] = options


def _options(recipe: Recipe, kind: str, **fixed) -> dict:
    """The recipe's options for a stage of this kind (its first), with the round's dataset and wiring."""
    found = _parent_stage(recipe, kind)
    options = _dump(found) if found is not None else {}
    for key in ("dataset", "eval_dataset", "policy", "reward_model", "name"):
        options.pop(key, None)
    return options | {"eval_fraction": 0} | fixed  # feedback is small: every record trains


def _dump(config) -> dict:
    return config.model_dump(mode="json", exclude_none=True)


def _parent_stage(recipe: Recipe, kind: str):
    return next((c for c in recipe.stage_configs() if c.kind == kind), None)
