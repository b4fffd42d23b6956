"""The run folder: its layout, its lock, atomic writes, stage status and metrics, and what a stage receives and returns.

Nothing else builds these paths: a stage's folder, checkpoints, metrics, status and the files every
training stage leaves are named here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TextIO

from pydantic import BaseModel, Field

from finetune.errors import WenmaiError

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked there
    fcntl = None

if TYPE_CHECKING:
    from finetune.recipe import Recipe

RECIPE_FILE = "recipe.yaml"
LINEAGE_FILE = "lineage.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
DATA_CARD_FILE = "data_card.md"
REGISTER_FILE = "sensitive_register.jsonl"
LOCK_FILE = ".lock"

# What atomic_open / atomic_dir leave when a kill stops them: `.<name>.<8 characters of tempfile's>.tmp`
# (mkstemp / mkdtemp with the prefix and suffix below), and `.<name>.old` (the replaced folder, once the new
# one is in place). Nothing else in a run folder is ever removed as a leftover.
TEMP_SUFFIX = ".tmp"
TEMP_NAME = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp")
OLD_NAME = re.compile(r"\.(?P<name>.+)\.old")
_UMASK_LOCK = threading.Lock()  # the one piece of module state: it serialises current_umask's fallback


class StageStatus(BaseModel):
    """A stage's `status.json`: its state, its inputs, and its typed outputs (paths inside its folder)."""

    name: str
    kind: str
    state: Literal["running", "done", "failed"]
    started: str
    finished: str | None = None
    inputs: dict[str, str] = Field(default_factory=dict)  # input field -> stage name
    outputs: dict[str, str] = Field(default_factory=dict)  # output kind -> relative path
    summary: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    attempts: int = 1


def utc_now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class RunDir:
    """One run: `runs/<name>-<UTC time>/` with recipe.yaml, lineage.json and a folder per stage."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def create(cls, output_root: str | Path, recipe_name: str, path: str | Path | None = None) -> RunDir:
        """Make a new run folder; refuse one that exists (resume it or pick a new name)."""
        root = Path(path) if path else cls.default_path(output_root, recipe_name)
        if root.exists():
            raise WenmaiError(
                f"run folder {root} already exists; continue it with `wenmai run --resume {root}`, "
                "or choose another folder with `--run-dir`"
            )
        try:
            root.mkdir(parents=True)
        except FileExistsError:  # another `wenmai run` made it a moment ago
            raise WenmaiError(f"run folder {root} already exists; choose another folder with `--run-dir`") from None
        return cls(root)

    @staticmethod
    def default_path(output_root: str | Path, recipe_name: str) -> Path:
        """`<output.root>/<name>-<UTC time>`: the folder a new run gets unless one is given."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        return Path(output_root) / f"{recipe_name}-{stamp}"

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run folder (to resume, merge, export or report)."""
        root = Path(path)
        if not (root / RECIPE_FILE).is_file():
            raise WenmaiError(
                f"{root} is not a Wenmai run folder (no {RECIPE_FILE}); give the folder that `wenmai run` created"
            )
        return cls(root)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def recipe_path(self) -> Path:
        return self.root / RECIPE_FILE

    @property
    def lineage_path(self) -> Path:
        return self.root / LINEAGE_FILE

    @contextlib.contextmanager
    def lock(self, log: Callable[[str], None] | None = None) -> Iterator[None]:
        """Hold the run folder for this process, or refuse (`WenmaiError`, naming the holder) when another has it.

        An OS lock (`flock`) on `<run>/.lock`: it ends with the process that holds it, even after a kill -9,
        so there is never a stale lock to delete. The file says who holds it (pid, host, start time) for the
        message another process shows. A file system without locks (some network mounts) runs unlocked, with a
        warning through `log`.
        """
        path = self.root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)  # the umask applies
        try:
            if not _try_lock(fd, path, log):
                raise WenmaiError(_held_message(self.root, path))
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": utc_now()}
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(holder).encode())
            try:
                yield
            finally:
                os.ftruncate(fd, 0)  # a later reader never names a process that has let go
        finally:
            os.close(fd)  # closing the only descriptor releases the lock

    def remove_leftovers(self) -> list[Path]:
        """Remove what killed atomic writes left in the run folder and its stage folders; returns what was removed.

        Only the names `atomic_open` and `atomic_dir` give their temporary files and folders are touched, and only
        while no other process writes the folder: call it holding `lock()`.
        """
        folders = [self.root] + sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        removed = []
        for folder in folders:
            for path in sorted(folder.iterdir()):
                if not _is_leftover(path):
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed.append(path)
        return removed

    def stage_dir(self, stage: str) -> Path:
        path = self.root / stage
        path.mkdir(exist_ok=True)
        return path

    def metrics_path(self, stage: str) -> Path:
        return self.stage_dir(stage) / METRICS_FILE

    def checkpoints_dir(self, stage: str) -> Path:
        return self.stage_dir(stage) / CHECKPOINTS_DIR

    def status(self, stage: str) -> StageStatus | None:
        path = self.root / stage / STATUS_FILE
        if not path.is_file():
            return None
        try:
            return StageStatus.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise WenmaiError(f"{path} is damaged ({err}); delete it to rerun the stage '{stage}'") from None

    def write_status(self, status: StageStatus) -> None:
        atomic_write_text(self.stage_dir(status.name) / STATUS_FILE, status.model_dump_json(indent=2))

    def output(self, stage: str, kind: str) -> Path:
        """The absolute path of a finished stage's typed output."""
        status = self.status(stage)
        if status is None or status.state != "done":
            raise WenmaiError(f"stage '{stage}' of {self.root} has not finished; run or resume it first")
        if kind not in status.outputs:
            raise WenmaiError(f"stage '{stage}' produced no {kind} (it has: {', '.join(status.outputs) or 'nothing'})")
        return self.root / stage / status.outputs[kind]

    def outputs(self, stage: str) -> dict[str, str]:
        """Every typed output of a finished stage, as absolute paths."""
        status = self.status(stage)
        if status is None or status.state != "done":
            raise WenmaiError(f"stage '{stage}' has not finished, so later stages cannot read its outputs")
        return {kind: str(self.root / stage / rel) for kind, rel in status.outputs.items()}

    def relative(self, path: str | Path) -> str:
        """`path` relative to the run folder (as the lineage lists outputs), or as given when outside it."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(path)

    def latest_checkpoint(self, stage: str) -> Path | None:
        """The newest complete trainer checkpoint (its trainer_state.json is written last and parses)."""
        folder = self.root / stage / CHECKPOINTS_DIR
        candidates = sorted(
            folder.glob("checkpoint-*"),
            key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
        )
        for candidate in reversed(candidates):
            with contextlib.suppress(OSError, ValueError):
                json.loads((candidate / "trainer_state.json").read_text(encoding="utf-8"))
                return candidate
        return None


def read_metrics(path: Path) -> list[dict]:
    """Rows of a metrics.jsonl; a line cut short by a kill is ignored."""
    rows = []
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def truncate_metrics(path: Path, after_step: int) -> None:
    """Drop rows logged after `after_step` (a resumed stage logs them again)."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= after_step]
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_open(path: Path) -> Iterator[TextIO]:
    """A text file that appears at `path` complete (flushed, fsynced, renamed over it) or not at all.

    It gets the mode a plain `open` would give a new file under the umask (mkstemp makes it 0600).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see half a file."""
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `final` in one rename, on failure it is removed.

    The folder gets the mode a plain `mkdir` would give it under the umask (mkdtemp makes it 0700); what is
    written into it keeps the modes its writers gave.
    """
    final = Path(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=TEMP_SUFFIX))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system tells it (Linux: /proc/self/status).

    Elsewhere the only way is to set it and set it back, which is racy: a file another thread creates in between
    gets the temporary umask. We set 0o077 in between (so such a file is private, never world-writable) and
    serialise our own readers with `_UMASK_LOCK`.
    """
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        umask = os.umask(0o077)
        os.umask(umask)
    return umask


def _try_lock(fd: int, path: Path, log: Callable[[str], None] | None) -> bool:
    """Take the lock on `fd` without waiting; False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
        if log is not None:  # refusing every run on such a file system would be worse than running unlocked
            log(f"warning: {path} cannot be locked on this file system ({err.strerror}); run one command at a time")
    return True


def _held_message(root: Path, path: Path) -> str:
    holder: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    if isinstance(holder, dict) and "pid" in holder:
        who = f"process {holder['pid']} on host {holder.get('host', '?')} (since {holder.get('started', '?')})"
    else:  # it has just taken the lock and not yet written its details
        who = "another process"
    return (
        f"run folder {root} is in use by {who}; two commands on one run folder would write the same files. "
        "Wait for it to finish (or stop it), then run this again. The lock ends with that process, even a killed "
        f"one: if it is gone, the folder is already free, and there is nothing to delete (not even {path.name})"
    )


def _is_leftover(path: Path) -> bool:
    """A temporary name of atomic_open / atomic_dir, or an `.<name>.old` folder whose `<name>` is in place."""
    if TEMP_NAME.fullmatch(path.name):
        return True
    old = OLD_NAME.fullmatch(path.name)
    return bool(old) and path.is_dir() and (path.parent / old["name"]).exists()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (weights files do not fit in memory twice)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class StageContext:
    """Everything a stage's `run` receives."""

    recipe: Recipe
    config: Any  # the stage's own options (a `finetune.recipe.StageOptions` subclass)
    run_dir: RunDir
    inputs: dict[str, dict[str, str]]  # input field -> the producing stage's outputs (absolute paths)
    resume_from: Path | None = None  # last checkpoint of an interrupted attempt
    input_stages: dict[str, str] = field(default_factory=dict)  # input field -> the producing stage's name
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stage_dir(self) -> Path:
        return self.run_dir.stage_dir(self.config.stage_name)

    @property
    def metrics_path(self) -> Path:
        return self.run_dir.metrics_path(self.config.stage_name)


@dataclass
class StageResult:
    """What a stage produced: typed outputs (paths relative to its folder) and summary figures."""

    outputs: dict[str, str]
    summary: dict[str, Any] = field(default_factory=dict)
