"""Dashboards: wandb offline without a key, the key never in the run folder, missing packages named."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import tiny_recipe

from finetune.pipeline import load_recipe, preflight, start
from finetune.recipe import TrackingSection
from finetune.tracking import backend_env, report_to


def test_wandb_is_offline_without_a_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path))
    env = backend_env(TrackingSection(backends=["wandb", "tensorboard"]), tmp_path, "sft", "run-1")
    assert env["WANDB_MODE"] == "offline" and env["WANDB_DIR"] == str(tmp_path)
    assert env["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "sft" / "tensorboard")
    assert report_to(TrackingSection(backends=["jsonl", "wandb"])) == ["wandb"]
    assert report_to(TrackingSection(backends=["jsonl"])) == ["none"]


def test_wandb_key_is_never_written_to_the_run_folder(monkeypatch, tmp_path, tiny_model, chat_file):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1)
        + "tracking: {backends: [wandb], wandb_mode: offline}\n",
        encoding="utf-8",
    )
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "w", log=lambda _: None)
    files = [p for p in run_dir.root.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files), "wandb wrote nothing: the check below would be vacuous"
    assert not [p for p in files if secret.encode() in p.read_bytes()]


@pytest.mark.skipif(importlib.util.find_spec("mlflow") is not None, reason="mlflow is installed here")
def test_missing_mlflow_is_named_with_the_install_command(tmp_path, tiny_model, chat_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(tiny_model, chat_file, tmp_path) + "tracking: {backends: [mlflow]}\n", encoding="utf-8"
    )
    assert "tracking.backends: mlflow is not installed; pip install wenmai[mlflow]" in preflight(
        load_recipe(recipe).recipe
    )
