"""The correctness guard: every speed path that runs on CPU trains to the same losses as the plain path, and
packed sequences score exactly as they do unpacked (each one sees only itself)."""

from __future__ import annotations

import pytest
from conftest import tiny_recipe
from tiny_models import write_jsonl

from finetune.pipeline import load_recipe, start
from finetune.run_dir import read_metrics

PLAIN = ("stages.sft.speed.padding_free=false", "stages.sft.speed.checkpointing=false", "stages.sft.speed.batch=fixed")
FAST_PATHS = {
    "padding-free": ("stages.sft.speed.padding_free=true",),
    "selective checkpointing": ("stages.sft.speed.checkpointing=selective", "stages.sft.speed.checkpoint_every=2"),
    "full checkpointing": ("stages.sft.speed.checkpointing=full",),
    "micro-batch 2 x 2": ("stages.sft.batch_size=2", "stages.sft.gradient_accumulation=2"),
    "all of them": (
        "stages.sft.speed.padding_free=true",
        "stages.sft.speed.checkpointing=selective",
        "stages.sft.batch_size=2",
        "stages.sft.gradient_accumulation=2",
    ),
}
STEPS = 5


def varied_rows(n: int = 24) -> list[dict]:
    """Chat records of very different lengths, so padding matters."""
    return [
        {
            "id": f"r{i}",
            "messages": [
                {"role": "user", "content": "Tell me about poem " + "and its lines " * (i % 6)},
                {"role": "assistant", "content": "Li Bai wrote it. " * (1 + (i * 7) % 9)},
            ],
        }
        for i in range(n)
    ]


def losses(tmp_path, tiny_model, name: str, overrides: tuple[str, ...]) -> list[float]:
    data = write_jsonl(tmp_path / "varied.jsonl", varied_rows())
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        tiny_recipe(
            tiny_model,
            data,
            tmp_path / "runs",
            max_steps=STEPS,
            learning_rate=0.005,
            warmup=0,
            lr_scheduler="constant",
            save_steps=100,
        ),
        encoding="utf-8",
    )
    run_dir = start(load_recipe(path, [*PLAIN, *overrides]), tmp_path / "runs" / name, log=lambda _: None)
    return [row["loss"] for row in read_metrics(run_dir.metrics_path("sft")) if "loss" in row]


@pytest.fixture(scope="module")
def plain_losses(tmp_path_factory, tiny_model) -> list[float]:
    return losses(tmp_path_factory.mktemp("plain"), tiny_model, "plain", ())


@pytest.mark.parametrize("path", list(FAST_PATHS))
def test_fast_path_trains_to_the_plain_losses(tmp_path, tiny_model, plain_losses, path):
    fast = losses(tmp_path, tiny_model, path.replace(" ", "-"), FAST_PATHS[path])
    assert len(fast) == len(plain_losses) == STEPS
    assert max(abs(a - b) for a, b in zip(fast, plain_losses, strict=True)) < 2e-3, (fast, plain_losses)
    assert plain_losses[-1] < plain_losses[0]  # the run learns, so agreement is not agreement on nothing


@pytest.mark.slow  # compiling takes minutes on CPU
def test_compiled_model_trains_to_the_plain_losses(tmp_path, tiny_model, plain_losses):
    fast = losses(tmp_path, tiny_model, "compiled", ("stages.sft.speed.compile=true",))
    assert max(abs(a - b) for a, b in zip(fast, plain_losses, strict=True)) < 5e-3, (fast, plain_losses)


def test_packed_sequences_score_as_they_do_unpacked(tiny_model):
    """TRL's best-fit packing + padding-free batches: per-token losses equal to the unpacked, padded batch."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl.data_utils import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = [{"input_ids": [5 + (i * 13 + j) % 400 for j in range(n)]} for i, n in enumerate((30, 9, 17, 22, 5, 40))]
    packed = pack_dataset(Dataset.from_list(examples), seq_length=64, strategy="bfd").to_list()
    assert len(packed) < len(examples)  # several sequences share a row
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    def summed_loss(batch: dict) -> torch.Tensor:
        tokens = (batch["labels"][:, 1:] != -100).sum()
        # with a KV cache transformers skips its packed-sequence mask; TRL's forward turns the cache off, as here
        return model(**batch, use_cache=False).loss * tokens, tokens

    with torch.no_grad():
        plain, plain_tokens = summed_loss(DataCollatorForLanguageModeling(pad_token_id=0)(examples))
        fast, fast_tokens = summed_loss(DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(packed))
    assert plain_tokens == fast_tokens == sum(n - 1 for n in (30, 9, 17, 22, 5, 40))
    assert torch.allclose(plain, fast, rtol=1e-5), (plain, fast)
