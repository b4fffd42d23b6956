"""Shared fixtures: a tiny model built once per session, recipe writing, and in-process CLI calls."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_model, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama-shaped model + ChatML tokenizer folder (random init)."""
    return build_model(tmp_path_factory.mktemp("tiny-model"))


def chat_rows(n: int = 40) -> list[dict]:
    return [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": f"Who wrote poem number {i % 5}?"},
                {"role": "assistant", "content": f"Poet {i % 5} of the Tang dynasty wrote it."},
            ],
        }
        for i in range(n)
    ]


@pytest.fixture
def chat_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chat.jsonl", chat_rows())


@pytest.fixture
def write_recipe(tmp_path):
    """Write recipe YAML text (dedented) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


def tiny_recipe(model: Path, data: Path, root: Path, **sft) -> str:
    """A one-stage SFT recipe on the tiny model."""
    options = {"dataset": "d", "max_steps": 4, "batch_size": 4, "seq_len": 64, "logging_steps": 1, "save_steps": 2}
    options.update(sft)
    body = ", ".join(f"{k}: {v}" for k, v in options.items())
    return textwrap.dedent(f"""\
        name: tiny
        model: {{path: {model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        data:
          d: {{path: {data}, format: chat}}
        stages:
          - sft: {{{body}}}
        output: {{root: {root}}}
        """)


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `wenmai ARGS` in-process; returns (exit code, stdout, stderr)."""
    from finetune.cli import main

    def call(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["wenmai", *map(str, args)])
        monkeypatch.setenv("COLUMNS", "200")
        code = 0
        try:
            main()
        except SystemExit as exit_:
            code = exit_.code or 0
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return call


def run_recipe(recipe: str, run_dir: Path):
    """`wenmai run` in a subprocess, as a user starts it; its output is the failure message."""
    import subprocess

    from finetune.run_dir import RunDir

    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "run", recipe, "--run-dir", str(run_dir)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return RunDir.open(run_dir)


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The whole quickstart on SmolLM2 (sft, reward, dpo, evaluate, merge, export), run once for every slow test
    that reads it: a few minutes on 2 CPU cores."""
    return run_recipe("recipes/quickstart.yaml", tmp_path_factory.mktemp("quickstart") / "qs")
