"""What a person reads from `wenmai`: one stage kind at 80 columns, the plan before the recipe, flags that read as
flags, and one progress line per training stage."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import yaml
from conftest import tiny_recipe
from rich.console import Console

from finetune.recipe import OPTIONS


def test_stages_of_one_kind_fit_80_columns_with_every_option_whole():
    from finetune.cli_tables import option_fields

    env = {**os.environ, "COLUMNS": "80"}
    done = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "stages", "sft"], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    names = {cell.strip() for line in lines if line.startswith("│") for cell in [line.split("│")[1]] if cell.strip()}
    assert names == {name for name, _ in option_fields(OPTIONS["sft"])}, "each option on one line, none cut"
    text = " ".join(" ".join(line.split("│")[2:]) for line in lines if line.startswith("│"))
    assert "Peak learning rate" in " ".join(text.split()) and "dpo —" not in done.stdout, "only the one kind"
    assert "linear | cosine | constant | constant_with_warmup" in " ".join(text.split()), "choices are not cut short"


def test_every_kind_fits_80_columns():
    from finetune.cli_tables import options_table

    for kind in OPTIONS:
        buffer = io.StringIO()
        Console(file=buffer, width=80).print(options_table(kind))
        assert max(len(line) for line in buffer.getvalue().splitlines()) <= 80, kind


def test_an_unknown_stage_kind_names_the_kinds(cli):
    code, _, err = cli("stages", "stf")
    assert code == 2 and "no stage kind 'stf'; did you mean sft?" in err and "export" in err


def test_validate_shows_the_plan_first_and_the_recipe_only_with_full(
    cli, write_recipe, tiny_model, chat_file, tmp_path
):
    from finetune.pipeline import load_recipe

    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"))
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    assert "Plan" in out and "Resolved recipe" not in out and "--full" in out and "recipe is valid" in out
    long_name = "a-project-name-long-enough-to-pass-any-terminal-width-" * 2
    code, out, err = cli("validate", recipe, "--full", "--set", f"tracking.project={long_name}")
    assert code == 0, err
    assert out.index("Plan") < out.index("Resolved recipe"), "the plan comes first"
    text = out[out.index("Resolved recipe") :].split("\n", 1)[1].rsplit("recipe is valid", 1)[0]
    [line] = [line for line in text.splitlines() if "project:" in line]
    assert line.strip() == f"project: {long_name}  # --set", "an origin stays on its value's line"
    origins = [line.rpartition("  # ")[2] for line in text.splitlines() if "  # " in line]
    assert origins and all(
        o == "default" or o == "--set" or o.startswith(str(recipe.name)) or ":" in o for o in origins
    )
    loaded = load_recipe(recipe, [f"tracking.project={long_name}"])
    assert yaml.safe_load(text) == loaded.recipe.model_dump(mode="json"), "the printed recipe is YAML to copy"


def test_flags_read_as_flags(cli, write_recipe, tiny_model, chat_file, tmp_path):
    for command in (["merge", "-h"], ["export", "--help"], ["run", "-h"]):
        code, out, _ = cli(*command)
        assert code == 0 and "--force" in out and "--no-force" not in out, command
    code, out, _ = cli("chat", "-h")
    assert code == 0 and "--label" in out and "--no-label" not in out
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", learnig_rate=0.1))
    code, _, err = cli("validate", recipe, "--debug")
    assert code == 2 and "Traceback" in err, "--debug after the command shows the traceback too"


def test_training_shows_one_progress_line_per_stage_not_a_dict_per_step(
    cli, write_recipe, tiny_model, chat_file, tmp_path
):
    recipe = write_recipe(
        tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=3, eval_fraction=0.1, eval_steps=3)
    )
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "run")
    assert code == 0, out + err
    assert "{'loss'" not in err and "{'eval_loss'" not in err, "the trainer's log dict is not printed"
    [line] = [line for line in err.splitlines() if line.startswith("sft ")]
    assert "3/3" in line and re.search(r"loss \d", line) and re.search(r"[\d,]+ tokens/s", line), line


def test_progress_line_counts_tokens_per_second_from_the_trainers_logs():
    import time

    from finetune.tracking import progress_callback

    buffer = io.StringIO()
    line = progress_callback("dpo [pairs]", console=Console(file=buffer, width=80))

    class State:
        is_world_process_zero, max_steps, global_step = True, 4, 0

    state = State()
    line.on_train_begin(None, state, None)
    for step in range(1, 5):
        state.global_step = step
        time.sleep(0.02)
        line.on_log(None, state, None, logs={"loss": 1.0 / step, "num_tokens": 500 * step})
        line.on_step_end(None, state, None)
    line.close()
    [shown] = buffer.getvalue().splitlines()
    assert shown.startswith("dpo [pairs]") and "4/4" in shown and "loss 0.25" in shown, shown
    rate = float(re.search(r"([\d,]+) tokens/s", shown)[1].replace(",", ""))
    assert 0 < rate <= 1500 / 0.06, "three steps of 500 tokens in at least 60 ms"
