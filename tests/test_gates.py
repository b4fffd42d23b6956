"""Gates: a failing evaluate gate stops the pipeline before later stages; --force goes on and is recorded."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from finetune.errors import ConfigError
from finetune.evaluation.gates import Gates, check_gates
from finetune.evaluation.mc import subject_score
from finetune.evaluation.results import AlignmentScore, CheckpointResult, McScore
from finetune.pipeline import load_recipe

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MC = ROOT / "recipes" / "data" / "culture-mc"


def gated_recipe(path: Path, model: Path, data: Path, gates: str, root: Path) -> Path:
    path.write_text(
        textwrap.dedent(f"""\
        name: gated
        model: {{path: {model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - sft: {{dataset: d, max_steps: 1, batch_size: 4, seq_len: 64}}
          - evaluate: {{name: gate, mc: {SHIPPED_MC}, baseline: none, gates: {gates}}}
          - sft: {{name: after_gate, dataset: d, max_steps: 1, batch_size: 4, seq_len: 64}}
        output: {{root: {root}}}
        """),
        encoding="utf-8",
    )
    return path


def test_impossible_gate_stops_before_later_stages_and_force_overrides(tmp_path, tiny_model, chat_file, cli):
    recipe = gated_recipe(tmp_path / "r.yaml", tiny_model, chat_file, "{mc_min_accuracy: 100}", tmp_path / "runs")
    run = tmp_path / "runs" / "g"
    code, out, err = cli("run", recipe, "--run-dir", run)
    assert code == 2, out + err
    assert "evaluate stage 'gate': 1 gate(s) failed, so the stages after it did not run" in err
    assert "mc_min_accuracy (culture-mc-0shot): overall accuracy" in err and "required >= 100.0" in err
    assert f"wenmai run --resume {run} --force" in err
    assert not (run / "after_gate").exists(), "a stage after the failed gate ran"
    lineage = json.loads((run / "lineage.json").read_text(encoding="utf-8"))
    assert [(s["name"], s["state"]) for s in lineage["stages"]] == [
        ("sft", "done"),
        ("gate", "failed"),
        ("after_gate", "pending"),
    ]
    evaluation = json.loads((run / "gate" / "evaluation.json").read_text(encoding="utf-8"))
    assert evaluation["passed"] is False and evaluation["gates"][0]["value"] < 100
    report = (run / "report.html").read_text(encoding="utf-8")
    assert "未通过" in report and "mc_min_accuracy" in report  # the report is in Chinese unless output.language: en

    code, out, err = cli("run", "--resume", run, "--force")
    assert code == 0, out + err
    lineage = json.loads((run / "lineage.json").read_text(encoding="utf-8"))
    states = {s["name"]: (s["state"], s["gate"]) for s in lineage["stages"]}
    assert states["after_gate"][0] == "done"
    assert states["gate"] == (
        "done",
        {"passed": False, "forced": True, "failed": ["mc_min_accuracy (culture-mc-0shot)"]},
    )


def test_gate_options_are_checked_before_anything_runs(tmp_path, tiny_model, chat_file):
    recipe = gated_recipe(
        tmp_path / "r.yaml", tiny_model, chat_file, "{mc_max_drop: 1, rules_min_pass_rate: 0.5}", tmp_path
    )
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    text = str(err.value)
    assert (
        "stages[1].evaluate.baseline: mc_max_drop / mc_subject_max_drop / reward_max_drop compare with a baseline"
        in text
    )
    assert "stages[1].evaluate.gates: suite gates (reward_min, rules_min_pass_rate, bias_*) need `suite:`" in text
    assert f"({recipe}:8)" in text


def test_evaluate_names_only_earlier_stages(tmp_path, tiny_model, chat_file):
    recipe = gated_recipe(tmp_path / "r.yaml", tiny_model, chat_file, "{}", tmp_path)
    text = recipe.read_text(encoding="utf-8").replace("baseline: none", "model: after_gate, baseline: nope")
    recipe.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert (
        "stages[1].evaluate.model: 'after_gate' comes later (stages read only earlier stages); "
        "earlier stages producing a model or adapter: sft" in str(err.value)
    )
    assert "stages[1].evaluate.baseline: 'nope' is not a stage name" in str(err.value)


def mc_result(label: str, accuracies: dict[str, tuple[int, int]]) -> CheckpointResult:
    subjects = [
        subject_score(name, ["A"] * correct + ["B"] * (total - correct), ["A"] * total)
        for name, (correct, total) in accuracies.items()
    ]
    overall = subject_score(
        "overall", [p for s in subjects for p in s.predictions], [a for s in subjects for a in s.answers]
    )
    mc = McScore(
        name="cmmlu-0shot", shots=0, method="loglik", subjects=subjects, overall=overall, macro_accuracy=0, seconds=0
    )
    return CheckpointResult(label=label, source={}, mc=[mc])


def test_accuracy_drop_is_measured_against_the_baseline():
    base = mc_result("base", {"history": (50, 100), "poetry": (40, 100)})
    tuned = mc_result("sft", {"history": (48, 100), "poetry": (41, 100)})  # overall 45.0 -> 44.5
    gates = {g.gate: g for g in check_gates(Gates(mc_max_drop=1, mc_subject_max_drop=1.5), tuned, base)}
    assert gates["mc_max_drop (cmmlu-0shot)"].value == 0.5 and gates["mc_max_drop (cmmlu-0shot)"].passed
    assert gates["mc_subject_max_drop (cmmlu-0shot/history)"].value == 2.0
    assert not gates["mc_subject_max_drop (cmmlu-0shot/history)"].passed
    assert gates["mc_subject_max_drop (cmmlu-0shot/poetry)"].passed
    strict = check_gates(Gates(mc_max_drop=0.4), tuned, base)
    assert [g.passed for g in strict] == [False]


def test_suite_gates_fail_when_nothing_was_measured():
    result = CheckpointResult(
        label="m",
        source={},
        alignment=AlignmentScore(name="s", probes=[], rule_pass_rate=0.75, dimension_means={"safety": 0.2}),
    )
    gates = {
        g.gate: g
        for g in check_gates(
            Gates(reward_min={"safety": 0.1, "tone": 0}, rules_min_pass_rate=0.8, bias_max_gap=1), result, None
        )
    }
    assert gates["reward_min (safety)"].passed
    assert (
        not gates["reward_min (tone)"].passed
        and gates["reward_min (tone)"].detail == "mean tone score was not measured"
    )
    assert not gates["rules_min_pass_rate"].passed and gates["rules_min_pass_rate"].value == 0.75
    assert not gates["bias_max_gap"].passed
