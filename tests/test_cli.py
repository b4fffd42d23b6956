"""The `wenmai` command: exit codes, clear errors without tracebacks, and nothing half-made."""

from __future__ import annotations

import re

from conftest import tiny_recipe


def test_validate_prints_origins_and_plan(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"))
    code, out, err = cli("validate", recipe, "--set", "stages.sft.max_steps=3", "--full")
    assert code == 0, err
    assert re.search(r"max_steps: 3 +# --set", out)
    assert "d (40 records)" in out and "3 steps" in out
    assert "recipe is valid" in out


def test_validate_says_a_hub_model_is_not_here_yet_and_why_the_memory_table_is_missing(
    cli, write_recipe, tiny_model, chat_file, tmp_path
):
    code, out, err = cli("validate", write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs")))
    assert code == 0 and "Memory per GPU" in out and "not on this machine" not in err  # the model is here: a table
    recipe = write_recipe(tiny_recipe("wenmai-tests/not-in-any-cache", chat_file, tmp_path / "runs"), "hub.yaml")
    code, out, err = cli("validate", recipe)
    said = " ".join(err.split())
    assert code == 0, err
    assert "warning: model.path: wenmai-tests/not-in-any-cache is not on this machine yet" in said
    assert "there is no memory table" in said and "Memory per GPU" not in out


def test_validate_refuses_a_local_model_folder_that_is_not_there(cli, write_recipe, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tmp_path / "no-such-model", chat_file, tmp_path / "runs"))
    code, out, err = cli("validate", recipe)
    assert code == 2 and "recipe is valid" not in out
    assert "model.path: folder" in err and "no-such-model not found" in err and "warning" not in err


def test_user_error_exits_2_without_traceback(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", learnig_rate=0.1))
    code, out, err = cli("validate", recipe)
    assert code == 2
    assert "stages[0].sft.learnig_rate: unknown key — did you mean learning_rate?" in err
    assert "Traceback" not in err + out


def test_debug_flag_shows_the_traceback(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", learnig_rate=0.1))
    code, _, err = cli("--debug", "validate", recipe)
    assert code == 2 and "Traceback" in err


def test_missing_model_folder_is_named_before_any_run_folder(cli, write_recipe, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tmp_path / "no-such-model", chat_file, tmp_path / "runs"))
    code, _, err = cli("run", recipe)
    assert code == 2
    assert "model.path: folder" in err and "no-such-model not found" in err
    assert not (tmp_path / "runs").exists()


def test_nf4_without_bitsandbytes_is_a_clear_error(cli, write_recipe, tiny_model, chat_file, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"))
    code, _, err = cli("run", recipe, "--set", "model.quantization=nf4")
    assert code == 2
    assert "model.quantization: nf4 needs bitsandbytes: pip install" in err and "ImportError" not in err
    assert not (tmp_path / "runs").exists()


def test_bad_data_line_stops_before_training(cli, write_recipe, tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    code, _, err = cli("run", write_recipe(tiny_recipe(tiny_model, data, tmp_path / "runs")))
    assert code == 2 and "bad.jsonl:1: no assistant turn" in err
    assert not (tmp_path / "runs").exists()


def test_resume_refuses_a_different_recipe(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1))
    code, _, err = cli("run", recipe, "--run-dir", tmp_path / "r1")
    assert code == 0, err
    code, _, err = cli("run", recipe, "--resume", tmp_path / "r1", "--set", "lora.r=2")
    assert code == 2 and "lora.r: differs from the run being resumed" in err


def test_resume_of_a_finished_run_skips_every_stage(cli, write_recipe, tiny_model, chat_file, tmp_path):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1))
    assert cli("run", recipe, "--run-dir", tmp_path / "r2")[0] == 0
    code, _, err = cli("run", "--resume", tmp_path / "r2")
    assert code == 0 and "sft: done already, skipped" in err


def test_resume_of_a_folder_that_is_not_a_run(cli, tmp_path):
    code, _, err = cli("run", "--resume", tmp_path)
    assert code == 2 and "is not a Wenmai run folder" in err


def test_stages_lists_options_with_their_meaning(cli):
    code, out, _ = cli("stages")
    assert code == 0
    assert "learning_rate" in out and "Peak learning rate" in out and "sft" in out


def test_stages_lists_no_option_a_stage_refuses(cli):
    code, out, _ = cli("stages")
    kinds = ["sft", "reward", "dpo", "kto", "orpo", "rlhf", "evaluate", "merge", "export"]
    starts = [out.index(f"{kind} — ") for kind in kinds] + [len(out)]
    tables = {kind: out[start:end] for kind, start, end in zip(kinds, starts, starts[1:], strict=False)}
    assert code == 0 and "│ speed.liger" in tables["sft"] and "│ speed.liger" in tables["reward"]
    assert not [kind for kind in ("dpo", "kto", "orpo", "rlhf") if "│ speed." in tables[kind]]


def test_a_speed_section_on_a_stage_without_a_speed_plan_is_refused_with_what_to_use(
    cli, write_recipe, tiny_model, chat_file, tmp_path
):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    recipe = write_recipe(f"""\
        name: r
        model: {{path: {tiny_model}}}
        data:
          c: {{path: {chat_file}, format: chat}}
          p: {{path: {pairs}, format: pairs}}
        stages:
          - sft: {{dataset: c}}
          - dpo: {{dataset: p, speed: {{liger: false}}}}
        """)
    code, _, err = cli("validate", recipe)
    assert (
        code == 2
        and "stages[1].dpo" in err
        and "does not run the speed options" in err
        and "precompute_ref_log_probs" in err
    )
