"""Two processes on CPU (torchrun, gloo) through `wenmai launch --cpu`: the SFT stage finishes, only rank 0
writes the run folder, and the saved adapter is the one every rank holds (DDP, and DeepSpeed ZeRO-3)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import chat_rows, tiny_recipe
from tiny_models import write_jsonl

from finetune.pipeline import load_recipe, start
from finetune.run_dir import RunDir, read_metrics

ROOT = Path(__file__).resolve().parent.parent
# plain SGD, one step: the update is the gradient itself, so layouts can be compared closely
SGD = dict(max_steps=2, learning_rate=0.5, warmup=0, lr_scheduler="constant", optimizer="sgd", save_steps=1)


@pytest.fixture
def uneven_data(tmp_path) -> Path:
    rows = chat_rows(16)
    for i, row in enumerate(rows):  # uneven lengths: padding and token counts differ between batch layouts
        row["messages"][1]["content"] += " Indeed." * (i % 4)
    return write_jsonl(tmp_path / "uneven.jsonl", rows)


def launch_two(tmp_path: Path, recipe_text: str, name: str) -> tuple[subprocess.CompletedProcess, RunDir, Path]:
    """`wenmai launch RECIPE --gpus 2 --cpu` with every write under the run folder audited per rank."""
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(recipe_text, encoding="utf-8")
    audit = tmp_path / f"audit-{name}"
    audit.mkdir()
    shutil.copy(Path(__file__).parent / "rank_audit.py", audit / "sitecustomize.py")
    run_dir = tmp_path / "runs" / name
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(audit), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "WENMAI_AUDIT_ROOT": str(run_dir),
        "WENMAI_AUDIT_LOG": str(audit / "log"),
        "PYTHONUNBUFFERED": "1",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "launch",
            str(recipe),
            "--gpus",
            "2",
            "--cpu",
            "--run-dir",
            str(run_dir),
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]
    return result, RunDir.open(run_dir), audit / "log"


def writes(log: Path, rank: int) -> list[str]:
    path = Path(f"{log}.rank{rank}")
    return [line.split("\t", 1)[1] for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def assert_only_rank0_writes(log: Path) -> None:
    mine = writes(log, 0)
    assert "recipe.yaml" in mine and "sft/status.json" in mine and any(p.startswith("sft/adapter") for p in mine), mine
    others = writes(log, 1)
    # rank 1 writes only its own trainer-checkpoint shards (RNG state, ZeRO partitions): never a Wenmai file
    assert all(p.startswith("sft/checkpoints/") for p in others), others


def saved_and_held(run_dir: RunDir, log: Path) -> tuple[dict, list[dict]]:
    import torch
    from safetensors.torch import load_file

    saved = load_file(run_dir.output("sft", "adapter") / "adapter_model.safetensors")
    held = [torch.load(f"{log}.adapter{rank}.pt") for rank in (0, 1)]
    return saved, held


def assert_same(a: dict, b: dict, atol: float) -> None:
    import torch

    assert set(a) == set(b) and a, (sorted(a)[:3], sorted(b)[:3])
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=atol, msg=key)


def test_two_process_ddp_run_matches_one_process_and_only_rank0_writes(tmp_path, tiny_model, uneven_data):
    text = (
        tiny_recipe(tiny_model, uneven_data, tmp_path / "runs", batch_size=2, gradient_checkpointing=True, **SGD)
        + "distributed: {strategy: ddp}\n"
    )  # checkpointing: DDP + reentrant checkpointing on a PeftModel
    result, run_dir, log = launch_two(tmp_path, text, "ddp")

    assert result.stdout.count("run finished:") == 1 and result.stderr.count("run folder:") == 1  # quiet rank 1
    status = run_dir.status("sft")
    assert status.state == "done" and status.summary["steps"] == 2
    assert [r["step"] for r in read_metrics(run_dir.metrics_path("sft")) if "loss" in r] == [1, 2]  # one writer
    assert_only_rank0_writes(log)

    saved, (rank0, rank1) = saved_and_held(run_dir, log)
    assert_same(rank0, rank1, atol=0)  # DDP keeps every replica identical
    assert_same(saved, rank0, atol=1e-7)
    changed = [k for k in saved if "lora_B" in k and saved[k].abs().max() > 0]
    assert changed, "training changed nothing: the comparison would be vacuous"

    # one process with the same global batch (4 = 2 processes x 2) takes the same steps
    recipe = tmp_path / "one.yaml"
    recipe.write_text(tiny_recipe(tiny_model, uneven_data, tmp_path / "runs", batch_size=4, **SGD), encoding="utf-8")
    single = start(load_recipe(recipe), tmp_path / "runs" / "one", log=lambda _: None)
    from safetensors.torch import load_file

    assert_same(saved, load_file(single.output("sft", "adapter") / "adapter_model.safetensors"), atol=1e-5)


def test_two_process_zero3_run_saves_a_gathered_adapter_that_loads_without_deepspeed(tmp_path, tiny_model, uneven_data):
    pytest.importorskip("deepspeed")
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    text = (
        tiny_recipe(
            tiny_model, uneven_data, tmp_path / "runs", batch_size=2, max_steps=2, learning_rate=0.01, save_steps=1
        )
        + "distributed: {strategy: deepspeed, zero_stage: 3}\n"
    )
    _, run_dir, log = launch_two(tmp_path, text, "zero3")

    assert run_dir.status("sft").state == "done"
    assert_only_rank0_writes(log)
    saved, (rank0, rank1) = saved_and_held(run_dir, log)
    assert_same(rank0, rank1, atol=0)  # the gathered shards agree on every rank
    assert_same(saved, rank0, atol=1e-7)
    assert all(t.numel() > 0 for t in saved.values())  # not the empty ZeRO-3 save of DeepSpeed #7900
    assert run_dir.status("sft").summary["trainable_parameters"] == sum(t.numel() for t in saved.values())

    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), str(run_dir.output("sft", "adapter"))
    )
    assert not torch.allclose(tuned(ids).logits, before, atol=1e-5)


def test_qlora_zero3_benchmark_harness_runs_on_cpu(tmp_path):
    """scripts/bench/qlora_zero3.py on a tiny shape without quantization: both configurations train, save, reload."""
    import json

    pytest.importorskip("deepspeed")  # the zero3 configuration needs it; it is in the `gpu` extra, not in CI

    result = subprocess.run(
        [
            sys.executable,
            "scripts/bench/qlora_zero3.py",
            "--shape",
            "tiny",
            "--quantization",
            "none",
            "--steps",
            "1",
            "--seq-len",
            "64",
            "--workdir",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["config"] for r in rows] == ["plain", "zero3"]
    for row in rows:
        assert row["ok"], row.get("error")
        assert row["reload_ok"] and row["adapter_weights"] > 0 and row["adapter_changes_logits"], row
        assert row["estimate_parts"]["weights"] > 0 and row["estimate_bytes"] > 0
    assert "| zero3 | none | cpu | True |" in result.stdout


def test_two_process_zero3_qlora_run_matches_one_process_qlora(tmp_path, tiny_model, uneven_data):
    """The mission's shape on CPU: nf4 base (bitsandbytes, stored in float32 so ZeRO-3 can shard it), LoRA on all
    linear layers, ZeRO-3 over two gloo processes through `wenmai launch --cpu`; the saved adapter is not empty
    and equals what one process training QLoRA on the same global batch saves."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    def qlora(batch_size: int) -> str:
        text = tiny_recipe(tiny_model, uneven_data, tmp_path / "runs", batch_size=batch_size, **SGD)
        return text.replace(f"{{path: {tiny_model}}}", f"{{path: {tiny_model}, quantization: nf4, dtype: float32}}")

    two = qlora(2)
    assert "quantization: nf4" in two
    result, run_dir, log = launch_two(tmp_path, two + "distributed: {strategy: deepspeed, zero_stage: 3}\n", "zq")
    assert run_dir.status("sft").state == "done"
    assert "nf4 on a machine without CUDA" in result.stdout + result.stderr  # pre-flight said it is slow on CPU
    saved, (rank0, rank1) = saved_and_held(run_dir, log)
    assert_same(rank0, rank1, atol=0)
    assert all(t.numel() > 0 for t in saved.values()) and len(saved) == 28  # 7 linear layers x 2 blocks x A, B
    changed = [k for k in saved if "lora_B" in k and saved[k].abs().max() > 0]
    assert changed, "training changed nothing: the comparison would be vacuous"

    recipe = tmp_path / "one-q.yaml"
    recipe.write_text(qlora(4), encoding="utf-8")
    single = start(load_recipe(recipe), tmp_path / "runs" / "one-q", log=lambda _: None)
    one = load_file(single.output("sft", "adapter") / "adapter_model.safetensors")
    # TRL keeps a QLoRA adapter in bfloat16 (the QLoRA paper's recipe): the two layouts sum gradients in another
    # order, so each tensor agrees to a bfloat16 step at its largest value (2^-7 of it), not to float32 rounding
    assert {str(t.dtype) for t in one.values()} == {"torch.bfloat16"}
    assert set(saved) == set(one)
    for key in saved:
        gap, scale = (saved[key].float() - one[key].float()).abs().max(), one[key].float().abs().max()
        assert gap <= scale * 2**-7, (key, float(gap), float(scale))
