"""lineage.json after a resume: data files hashed again, the code's commit, a local model folder's hash."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT, chat_rows, tiny_recipe
from tiny_models import write_jsonl

from finetune.config_io import load_run_recipe
from finetune.errors import WenmaiError
from finetune.lineage import write_lineage
from finetune.pipeline import load_recipe, resume, run_stages, start
from finetune.run_dir import RunDir, atomic_write_text, sha256_file

SFT = "max_steps: 2, batch_size: 4, seq_len: 64, logging_steps: 1, save_steps: 2"


def test_resume_refuses_data_file_changed_after_its_stage_finished(tmp_path, tiny_model, chat_file, write_recipe):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=2))
    run_dir = start(load_recipe(recipe), tmp_path / "run", log=lambda line: None).root
    before = sha256_file(chat_file)
    write_jsonl(chat_file, chat_rows(44))  # four more records than sft trained on

    with pytest.raises(WenmaiError) as refused:
        resume(run_dir, log=lambda line: None)

    message = str(refused.value)
    assert str(chat_file) in message and "sft" in message
    assert before[:12] in message and sha256_file(chat_file)[:12] in message
    assert "Restore the file" in message and "new run" in message
    assert json.loads((run_dir / "lineage.json").read_text())["data"]["d"]["sha256"] == before


def test_resume_records_change_of_data_only_a_later_stage_reads(tmp_path, tiny_model, chat_file, write_recipe):
    later_file = write_jsonl(tmp_path / "later.jsonl", chat_rows(20))
    recipe = write_recipe(f"""\
        name: two
        model: {{path: {tiny_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {chat_file}, format: chat}}
          later: {{path: {later_file}, format: chat}}
        stages:
          - sft: {{dataset: d, {SFT}}}
          - sft: {{name: sft_later, dataset: later, {SFT}}}
        output: {{root: {tmp_path / "runs"}}}
        """)
    loaded = load_recipe(recipe)
    run_dir = RunDir.create(tmp_path / "runs", "two", tmp_path / "run")
    atomic_write_text(run_dir.recipe_path, loaded.to_yaml())
    run_stages(loaded.recipe, run_dir, log=lambda line: None, only={"sft"})  # stopped before sft_later
    before = sha256_file(later_file)
    write_jsonl(later_file, chat_rows(24))
    logged = []

    resume(run_dir.root, log=logged.append)

    lineage = json.loads(run_dir.lineage_path.read_text())
    entry = lineage["data"]["later"]
    assert entry["sha256"] == before  # what the run started with stays
    assert [(c["sha256"], c["bytes"]) for c in entry["changes"]] == [
        (sha256_file(later_file), later_file.stat().st_size)
    ]
    assert entry["changes"][0]["seen"]
    assert "changes" not in lineage["data"]["d"]
    assert [s["state"] for s in lineage["stages"]] == ["done", "done"]
    assert any("later" in line and "changed" in line for line in logged)


def test_git_commit_is_the_checkouts_when_run_from_another_folder(tmp_path, tiny_model, chat_file, monkeypatch):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        pytest.skip(f"{ROOT} is not a git checkout")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    run_dir = _lineage_only_run(tmp_path, tiny_model, chat_file)

    lineage = json.loads(run_dir.lineage_path.read_text())

    assert lineage["git_commit"] in (head.stdout.strip(), head.stdout.strip() + "+dirty")


def test_folder_model_gets_a_sha256_reused_while_its_files_are_unchanged(tmp_path, tiny_model, chat_file):
    model = shutil.copytree(tiny_model, tmp_path / "model")
    run_dir = _lineage_only_run(tmp_path, model, chat_file)
    first = json.loads(run_dir.lineage_path.read_text())["model"]
    # what `sha256sum * | sha256sum` prints in the folder
    listing = "".join(f"{sha256_file(p)}  {p.name}\n" for p in sorted(model.iterdir()))
    assert first["sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert set(first["files"]) == {p.name for p in model.iterdir()}

    write_lineage(load_run_recipe(run_dir).recipe, run_dir)
    second = json.loads(run_dir.lineage_path.read_text())["model"]
    assert second["sha256"] == first["sha256"] and second["files"] == first["files"]

    weights = next(model.glob("*.safetensors"))
    stat = weights.stat()
    with weights.open("r+b") as f:  # same size, same mtime: taken as unchanged, so a resume reads no weights
        f.seek(stat.st_size - 1)
        last = f.read(1)
        f.seek(stat.st_size - 1)
        f.write(b"\x00" if last != b"\x00" else b"\x01")
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_lineage(load_run_recipe(run_dir).recipe, run_dir)
    assert json.loads(run_dir.lineage_path.read_text())["model"] == first

    config = model / "config.json"
    config.write_text(config.read_text(encoding="utf-8") + " ", encoding="utf-8")  # one byte longer
    write_lineage(load_run_recipe(run_dir).recipe, run_dir)
    third = json.loads(run_dir.lineage_path.read_text())["model"]
    assert third["sha256"] == first["sha256"]  # the run started with that model
    assert third["files"]["config.json"]["sha256"] == sha256_file(config)
    assert len(third["changes"]) == 1 and third["changes"][0]["sha256"] != first["sha256"]


def _lineage_only_run(tmp_path: Path, model: Path, data: Path) -> RunDir:
    """A run folder with its recipe and a first lineage.json, no stage run."""
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(textwrap.dedent(tiny_recipe(model, data, tmp_path / "runs", max_steps=2)), encoding="utf-8")
    loaded = load_recipe(recipe_path)
    run_dir = RunDir.create(tmp_path / "runs", "tiny", tmp_path / "run")
    atomic_write_text(run_dir.recipe_path, loaded.to_yaml())
    write_lineage(loaded.recipe, run_dir)
    return run_dir
