"""Dashboards: wandb offline without a key, the key never in the run folder, missing packages named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_missing_mlflow_is_named_with_the_install_command(tmp_path, tiny_model, chat_file, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find_spec(name, *a))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(tiny_model, chat_file, tmp_path) + "tracking: {backends: [mlflow]}\n", encoding="utf-8"
    )
    assert "tracking.backends: mlflow is not installed; pip install wenmai[mlflow]" in preflight(
        load_recipe(recipe).recipe
    )


def test_a_file_store_for_mlflow_is_refused_before_the_run(tmp_path, tiny_model, chat_file):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        tiny_recipe(tiny_model, chat_file, tmp_path)
        + f"tracking: {{backends: [mlflow], mlflow_tracking_uri: {(tmp_path / 'mlruns').as_uri()}}}\n",
        encoding="utf-8",
    )
    [problem] = [p for p in preflight(load_recipe(recipe).recipe) if "mlflow" in p]
    assert problem.startswith("tracking.mlflow_tracking_uri:") and "sqlite:///" in problem


TWO_STAGES = """\
stages:
  - sft: {dataset: d, max_steps: 2, batch_size: 4, seq_len: 64, logging_steps: 1, save_steps: 100}
  - sft: {name: polish, dataset: d, max_steps: 3, batch_size: 4, seq_len: 64, logging_steps: 1, save_steps: 100}
"""


@pytest.fixture(scope="module")
def dashboard_run(tmp_path_factory, tiny_model):
    """Two trainer stages logging to W&B (offline) and MLflow (its default store); the run name from ${env:...}."""
    from conftest import chat_rows
    from tiny_models import write_jsonl

    tmp = tmp_path_factory.mktemp("dashboards")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(16))
    text = tiny_recipe(tiny_model, data, tmp / "runs")
    text = text[: text.index("stages:")] + TWO_STAGES + text[text.index("output:") :]
    text += "tracking: {backends: [jsonl, wandb, mlflow], wandb_mode: offline, run_name: '${env:DASH_RUN}'}\n"
    recipe = tmp / "r.yaml"
    recipe.write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DASH_RUN", "dash-canary-31c7")
        env.delenv("WANDB_API_KEY", raising=False)
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        run_dir = start(load_recipe(recipe), tmp / "runs" / "dash", log=lambda _: None)
    return run_dir


def wandb_records(path: Path) -> list:
    """The records of a W&B transaction log (`run-<id>.wandb`): a 7-byte header, then LevelDB-log blocks of 32 KiB
    (7-byte chunk headers: crc32c, length, type 1 full / 2 first / 3 middle / 4 last), each record a protobuf."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            pending = b""
    return records


def test_each_trainer_stage_is_its_own_wandb_run_with_the_recipe_as_config(dashboard_run):
    import json

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    runs = {}
    for log in sorted(dashboard_run.root.glob("wandb/offline-run-*/run-*.wandb")):
        records = wandb_records(log)
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
        config = {item.key: json.loads(item.value_json) for item in run.config.update}  # given to wandb.init
        for r in records:  # and what transformers' callback added
            if r.WhichOneof("record_type") == "config":
                config.update({item.key: json.loads(item.value_json) for item in r.config.update})
        steps = [
            json.loads(item.value_json)
            for r in records
            if r.WhichOneof("record_type") == "history"
            for item in r.history.item
            if key(item) == "train/global_step"
        ]
        keys = {key(item) for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item}
        runs[run.display_name] = (run, config, steps, keys)
    assert sorted(runs) == ["dash/polish", "dash/sft"]  # one run per stage, named by the run folder (secret name)
    for stage, (run, config, _, keys) in runs.items():
        assert run.run_group == "dash" and run.job_type == "sft"
        wenmai = config["wenmai"]
        assert "learning_rate" in config  # the trainer's arguments joined the same run
        assert wenmai["stage"] == stage.split("/")[1]
        assert wenmai["recipe"]["tracking"]["run_name"] == "${env:DASH_RUN}"  # the reference, not the value
        assert "train/loss" in keys
    assert max(runs["dash/polish"][2]) == 3 and max(runs["dash/sft"][2]) == 2  # each stage's own steps


def test_each_trainer_stage_is_its_own_mlflow_run_in_a_sqlite_store_in_the_run_folder(dashboard_run):
    import mlflow

    store = dashboard_run.root / "mlflow.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    [experiment] = [e for e in client.search_experiments() if e.name == "wenmai"]
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert sorted(runs) == ["dash/polish", "dash/sft"]
    for name, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["wenmai.stage"] == name.split("/")[1]
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(client.get_metric_history(runs["dash/polish"].info.run_id, "loss")) == 3
    assert len(client.get_metric_history(runs["dash/sft"].info.run_id, "loss")) == 2
    recipe = mlflow.artifacts.load_text(f"{runs['dash/sft'].info.artifact_uri}/recipe.yaml")
    assert "${env:DASH_RUN}" in recipe


def test_dashboards_hold_no_secret_value(dashboard_run):
    files = [p for p in dashboard_run.root.rglob("*") if p.is_file()]
    assert any("wandb" in str(p) for p in files) and any(p.name == "mlflow.db" for p in files)
    assert [str(p) for p in files if b"dash-canary-31c7" in p.read_bytes()] == []
