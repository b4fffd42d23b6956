"""A run folder can be trusted: one command at a time (an OS lock, free again when its holder dies), no leftovers
of interrupted writes after a resume, and files with the modes the umask asks for."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import chat_rows, tiny_recipe
from tiny_models import write_jsonl

import finetune.run_dir as run_dir_module
from finetune.errors import WenmaiError
from finetune.pipeline import load_recipe, resume, start
from finetune.post_run import extend_run
from finetune.run_dir import LOCK_FILE, RunDir, atomic_dir, atomic_write_text, current_umask

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys, time
from pathlib import Path
from finetune.run_dir import RunDir
with RunDir(Path(sys.argv[1])).lock():
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model) -> Path:
    """A finished one-stage SFT run (copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("finished")
    data = write_jsonl(tmp / "d.jsonl", chat_rows(8))
    recipe = tmp / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model, data, tmp / "runs", max_steps=2, save_steps=1000), encoding="utf-8")
    return start(load_recipe(recipe), tmp / "runs" / "run", log=lambda _: None).root


@contextlib.contextmanager
def held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding the run folder's lock (through `RunDir.lock`) until it is killed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 60)
        assert ready and holder.stdout.readline().strip() == "held", "the holder never took the lock"
        yield holder
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_second_command_on_a_locked_run_folder_is_refused_naming_pid_and_host(finished_run, cli):
    with held_elsewhere(finished_run) as holder:
        for command in (
            lambda: resume(finished_run, log=lambda _: None),
            lambda: extend_run(finished_run, [("merge", {})], log=lambda _: None),
            lambda: RunDir(finished_run).lock().__enter__(),
        ):
            with pytest.raises(WenmaiError) as refused:
                command()
            message = str(refused.value)
            assert f"process {holder.pid} on host {socket.gethostname()}" in message, message
            assert "Wait for it to finish" in message and str(finished_run) in message, message

        code, out, err = cli("run", "--resume", finished_run)
        assert code == 2 and str(holder.pid) in out + err and "Traceback" not in out + err, out + err
    assert not (finished_run / "merge").exists()  # the refused merge wrote nothing


def test_lock_is_free_once_its_holder_is_killed(finished_run):
    with held_elsewhere(finished_run) as holder:
        holder.kill()  # SIGKILL: no chance to clean up
        holder.wait(timeout=30)
        with RunDir(finished_run).lock():
            assert f'"pid": {os.getpid()}' in (finished_run / LOCK_FILE).read_text()
    assert (finished_run / LOCK_FILE).read_text() == ""  # released: names nobody


def test_resume_of_a_finished_run_skips_its_stages_and_lets_go_of_the_folder(finished_run):
    for _ in range(2):  # the first resume released the lock, or the second would be refused
        lines = []
        resume(finished_run, log=lines.append)
        assert any("sft: done already, skipped" in line for line in lines), lines
    with RunDir(finished_run).lock():
        pass


def test_resume_removes_only_what_interrupted_atomic_writes_left(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    stale_dir = run / "sft" / ".adapter.k2x_9abc.tmp"  # atomic_dir killed mid-write: a full-size folder
    stale_dir.mkdir()
    (stale_dir / "adapter_model.safetensors").write_bytes(b"\0" * 1024)
    stale_file = run / ".lineage.json.a1b2c3d4.tmp"  # atomic_write_text killed before its rename
    stale_file.write_text("{")
    stale_old = run / "sft" / ".adapter.old"  # atomic_dir killed after the new folder was in place
    stale_old.mkdir()
    kept = [
        run / "sft" / "notes.tmp",
        run / "sft" / ".adapter.backup.tmp",  # not tempfile's eight characters
        run / "sft" / ".adapter.ABCDEFGH.tmp",  # tempfile names are lower case
        run / "sft" / ".tokenizer.old.keep",
        run / "sft" / ".merge.old",  # there is no `merge` beside it: the only copy left, kept
        run / "sft" / "checkpoints" / ".x.abcdefgh.tmp",  # below the stage folder: not ours to judge
    ]
    for path in kept:
        path.parent.mkdir(exist_ok=True)
        path.mkdir() if path.name.endswith(".old") else path.write_text("mine")

    lines = []
    resume(run, log=lines.append)

    assert not stale_dir.exists() and not stale_file.exists() and not stale_old.exists()
    assert all(path.exists() for path in kept), [p for p in kept if not p.exists()]
    assert (run / "sft" / "adapter" / "adapter_model.safetensors").is_file()
    removed = [line for line in lines if line.startswith("removed ")]
    assert len(removed) == 3 and any("sft/.adapter.k2x_9abc.tmp" in line for line in removed), lines


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_writes_get_the_modes_the_umask_gives(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "new.json", "{}")
        (tmp_path / "old.json").write_text("[]")
        os.chmod(tmp_path / "old.json", 0o600)
        atomic_write_text(tmp_path / "old.json", "{}")
        with atomic_dir(tmp_path / "model") as tmp:
            (tmp / "weights").write_text("w")
        with atomic_dir(tmp_path / "model") as tmp:  # replacing a folder
            (tmp / "weights").write_text("w2")
    finally:
        os.umask(previous)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(tmp_path / "new.json") == file_mode and mode(tmp_path / "old.json") == file_mode
    assert mode(tmp_path / "model") == dir_mode and mode(tmp_path / "model" / "weights") == file_mode
    assert (tmp_path / "model" / "weights").read_text() == "w2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new.json", "old.json"]  # no temporaries left


def test_umask_is_read_and_kept_where_proc_cannot_tell_it(monkeypatch):
    def no_proc(*_args, **_kwargs):
        raise OSError("no /proc here")

    monkeypatch.setattr(run_dir_module, "open", no_proc, raising=False)
    previous = os.umask(0o027)
    try:
        assert current_umask() == 0o027
        assert os.umask(0o027) == 0o027  # set back as it was
    finally:
        os.umask(previous)
