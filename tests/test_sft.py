"""The SFT stage end to end on a tiny model: learning, invariance, saving, the template contract, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import chat_rows, tiny_recipe
from tiny_models import write_jsonl

from finetune.errors import WenmaiError
from finetune.pipeline import load_recipe, start
from finetune.run_dir import RunDir, read_metrics

ROOT = Path(__file__).resolve().parent.parent


def run_tiny(tmp_path, tiny_model, data, name="run", overrides=(), **sft) -> RunDir:
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(tiny_recipe(tiny_model, data, tmp_path / "runs", **sft), encoding="utf-8")
    return start(load_recipe(recipe, list(overrides)), tmp_path / "runs" / name, log=lambda _: None)


def adapter_tensors(run_dir: RunDir) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir.output("sft", "adapter") / "adapter_model.safetensors")


def test_loss_falls_and_adapter_loads_with_plain_peft(tmp_path, tiny_model, chat_file):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir = run_tiny(
        tmp_path,
        tiny_model,
        chat_file,
        max_steps=40,
        learning_rate=0.01,
        eval_fraction=0.1,
        eval_steps=40,
        warmup=0,
        lr_scheduler="constant",
    )
    summary = run_dir.status("sft").summary
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.2, summary
    losses = [row["loss"] for row in read_metrics(run_dir.metrics_path("sft")) if "loss" in row]
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3, losses

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    base_logits = base(ids).logits
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), str(run_dir.output("sft", "adapter"))
    )
    assert not torch.allclose(tuned(ids).logits, base_logits, atol=1e-4)


def test_batch_8_equals_batch_1_times_accumulation_8(tmp_path, tiny_model):
    import torch

    rows = chat_rows(16)
    for i, row in enumerate(rows):  # uneven lengths, so padding and token counts differ between layouts
        row["messages"][1]["content"] += " Indeed." * (i % 4)
    data = write_jsonl(tmp_path / "uneven.jsonl", rows)
    # plain SGD: the update is the gradient itself (Adam's first step is sign-like and amplifies float noise)
    common = dict(max_steps=1, learning_rate=1.0, warmup=0, lr_scheduler="constant", optimizer="sgd")
    big = adapter_tensors(run_tiny(tmp_path, tiny_model, data, "big", batch_size=8, gradient_accumulation=1, **common))
    small = adapter_tensors(
        run_tiny(tmp_path, tiny_model, data, "small", batch_size=1, gradient_accumulation=8, **common)
    )
    changed = [k for k in big if "lora_B" in k and big[k].abs().max() > 0]
    assert changed, "the step changed nothing: the comparison would be vacuous"
    for key in big:
        torch.testing.assert_close(big[key], small[key], rtol=1e-4, atol=1e-6)


def test_template_contract_is_recorded_and_catches_edited_tokenizer(tmp_path, tiny_model, chat_file):
    from transformers import AutoTokenizer

    from finetune.data.template import read_contract, verify_contract

    run_dir = run_tiny(tmp_path, tiny_model, chat_file, max_steps=1)
    folder = run_dir.root / "sft"
    contract = read_contract(folder)
    tokenizer = AutoTokenizer.from_pretrained(run_dir.output("sft", "tokenizer"))
    assert contract["eos_token_id"] == tokenizer.eos_token_id and contract["stop_token_ids"] == [tokenizer.eos_token_id]
    verify_contract(tokenizer, contract, "the saved tokenizer")  # unchanged: no error

    tokenizer.chat_template = tokenizer.chat_template.replace("<|im_end|>", "</s>")
    with pytest.raises(WenmaiError, match="chat_template_sha256: trained with"):
        verify_contract(tokenizer, contract, "export")


def test_existing_run_folder_is_refused(tmp_path, tiny_model, chat_file):
    run_tiny(tmp_path, tiny_model, chat_file, "same", max_steps=1)
    with pytest.raises(WenmaiError, match="already exists; continue it with `wenmai run --resume"):
        run_tiny(tmp_path, tiny_model, chat_file, "same", max_steps=1)


def test_failed_stage_is_recorded_and_leaves_no_adapter(tmp_path, tiny_model, chat_file, monkeypatch):
    from finetune.stages import sft

    def disk_full(ctx):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sft, "run", disk_full)
    with pytest.raises(OSError):
        run_tiny(tmp_path, tiny_model, chat_file, "full", max_steps=1)
    run_dir = RunDir(tmp_path / "runs" / "full")
    status = run_dir.status("sft")
    assert status.state == "failed" and "No space left" in status.error
    assert not (run_dir.root / "sft" / "adapter").exists()


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune.cli", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def test_resume_continues_loss_curve_after_kill(tmp_path, tiny_model):
    """SIGKILL a real run mid-training; the resumed curve continues it and matches an uninterrupted run."""
    data = write_jsonl(tmp_path / "d.jsonl", chat_rows(64))
    recipe = tmp_path / "resume.yaml"
    recipe.write_text(
        tiny_recipe(
            tiny_model,
            data,
            tmp_path / "runs",
            max_steps=160,
            save_steps=20,
            learning_rate=0.003,
            eval_fraction=0.25,
            eval_steps=40,
        ).replace("dropout: 0.0", "dropout: 0.1"),
        encoding="utf-8",
    )
    reference = _run_cli(["run", str(recipe), "--run-dir", str(tmp_path / "reference")])
    killed_dir = tmp_path / "killed"
    victim = _run_cli(["run", str(recipe), "--run-dir", str(killed_dir)])
    marker = killed_dir / "sft" / "checkpoints" / "checkpoint-40" / "trainer_state.json"
    deadline = time.time() + 300  # bounded; generous for a loaded machine
    while not marker.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert marker.exists(), "the run ended before its checkpoint: cannot test resume"
    assert RunDir(killed_dir).status("sft").state == "running"  # killed: no status.json saying done
    steps_before = [r["step"] for r in read_metrics(killed_dir / "sft" / "metrics.jsonl") if "loss" in r]
    assert 40 <= max(steps_before) < 160

    resumed = _run_cli(["run", "--resume", str(killed_dir)])
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert "resuming from checkpoint-" in output
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    def losses(folder: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(folder / "sft" / "metrics.jsonl") if "loss" in r}

    got, want = losses(killed_dir), losses(tmp_path / "reference")
    assert sorted(got) == list(range(1, 161))  # every step once: no restart from 0, no duplicates
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-4), f"step {step}"
    assert json.loads((killed_dir / "sft" / "status.json").read_text())["attempts"] == 2

    # the held-out evaluation is logged once per boundary (not again at the resume step), and TRL's running
    # token count carries on from the checkpoint instead of restarting at 0
    def evals(folder: Path) -> list[int]:
        return [r["step"] for r in read_metrics(folder / "sft" / "metrics.jsonl") if "eval_loss" in r]

    def tokens(folder: Path) -> dict[int, float]:
        return {r["step"]: r["num_tokens"] for r in read_metrics(folder / "sft" / "metrics.jsonl") if "num_tokens" in r}

    assert evals(killed_dir) == evals(tmp_path / "reference") == [0, 40, 80, 120, 160]
    assert tokens(killed_dir) == tokens(tmp_path / "reference")
