"""Tiny random-init models and tokenizers, built locally in seconds (no hub)."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_TEXT = [
    "The Palace Museum in Beijing holds the Forbidden City's collections.",
    "Li Bai wrote Quiet Night Thought in the Tang dynasty.",
    "故宫博物院位于北京。李白是唐代诗人。床前明月光，疑是地上霜。",
    "Answer: A B C D. The marker token is ZZZ and the other is QQQ.",
]


def corpus() -> list[str]:
    """Text to train the tiny tokenizer on: built-in sentences plus the shipped sample data."""
    texts = list(SAMPLE_TEXT)
    for path in sorted((ROOT / "recipes" / "data").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            texts.append(line)
    return texts


def build_tokenizer(folder: Path, vocab_size: int = 600):
    """A byte-level BPE tokenizer with ChatML special tokens and the ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from finetune.data.template import NAMED_TEMPLATES

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token=None)
    fast.chat_template = NAMED_TEMPLATES["chatml"]
    fast.save_pretrained(folder)
    return fast


def build_model(
    folder: Path, hidden: int = 32, layers: int = 2, seed: int = 0, initializer_range: float = 0.02
) -> Path:
    """A tiny Llama-architecture causal LM with its tokenizer, saved as a from_pretrained folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=initializer_range,  # larger: wider logits, so a LoRA can make the model confident
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


if __name__ == "__main__":
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/tiny-model")
    print(build_model(target))
