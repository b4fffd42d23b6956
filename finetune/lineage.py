"""`lineage.json`: what went into a run (recipe, model, data files, package versions, code) and what each stage made.

It is rewritten after every stage, and each write looks at the inputs again: a data file that changed after a
finished stage read it stops the run (the lineage could no longer say what that stage trained on); one that only
stages still to run will read is recorded as a change. Package versions and the code's git commit are read again too,
so a resume under other versions shows; a local model folder gets a combined sha256, re-hashed only for files whose
size or modification time changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel, Field

import finetune
from finetune.errors import WenmaiError
from finetune.model import resolve_source
from finetune.recipe import DatasetSection, Recipe, stage_datasets, used_datasets
from finetune.recipe.secrets import redact, redact_data, secrets_of
from finetune.run_dir import RunDir, atomic_write_json, sha256_file, utc_now

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "deepspeed",
    "liger-kernel",
)
# The files of a model folder that `from_pretrained` reads: config, tokenizer, weights, custom code. Only the top
# level: a hub snapshot's `original/` holds a second copy of the weights that nothing here loads.
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".jinja", ".tiktoken", ".py")

Log = Callable[[str], None]


class StageLineage(BaseModel):
    name: str
    kind: str
    state: str
    inputs: dict[str, str] = Field(default_factory=dict)  # input field -> stage name
    outputs: dict[str, str] = Field(default_factory=dict)  # output kind -> path relative to the run folder
    started: str | None = None
    finished: str | None = None
    gate: dict | None = None  # an evaluate stage's gate: passed, forced (wenmai run --force), failed gates
    used: dict | None = None  # what a stage started from: the policy adapter (path, sha256), the reward model


class Lineage(BaseModel):
    """What went into a run and what each stage made of it."""

    run: str
    recipe: str
    created: str
    updated: str
    wenmai_version: str
    git_commit: str | None  # of the checkout the `finetune` package runs from; None when it is not a git checkout
    git_commit_at_start: str | None = None  # set only when a resume runs other code than the run started with
    packages: dict[str, str]  # the versions of the latest write (a resume may run under others)
    packages_at_start: dict[str, str] | None = None  # set only when they differ from `packages`
    model: dict  # a local folder's `sha256` combines its files' (listed under `files` with size and mtime)
    data: dict[str, dict]  # a file changed before the stages reading it ran lists its new hashes under `changes`
    stages: list[StageLineage]
    round: dict | None = None  # a `wenmai iterate` round: its parent run, number and feedback


def write_lineage(recipe: Recipe, run_dir: RunDir, log: Log | None = None) -> None:
    """(Re)write lineage.json from the recipe, the input files, and every stage's status.

    Raises `WenmaiError` when a data file changed after a finished stage read it; `log` gets a line for each change
    that is recorded instead. Values that came from `${env:...}` are written, and said, as their reference.
    """
    secrets = secrets_of(recipe)
    say = log or (lambda line: None)

    def log(line: str) -> None:
        say(redact(line, secrets))

    previous = {}
    if run_dir.lineage_path.is_file():
        try:
            previous = Lineage.model_validate_json(run_dir.lineage_path.read_text(encoding="utf-8")).model_dump()
        except (ValueError, OSError) as err:  # pydantic's ValidationError is a ValueError
            raise WenmaiError(
                f"{run_dir.lineage_path} is damaged ({str(err).splitlines()[0]}); restore it from a copy, or move it "
                "aside: a new one is written from the stage statuses, without the hashes taken when the run started"
            ) from None
    stages = []
    for config in recipe.stage_configs():
        status = run_dir.status(config.stage_name)
        stages.append(
            StageLineage(
                name=config.stage_name,
                kind=config.kind,
                state=status.state if status else "pending",
                inputs=status.inputs if status else {},
                outputs={k: f"{config.stage_name}/{v}" for k, v in (status.outputs if status else {}).items()},
                started=status.started if status else None,
                finished=status.finished if status else None,
                gate=status.summary.get("gate") if status else None,
                used=status.summary.get("used") if status else None,
            )
        )
    data = _data_lineage(recipe, stages, previous.get("data") or {}, run_dir, log)
    git_commit = _git_commit()
    packages = package_versions()
    lineage = Lineage(
        run=run_dir.name,
        recipe=recipe.name,
        created=previous.get("created") or utc_now(),
        updated=utc_now(),
        wenmai_version=finetune.__version__,
        git_commit=git_commit,
        git_commit_at_start=_first_if_different(previous, "git_commit", git_commit),
        packages=packages,
        packages_at_start=_first_if_different(previous, "packages", packages),
        model=_model_lineage(recipe, previous.get("model") or {}, log),
        data=data,
        stages=stages,
        round=recipe.round.model_dump() if recipe.round is not None else None,
    )
    atomic_write_json(run_dir.lineage_path, redact_data(lineage.model_dump(), secrets))


def _first_if_different(previous: dict, key: str, current: object) -> object:
    """The value `key` had when the run started, once it differs from `current` (None before it ever did)."""
    if not previous:
        return None
    first = previous.get(f"{key}_at_start") or previous.get(key)
    return first if first != current else None


def _data_lineage(recipe: Recipe, stages: list[StageLineage], previous: dict, run_dir: RunDir, log: Log) -> dict:
    """Each used dataset's entry, hashed again; a change is refused (a finished stage read the file) or recorded."""
    states = {s.name: s.state for s in stages}
    data = {}
    for name in used_datasets(recipe):
        section = recipe.data[name]
        entry = previous.get(name)
        if entry is None or section.format == "review":  # a review dataset is pinned by `as_of`, not by a hash
            data[name] = entry or _dataset_lineage(section)
            continue
        path = Path(section.path)
        if not path.is_file():  # the stage that reads it says so; nothing new to record
            data[name] = entry
            continue
        latest = (entry.get("changes") or [entry])[-1]
        current = _hashed_files(path.parent, [path], {path.name: latest})[path.name]  # unchanged size+time: no re-read
        if current["sha256"] != latest.get("sha256"):
            configs = recipe.stage_configs()
            readers = [c.stage_name for c in configs if states[c.stage_name] == "done" and name in stage_datasets(c)]
            if readers:
                message = _changed_message(name, path, latest["sha256"], current["sha256"], readers, run_dir)
                raise WenmaiError(redact(message, secrets_of(recipe)))
            entry = {**entry, "changes": [*entry.get("changes", []), {**current, "seen": utc_now()}]}
            log(
                f"data '{name}' ({path}) changed since the run started (sha256 {latest['sha256'][:12]} -> "
                f"{current['sha256'][:12]}); no finished stage read it, so the stages still to run read the new "
                "file: recorded in lineage.json"
            )
        data[name] = entry
    return data


def _changed_message(name: str, path: Path, old: str, new: str, readers: list[str], run_dir: RunDir) -> str:
    return (
        f"data '{name}': {path} changed after finished stage(s) {', '.join(readers)} read it "
        f"(sha256 {old[:12]} then, {new[:12]} now); resuming would train on records the lineage does not describe. "
        f"Restore the file as it was and resume {run_dir.root} again, or start a new run with the changed file"
    )


def _model_lineage(recipe: Recipe, previous: dict, log: Log) -> dict:
    info = {
        "path": recipe.model.path,
        "revision": recipe.model.revision,
        "dtype": recipe.model.dtype,
        "quantization": recipe.model.quantization,
    }
    source = resolve_source(recipe.model, convert=False)
    info.update(source.describe())
    if source.gguf_path is not None:
        files = _hashed_files(source.gguf_path.parent, [source.gguf_path], previous.get("gguf_files") or {})
        info["gguf_sha256"], info["gguf_files"] = files[source.gguf_path.name]["sha256"], files
    elif source.is_local and not recipe.model.path.startswith("pkg:"):
        folder = Path(source.location)
        files = _hashed_files(folder, _model_files(folder), previous.get("files") or {})
        info["sha256"], info["files"] = _combined_sha256(files), files
        changes = list(previous.get("changes") or [])
        latest = (changes or [previous])[-1].get("sha256")
        if latest and latest != info["sha256"]:  # the base model's files changed between writes of this run
            changes.append({"sha256": info["sha256"], "seen": utc_now()})
            log(f"model folder {folder} changed since the run started (sha256 {latest[:12]} -> {info['sha256'][:12]})")
            info["sha256"] = previous["sha256"]  # the entry keeps what the run started with, like a data file's
        if changes:
            info["changes"] = changes
    return info


def _model_files(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES
    )


def _hashed_files(folder: Path, paths: list[Path], previous: dict) -> dict[str, dict]:
    """Each file's size, mtime and sha256; the previous sha256 is reused while size and mtime are unchanged, so a
    resume does not read gigabytes of weights again."""
    files = {}
    for path in paths:
        stat = path.stat()
        known = previous.get(str(path.relative_to(folder)), {})
        unchanged = known.get("bytes") == stat.st_size and known.get("mtime_ns") == stat.st_mtime_ns
        digest = known["sha256"] if unchanged and known.get("sha256") else sha256_file(path)
        files[str(path.relative_to(folder))] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    return dict(sorted(files.items()))


def _combined_sha256(files: dict[str, dict]) -> str:
    """One hash over the sorted `<sha256>  <relative path>` lines (what `sha256sum` would print for the folder)."""
    listing = "".join(f"{f['sha256']}  {name}\n" for name, f in sorted(files.items()))
    return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def _dataset_lineage(section: DatasetSection) -> dict:
    if section.format == "review":  # the store changes as reviews arrive: the data card counts what was read
        return {
            "review": section.location,
            "session": section.session,
            "format": section.record_format,
            "as_of": section.as_of.isoformat() if section.as_of else None,
        }
    path = Path(section.path)
    return {"path": str(path), "format": section.format, **_hashed_files(path.parent, [path], {})[path.name]}


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Python's version and each installed package's of `names` (one not installed is left out)."""
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def _git_commit() -> str | None:
    """The commit of the checkout the `finetune` package is imported from (`+dirty` with uncommitted changes); None
    for an installed package, even one in a virtual environment inside some other git repository."""
    package = Path(finetune.__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True, text=True, timeout=5)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:  # not tracked: not our checkout
            return None
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain").stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
