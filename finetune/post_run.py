"""Adding stages to a run that has finished training: `wenmai merge RUN_DIR`, `wenmai export RUN_DIR`.

The stage is appended to the run's own recipe.yaml (or, if the recipe has it, its options are updated), so the
run folder keeps describing everything that was done to it; then only the requested stages run.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from finetune.config_io import load_resolved, load_run_recipe
from finetune.errors import WenmaiError
from finetune.gguf_export import GGUF_TYPES
from finetune.pipeline import Log, own_run_folder, run_stages
from finetune.recipe import wiring
from finetune.run_dir import RunDir, atomic_write_text, utc_now
from finetune.tracking import check_backends


def extend_run(
    run_dir_path: str | Path, stages: list[tuple[str, dict]], force: bool = False, log: Log = print
) -> RunDir:
    """Run `stages` ((kind, options) pairs) on a run folder; a done stage reruns only if its options changed or `force`.

    The folder is locked for the whole command (a second merge, export or resume on it is refused meanwhile)."""
    run_dir = RunDir.open(run_dir_path)
    with own_run_folder(run_dir, log):
        return _extend(run_dir, stages, force, log)


def _extend(run_dir: RunDir, stages: list[tuple[str, dict]], force: bool, log: Log) -> RunDir:
    data = yaml.safe_load(run_dir.recipe_path.read_text(encoding="utf-8"))
    targets, changed = [], set()
    for kind, options in stages:
        name = options.get("name") or kind
        changed |= {name} if _put_stage(data["stages"], kind, name, options, run_dir) else set()
        targets.append(name)
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    recipe = load_resolved(text, run_dir.recipe_path).recipe
    resolved, problems = wiring(recipe)
    if problems:
        raise WenmaiError(
            f"cannot add {', '.join(targets)} to {run_dir.root}:\n  - " + "\n  - ".join(map(str, problems))
        )
    for name in targets:
        for field, source in resolved[name].items():
            status = run_dir.status(source)
            if source not in targets and (status is None or status.state != "done"):
                state = status.state if status else "not started"
                raise WenmaiError(
                    f"cannot run {name} on {run_dir.root}: its `{field}` comes from stage '{source}', which has not "
                    f"finished ({state}); finish it first with `wenmai run --resume {run_dir.root}`"
                )
    problems = check_backends(recipe.tracking)
    if problems:
        raise WenmaiError("\n".join(problems))
    if changed:
        atomic_write_text(run_dir.recipe_path, text)
    for name in targets:
        status = run_dir.status(name)
        if status is not None and status.state == "done" and (force or name in changed):
            status.state, status.finished, status.error = "failed", utc_now(), "rerun requested"
            run_dir.write_status(status)
        elif status is not None and status.state == "done":
            log(f"{name}: done already (use --force to redo it)")
    return run_stages(recipe, run_dir, log, only=set(targets))


def _put_stage(items: list, kind: str, name: str, options: dict, run_dir: RunDir) -> bool:
    """Append the stage, or update the options of the one with that name; True if the recipe changed."""
    for item in items:
        item_kind, body = next(iter(item.items()))
        if ((body or {}).get("name") or item_kind) != name:
            continue
        if item_kind != kind:
            raise WenmaiError(
                f"stage '{name}' of {run_dir.root} is a {item_kind} stage, not {kind}; name yours with --name"
            )
        body = dict(body or {})
        updates = {k: v for k, v in options.items() if body.get(k) != v}
        body.update(updates)
        item[kind] = body
        return bool(updates)
    items.append({kind: dict(options)})
    return True


def producer_of(run_dir: RunDir, output: str, exclude_kind: str | None = None) -> str | None:
    """The latest stage of the run's recipe that produces `output` (adapter, model, ...), if any."""

    recipe = load_run_recipe(run_dir).recipe
    names = [c.stage_name for c in recipe.stage_configs() if output in c.produces and c.kind != exclude_kind]
    return names[-1] if names else None


def export_stages(
    run_dir_path: str | Path, formats: str | None, gguf_types: str | None, name: str = "export"
) -> list[tuple[str, dict]]:
    """The stages `wenmai export` runs: a merge first when the run has none, then the export with these options."""

    options: dict = {} if name == "export" else {"name": name}
    if formats is not None:
        options["formats"] = _choices("--format", formats, ("hf", "gguf"))
    if gguf_types is not None:
        options["gguf_types"] = _choices("--gguf-types", gguf_types, GGUF_TYPES)
        options.setdefault("formats", ["hf", "gguf"])
    run_dir = RunDir.open(run_dir_path)
    producer = producer_of(run_dir, "model", exclude_kind="export")
    return ([] if producer else [("merge", {})]) + [("export", options)]


def _choices(flag: str, text: str, allowed: tuple[str, ...]) -> list[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise WenmaiError(
            f"{flag}: unknown value {', '.join(map(repr, unknown)) or '(empty)'}; choose from {', '.join(allowed)}"
        )
    return list(dict.fromkeys(values))
