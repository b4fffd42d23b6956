"""The smoke recipe: every stage Wenmai has, through the real CLI, on a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from finetune.pipeline import load_recipe
from finetune.run_dir import RunDir, read_metrics

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "recipes" / "smoke.yaml"


def test_smoke_recipe_runs_every_stage(tmp_path, tiny_model):
    run_dir = tmp_path / "smoke"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "run",
            str(SMOKE),
            "--set",
            f"model.path={tiny_model}",
            "--run-dir",
            str(run_dir),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    recipe = load_recipe(SMOKE, [f"model.path={tiny_model}"]).recipe
    folder = RunDir.open(run_dir)
    lineage = json.loads(folder.lineage_path.read_text())
    assert [s["name"] for s in lineage["stages"]] == [c.stage_name for c in recipe.stage_configs()]
    for stage in recipe.stage_configs():
        status = folder.status(stage.stage_name)
        assert status.state == "done", stage.stage_name
        for output in status.outputs.values():
            assert (folder.root / stage.stage_name / output).exists(), output
    assert read_metrics(folder.metrics_path("sft")), "no metrics logged"
    assert list((folder.root / "sft" / "tensorboard").glob("events.out.tfevents.*")), "tensorboard got nothing"
    assert set(lineage["data"]) == {"culture", "instructions", "ratings"} and lineage["packages"]["trl"]
    assert "<svg" in (folder.root / "report.html").read_text(encoding="utf-8"), "the run report was not written"
    evaluate = folder.status("evaluate").summary
    dimensions = [d.name for d in recipe.reward.dimensions]
    assert all(isinstance(evaluate.get(f"{d}_mean"), float) for d in [*dimensions, "total"]), (
        evaluate
    )  # the real scorer ran
