"""Values from `${env:...}` never reach the run folder or a message; shipped files hold no local absolute path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import tiny_recipe
from tiny_models import write_jsonl

from finetune.errors import ConfigError
from finetune.pipeline import load_recipe, start
from finetune.post_run import extend_run

QUIET = {"log": lambda _: None}
RUN_CANARY = "run-canary-5d2c91"
MODEL_CANARY = "canary-7f3a"
DATA_CANARY = "canary-d4t4"
ROWS = [
    {"messages": [{"role": "user", "content": f"Who wrote poem {i % 3}?"}, {"role": "assistant", "content": "Li Bai."}]}
    for i in range(16)
]


@pytest.fixture(scope="module")
def secret_run(tmp_path_factory, tiny_model):
    """sft (2 steps, a checkpoint at each, tensorboard on), merge, export hf; run name and model path from the env."""
    tmp = tmp_path_factory.mktemp("secrets")
    model = tmp / f"model-{MODEL_CANARY}"
    shutil.copytree(tiny_model, model)
    data = write_jsonl(tmp / f"chat-{DATA_CANARY}.jsonl", ROWS)
    text = tiny_recipe(Path("MODEL"), Path("DATA"), tmp / "runs", max_steps=2, save_steps=1, batch_size=8)
    text = text.replace("{path: MODEL}", "{path: '${env:WENMAI_CANARY_MODEL}'}")
    text = text.replace("{path: DATA,", "{path: '${env:WENMAI_CANARY_DATA}',")
    text += "tracking: {backends: [jsonl, tensorboard], run_name: '${env:WENMAI_CANARY_RUN}'}\n"
    recipe = tmp / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WENMAI_CANARY_RUN", RUN_CANARY)
        env.setenv("WENMAI_CANARY_MODEL", str(model))
        env.setenv("WENMAI_CANARY_DATA", str(data))
        lookups = []
        env.setattr("peft.utils.save_and_load.check_file_exists_on_hf_hub", lambda *a, **k: lookups.append(a))
        run_dir = start(load_recipe(recipe), tmp / "runs" / "run", **QUIET)
        run_dir = extend_run(run_dir.root, [("merge", {}), ("export", {"formats": ["hf"]})], **QUIET)
    assert lookups == []  # PEFT never asked the Hub about "base-model" (or anything) while saving adapters
    return run_dir, model, tmp


def files_containing(root: Path, needle: str) -> list[str]:
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()
    )


def test_env_values_reach_no_file_of_the_run_folder(secret_run):
    run_dir, model, _ = secret_run
    assert list((run_dir.root / "sft" / "checkpoints").glob("checkpoint-*/training_args.bin"))
    assert list((run_dir.root / "sft").rglob("*tfevents*"))
    assert files_containing(run_dir.root, RUN_CANARY) == []
    assert files_containing(run_dir.root, MODEL_CANARY) == []
    assert files_containing(run_dir.root, DATA_CANARY) == []
    card = json.loads((run_dir.root / "sft" / "data_card.json").read_text(encoding="utf-8"))
    assert card["datasets"][0]["path"] == "${env:WENMAI_CANARY_DATA}" and card["datasets"][0]["kept"] > 0
    assert files_containing(run_dir.root, str(model)) == []
    recipe = run_dir.recipe_path.read_text(encoding="utf-8")
    assert "${env:WENMAI_CANARY_RUN}" in recipe and "${env:WENMAI_CANARY_MODEL}" in recipe


def test_lineage_and_adapter_config_show_the_reference_or_a_neutral_name(secret_run):
    run_dir, _, _ = secret_run
    lineage = (run_dir.root / "lineage.json").read_text(encoding="utf-8")
    assert "${env:WENMAI_CANARY_MODEL}" in lineage
    adapters = list(run_dir.root.rglob("adapter_config.json"))
    assert adapters
    for path in adapters:
        assert json.loads(path.read_text(encoding="utf-8"))["base_model_name_or_path"] == "base-model"


def test_shipped_export_holds_no_absolute_path_of_this_machine(secret_run):
    run_dir, _, tmp = secret_run
    exports = [p for p in (run_dir.root / "export").rglob("*") if p.is_file() and p.suffix in (".md", ".json")]
    assert any(p.name == "README.md" for p in exports) and any(p.name == "wenmai_provenance.json" for p in exports)
    for needle in {str(tmp), str(tmp.resolve()), str(Path.home()), str(Path(__file__).resolve().parent.parent)}:
        assert [str(p) for p in exports if needle in p.read_text(encoding="utf-8")] == []


def test_validation_error_shows_the_reference_not_the_value(write_recipe, tiny_model, chat_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WENMAI_CANARY_NAME", "bad name canary-9c1e!")
    text = tiny_recipe(tiny_model, chat_file, tmp_path / "runs").replace(
        "name: tiny", "name: '${env:WENMAI_CANARY_NAME}'"
    )
    with pytest.raises(ConfigError) as caught:
        load_recipe(write_recipe(text))
    assert "canary-9c1e" not in str(caught.value)
    assert "${env:WENMAI_CANARY_NAME}" in str(caught.value)


def test_dashboards_get_the_run_folder_name_for_a_secret_run_name(write_recipe, tiny_model, chat_file, tmp_path):
    from finetune.config_io import load_recipe as load_file
    from finetune.tracking import backend_env

    text = tiny_recipe(tiny_model, chat_file, tmp_path / "runs")
    text += "tracking: {backends: [wandb], wandb_mode: offline, run_name: '${env:WENMAI_CANARY_RUN}'}\n"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WENMAI_CANARY_RUN", RUN_CANARY)
        recipe = load_file(write_recipe(text)).recipe
    env = backend_env(recipe.tracking, tmp_path / "runs" / "tiny-1", "sft", recipe.tracking.run_name)
    assert env["WANDB_RUN_GROUP"] == "tiny-1"
