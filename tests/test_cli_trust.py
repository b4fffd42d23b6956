"""What a shell script and a reader can trust of `wenmai`: exit codes (Ctrl-C, usage errors) and text printed as
it is, brackets included (`pip install 'wenmai[gpu]'`)."""

from __future__ import annotations

import ast
import re
from datetime import datetime, timezone
from pathlib import Path

import click
import pytest
import typer
from conftest import tiny_recipe

from finetune import cli as cli_module
from finetune import pipeline
from finetune.checks.preflight import Finding
from finetune.errors import WenmaiError
from finetune.run_dir import RunDir, StageStatus

HINT = "pip install 'wenmai[gpu]' (needs [bold]CUDA[/])"
CLI_FILES = [Path(cli_module.__file__), Path(cli_module.__file__).with_name("cli_tables.py")]


@pytest.fixture
def recipe(write_recipe, tiny_model, chat_file, tmp_path) -> Path:
    return write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"))


def made_run_folder(loaded, run_dir: Path, summary: dict | None = None) -> RunDir:
    """A run folder as `pipeline.start` leaves it: its recipe, and (with `summary`) a finished sft stage."""
    folder = RunDir(run_dir)
    folder.root.mkdir(parents=True)
    folder.recipe_path.write_text(loaded.to_yaml(), encoding="utf-8")
    if summary is not None:
        now = datetime.now(timezone.utc).isoformat()
        folder.write_status(
            StageStatus(name="sft", kind="sft", state="done", started=now, finished=now, summary=summary)
        )
    return folder


# Ctrl-C


def test_ctrl_c_during_a_run_exits_130_naming_the_folder_to_resume(cli, recipe, tmp_path, monkeypatch):
    def interrupted(loaded, run_dir, log, force):
        made_run_folder(loaded, run_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "start", interrupted)
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "r1")
    assert code == 130
    assert f"interrupted; resume with `wenmai run --resume {tmp_path / 'r1'}`" in err
    assert "Traceback" not in out + err
    assert "run finished" not in out


def test_ctrl_c_during_a_resume_names_the_resumed_folder(cli, recipe, tmp_path, monkeypatch):
    made_run_folder(pipeline.load_recipe(recipe), tmp_path / "r1")

    def interrupted(run_dir, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "resume", interrupted)
    code, out, err = cli("run", "--resume", tmp_path / "r1")
    assert code == 130
    assert f"interrupted; resume with `wenmai run --resume {tmp_path / 'r1'}`" in err
    assert "Traceback" not in out + err


def test_ctrl_c_names_the_folder_the_pipeline_attached_to_the_interrupt(cli, recipe, tmp_path, monkeypatch):
    def interrupted(loaded, run_dir, log, force):
        interrupt = KeyboardInterrupt()
        interrupt.run_dir = made_run_folder(loaded, tmp_path / "runs" / "tiny-20250101-000000").root
        raise interrupt

    monkeypatch.setattr(pipeline, "start", interrupted)
    code, _, err = cli("run", recipe)
    assert code == 130
    assert f"`wenmai run --resume {tmp_path / 'runs' / 'tiny-20250101-000000'}`" in err


def test_ctrl_c_before_the_run_folder_exists_still_exits_130_with_the_resume_command(
    cli, recipe, tmp_path, monkeypatch
):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "start", interrupted)
    for args in ((), ("--run-dir", tmp_path / "not-made-yet")):
        code, out, err = cli("run", recipe, *args)
        assert code == 130
        assert "interrupted; resume with `wenmai run --resume <RUN>`" in err
        assert "not-made-yet" not in err
        assert "Traceback" not in out + err


@pytest.mark.parametrize(("raised", "code"), [(typer.Exit(3), 3), (KeyboardInterrupt(), 130)])
def test_the_exit_code_typer_returns_is_the_process_exit_code(cli, tmp_path, monkeypatch, raised, code):
    def report(run_dir):
        raise raised

    monkeypatch.setattr(cli_module, "write_report", report)
    exit_code, out, err = cli("report", tmp_path)
    assert exit_code == code
    assert "Traceback" not in out + err


# usage errors


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["validate"], "Missing argument"),
        (["run", "--bogus"], "No such option"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["stages", "--bogus"], "No such option"),
    ],
)
def test_a_usage_error_prints_the_usage_and_one_error_line_and_exits_2(cli, args, error):
    code, out, err = cli(*args)
    assert code == 2
    assert err.startswith("Usage: ") and "[OPTIONS]" in err.splitlines()[0]
    assert [line for line in err.splitlines() if line.startswith("Error:")] == [
        next(line for line in err.splitlines() if error in line)
    ]
    assert "Traceback" not in out + err


def test_a_usage_error_of_clicks_own_classes_exits_2_as_under_typer_0_20(cli, tmp_path, monkeypatch):
    """typer 0.20 raises click's exceptions, later typers their own copy's; both are usage errors."""

    def report(run_dir):
        raise click.BadParameter("not a run folder", param_hint="'RUN_DIR'")

    monkeypatch.setattr(cli_module, "write_report", report)
    code, out, err = cli("report", tmp_path)
    assert code == 2
    assert "Error: Invalid value for 'RUN_DIR': not a run folder" in err
    assert "Traceback" not in out + err


# text in brackets


def test_validate_prints_warnings_and_speed_lines_with_their_brackets(cli, recipe, monkeypatch):
    validate = pipeline.validate

    def with_hints(*args):
        checked = validate(*args)
        checked.warnings.append(f"validate warning: {HINT}")
        checked.speed_lines.append(f"speed line: {HINT}")
        checked.report.findings.append(Finding("r", "model", f"finding: {HINT}", severity="warning"))
        return checked

    monkeypatch.setattr(pipeline, "validate", with_hints)
    code, out, err = cli("validate", recipe)
    assert code == 0, err
    for text in (f"validate warning: {HINT}", f"model: finding: {HINT}"):
        assert f"warning: {text}" in err
    assert f"speed on this machine speed line: {HINT}" in out
    assert "recipe is valid" in out


def test_launch_dry_run_prints_findings_and_the_command_with_their_brackets(
    cli, write_recipe, tiny_model, chat_file, tmp_path, monkeypatch
):
    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs"), name="wenmai[gpu]/recipe.yaml")
    check = cli_module.compatibility.check

    def with_hint(*args, **kwargs):
        report = check(*args, **kwargs)
        report.findings.append(Finding("r", "model", f"finding: {HINT}", severity="warning"))
        return report

    monkeypatch.setattr(cli_module.compatibility, "check", with_hint)
    code, out, err = cli("launch", recipe, "--gpus", "2", "--cpu", "--dry-run", "--set", "distributed.strategy=ddp")
    assert code == 0, err
    assert f"warning: model: finding: {HINT}" in err
    assert "wenmai[gpu]/recipe.yaml" in out


def test_the_end_of_run_table_and_progress_keep_their_brackets(cli, recipe, tmp_path, monkeypatch):
    def finished(loaded, run_dir, log, force):
        log(f"progress: {HINT}")
        return made_run_folder(loaded, run_dir, summary={"next": HINT})

    monkeypatch.setattr(pipeline, "start", finished)
    code, out, err = cli("run", recipe, "--run-dir", tmp_path / "run[1]")
    assert code == 0, err
    assert f"wenmai progress: {HINT}" in err
    assert "Run run[1]" in out
    assert f"next={HINT}" in out
    assert f"run finished: {tmp_path / 'run[1]'}" in out


def test_a_user_error_keeps_its_brackets(cli, tmp_path, monkeypatch):
    def report(run_dir):
        raise WenmaiError(f"this command needs the extra: {HINT}")

    monkeypatch.setattr(cli_module, "write_report", report)
    code, _, err = cli("report", tmp_path)
    assert code == 2
    assert f"error: this command needs the extra: {HINT}" in err


def test_every_print_of_the_cli_goes_to_a_console_without_markup():
    """Static check: user text is never read as Rich markup, so an f-string needs no escaping; styling is Text."""
    markup_off = set()
    for path in CLI_FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                call = node.value
                if isinstance(call.func, ast.Name) and call.func.id == "Console":
                    assert any(k.arg == "markup" and k.value.value is False for k in call.keywords), ast.unparse(call)
                    markup_off.update(t.id for t in node.targets)
    assert markup_off == {"out", "console"}
    for path in CLI_FILES:
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"from rich import .*\bprint\b|rich\.print\(", source), path
        # a tag would print literally on these consoles: style with Text instead
        assert not re.search(r"\[/\]|\[/?(bold|dim|italic|red|green|yellow|blue|cyan|magenta)\b", source), path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "print":
                receiver = node.func.value
                assert isinstance(receiver, ast.Name) and receiver.id in markup_off, f"{path}: {ast.unparse(node)}"
                assert not any(k.arg == "markup" and k.value.value is True for k in node.keywords), ast.unparse(node)


@pytest.mark.parametrize("text", ["name: x\nmodel: [unclosed\n", "- a\n- b\n"])
def test_a_damaged_recipe_in_a_run_folder_is_one_clear_error(text, tmp_path, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(text, encoding="utf-8")
    code, _, err = cli("run", "--resume", run)
    assert code == 2 and "cannot read the run's recipe" in err and "damaged" in err and "Traceback" not in err


def test_chat_refuses_a_negative_answer_length(tmp_path, cli):
    code, _, err = cli("chat", tmp_path, "--max-new-tokens", "-1")
    assert code == 2 and "--max-new-tokens" in err and "Traceback" not in err


def test_chat_cut_at_max_new_tokens_keeps_whole_characters_and_says_so(tiny_model, tmp_path, cli, monkeypatch):
    """The token limit falls inside a character (a byte-level tokenizer spells 鼎 in three tokens): the answer
    keeps only whole characters and a note names --max-new-tokens; an answer that ends at EOS gets no note."""
    import json
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract, write_contract

    export = shutil.copytree(tiny_model, tmp_path / "export")
    tokenizer = AutoTokenizer.from_pretrained(export)
    write_contract(template_contract(tokenizer, end_of_turn_ids(tokenizer)), export)
    head, ding = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("Tang ", "鼎"))
    answer = head + ding
    assert len(ding) > 1  # 鼎 is spelled in its UTF-8 bytes

    def says(self, input_ids, max_new_tokens, eos_token_id, **_):
        new = ([*answer, eos_token_id[0]])[:max_new_tokens]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)

    monkeypatch.setattr(LlamaForCausalLM, "generate", says)
    cut = len(answer) - 1  # all but the last byte of 鼎
    code, out, err = cli("chat", export, "--prompt", "鼎？", "--max-new-tokens", cut, "--label")
    reply = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and reply["content"] == "Tang" and reply["hit_max_new_tokens"] and not reply["stopped_at_eos"]
    assert "note: the answer hit --max-new-tokens" in err
    code, out, err = cli("chat", export, "--prompt", "鼎？", "--max-new-tokens", len(answer) + 1)
    assert code == 0 and out.strip() == "Tang 鼎" and "max-new-tokens" not in err


def test_a_damaged_lineage_in_a_run_folder_is_one_clear_error(tmp_path, tiny_model, chat_file, write_recipe, cli):
    from conftest import tiny_recipe

    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1))
    run = tmp_path / "runs" / "r"
    assert cli("run", recipe, "--run-dir", run)[0] == 0
    (run / "lineage.json").write_text('{"run": "r", "stages": [', encoding="utf-8")
    code, _, err = cli("run", "--resume", run)
    assert code == 2 and "lineage.json is damaged" in err and "Traceback" not in err


def test_a_folder_that_may_not_be_written_and_a_full_disk_are_one_line_errors(
    tmp_path, tiny_model, chat_file, write_recipe, cli, monkeypatch
):
    import errno

    from conftest import tiny_recipe

    recipe = write_recipe(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1))

    def refuse(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "runs" / "r"))

    monkeypatch.setattr("finetune.run_dir.Path.mkdir", refuse)
    code, _, err = cli("run", recipe, "--run-dir", tmp_path / "runs" / "r")
    assert code == 2 and "cannot write" in err and "Permission denied" in err and "Traceback" not in err
    monkeypatch.undo()

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "runs/r/sft/adapter")

    monkeypatch.setattr("finetune.pipeline.run_stages", full)
    code, _, err = cli("run", recipe, "--run-dir", tmp_path / "runs" / "r2")
    assert code == 2 and "the disk is full" in err and "resume" in err and "Traceback" not in err
