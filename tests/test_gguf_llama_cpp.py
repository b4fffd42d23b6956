"""GGUF files checked by llama.cpp itself (llama-cpp-python): F32 logits against the HF model, and its tokenizer.

Tiny random-init models built here: a plain Llama, Llama-3.1-style llama3 rope scaling (written as llama.cpp's
`rope_freqs` tensor), linear rope scaling, and a Llama-2-style tokenizer with byte fallback (llama.cpp's
`llama` tokenizer). Logits are compared, not greedy tokens (which tie too easily on random models).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
from tiny_models import build_tokenizer, corpus

from finetune.errors import WenmaiError

PROBES = [
    "The Palace Museum in Beijing holds the Forbidden City's collections.",
    "故宫博物院位于北京。床前明月光，疑是地上霜。",
    "Li Bai wrote 静夜思 🐉 in the Tang dynasty; the marker token is ZZZ.",  # 🐉 is not in any tiny vocabulary
    "<|im_start|>user\nWho wrote Quiet Night Thought?<|im_end|>\n<|im_start|>assistant\n",
]
F32_TOLERANCE = 1e-3  # max |logit difference|; logits span several units here, measured gaps are 0.4-1.1e-4
# Rope scaling that matters within a few dozen positions: every wavelength above 16 positions is slowed.
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}


def build_byte_fallback_tokenizer(folder: Path):
    """A Llama-2/Mistral-style tokenizer: BPE converted from SentencePiece, with byte fallback.

    Like transformers' SentencePiece converter: `<unk> <s> </s>`, the 256 byte tokens, the pieces best first,
    every merge that makes a piece (`generate_merges`), a `▁` prepended and spaces as `▁`, BOS added. The
    alphabet is cut to 150 characters, so rarer characters of the probes go through byte fallback. ChatML
    tokens and template on top (a Mistral fine-tune's shape)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    from finetune.data.template import NAMED_TEMPLATES

    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    learner.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=500, limit_alphabet=150, show_progress=False))
    pieces = sorted(learner.get_vocab().items(), key=lambda item: item[1])
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece, _ in pieces:
        vocab.setdefault(piece, len(vocab))
    scores = {piece: -float(index) for index, piece in enumerate(vocab)}
    merges = generate_merges(vocab, scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, normalized=False) for t in ("<|im_start|>", "<|im_end|>")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<|im_end|>"
    )
    fast.chat_template = NAMED_TEMPLATES["chatml"]
    fast.save_pretrained(folder)
    return fast


def build_llama_tokenizer(folder: Path):
    """The same vocabulary as transformers 5 saves a Llama 2 or Mistral tokenizer: `LlamaTokenizer`, whose
    Metaspace puts '▁' before the first word of a text only (prepend_scheme 'first'), not after special tokens."""
    from transformers import AutoTokenizer

    build_byte_fallback_tokenizer(folder)
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "tokenizer_class": "LlamaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "tokenizer.json").read_text())["pre_tokenizer"]["prepend_scheme"] == "first"
    return tokenizer


TOKENIZERS = {"byte-level": build_tokenizer, "legacy": build_byte_fallback_tokenizer, "first": build_llama_tokenizer}


def build_llama(folder: Path, tokenizer: str = "byte-level", rope: dict | None = None) -> Path:
    """A tiny Llama (2 layers, head_dim 8, GQA) with wide random logits, saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    byte_fallback = tokenizer != "byte-level"
    tokenizer = TOKENIZERS[tokenizer](folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=not byte_fallback,  # both layouts: tied (stored once) and a separate lm_head
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        initializer_range=0.5,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def write_f32(folder: Path) -> Path:
    from transformers import AutoTokenizer

    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract
    from finetune.gguf_export import pre_tokenizer_name, write_gguf

    tokenizer = AutoTokenizer.from_pretrained(folder)
    contract = template_contract(tokenizer, end_of_turn_ids(tokenizer))
    write_gguf(folder, folder / "m.gguf", "f32", contract, "tiny", pre_tokenizer_name(folder, None)[0], {})
    return folder / "m.gguf"


def hf_logits(folder: Path) -> list:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for text in PROBES:
            ids = tokenizer(text)["input_ids"]
            out.append((ids, model(torch.tensor([ids])).logits[0].numpy()))
    return out


def llama_cpp_logits(gguf_file: Path, probes: list) -> list:
    """llama.cpp's logits for each probe's token ids, and its own tokenization of each probe's text."""
    import numpy as np

    try:
        import llama_cpp
    except ImportError:
        reason = "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36; .ci/run installs it)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"llama.cpp checks are required under CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    # KV cache in F32 (llama.cpp's default is F16): the comparison is of the file, not of cache rounding
    llm = llama_cpp.Llama(
        model_path=str(gguf_file), n_ctx=128, logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0
    )
    out = []
    for (ids, _), text in zip(probes, PROBES, strict=True):
        llm.reset()
        llm.eval(ids)
        tokens = llm.tokenize(
            text.encode("utf-8"), add_bos=llm.metadata.get("tokenizer.ggml.add_bos_token") == "true", special=True
        )
        out.append((tokens, np.array(llm.scores[: len(ids)])))
    llm.close()
    return out


def max_gap(hf: list, cpp: list) -> float:
    return max(float(abs(h[1] - c[1]).max()) for h, c in zip(hf, cpp, strict=True))


@pytest.mark.parametrize(
    "shape",
    [
        {"name": "llama"},
        {"name": "llama3-rope", "rope": LLAMA3_ROPE},
        {"name": "linear-rope", "rope": LINEAR_ROPE},
        {"name": "byte-fallback", "tokenizer": "legacy"},
        {"name": "byte-fallback-first", "tokenizer": "first"},
    ],
    ids=lambda s: s["name"],
)
def test_llama_cpp_runs_the_f32_gguf_like_the_hf_model(tmp_path, shape, record_property):
    folder = build_llama(tmp_path / shape["name"], shape.get("tokenizer", "byte-level"), shape.get("rope"))
    hf = hf_logits(folder)
    cpp = llama_cpp_logits(write_f32(folder), hf)
    gap = max_gap(hf, cpp)
    record_property("max_abs_logit_gap", gap)
    print(f"{shape['name']}: max |logit gap| llama.cpp vs HF = {gap:.2e}")
    assert gap < F32_TOLERANCE
    assert max(float(abs(h[1]).max()) for h in hf) > 1.0  # logits wide enough for the tolerance to mean something
    # llama.cpp's tokenizer splits every probe as HF does; with Metaspace 'first' every probe that starts with a
    # special token (as chat-template prompts do), and plain text differs only in its first word
    same = [i for i, text in enumerate(PROBES) if shape.get("tokenizer") != "first" or text.startswith("<|")]
    assert [cpp[i][0] for i in same] == [hf[i][0] for i in same]
    if shape.get("tokenizer"):
        assert any(0 < i < 259 for h in hf for i in h[0][1:])  # 🐉 and rare characters went through byte tokens


def test_rope_scaling_is_visible_in_llama_cpp_logits(tmp_path):
    """The scaling check can fail: without `rope_freqs`, llama.cpp's logits leave the tolerance."""
    from gguf import GGUFReader

    folder = build_llama(tmp_path / "llama3", rope=LLAMA3_ROPE)
    hf = hf_logits(folder)
    gguf_file = write_f32(folder)
    assert "rope_freqs.weight" in {t.name for t in GGUFReader(gguf_file).tensors}
    config = json.loads((folder / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (folder / "config.json").write_text(json.dumps(config))
    unscaled = write_f32(folder)  # the same weights, written as if there were no scaling
    assert max_gap(hf, llama_cpp_logits(unscaled, hf)) > 50 * F32_TOLERANCE


def test_the_gguf_carries_the_template_stop_ids_and_tokenizer_for_transformers(tmp_path):
    """Loaded through transformers from a folder of its own, the GGUF has the chat template, EOS and vocabulary."""
    import shutil

    from transformers import AutoTokenizer

    folder = build_llama(tmp_path / "bf", "first")
    gguf_file = write_f32(folder)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(gguf_file, alone / gguf_file.name)
    original = AutoTokenizer.from_pretrained(folder)
    rebuilt = AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file.name)
    assert rebuilt.chat_template == original.chat_template
    assert (rebuilt.eos_token, rebuilt.eos_token_id) == ("<|im_end|>", original.eos_token_id)
    for text in PROBES[-1:]:  # a chat prompt; transformers adds no '▁' before plain text, as llama.cpp does not
        assert rebuilt(text)["input_ids"] == original(text)["input_ids"], text


def test_unsupported_rope_and_tokenizers_are_refused_with_the_llama_cpp_command(tmp_path):
    from finetune.gguf_export import check_supported

    folder = build_llama(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    tokenizer_json = folder / "tokenizer.json"
    for rope in ({"rope_type": "yarn", "factor": 4.0}, {"rope_type": "longrope"}):
        with pytest.raises(WenmaiError, match=rf"rope scaling.*{rope['rope_type']}.*convert_hf_to_gguf"):
            check_supported({**config, "rope_parameters": rope}, tokenizer_json)
    qwen = {**config, "architectures": ["Qwen2ForCausalLM"], "rope_parameters": LLAMA3_ROPE}
    with pytest.raises(WenmaiError, match=r"llama3 for Llama only.*convert_hf_to_gguf"):
        check_supported(qwen, tokenizer_json)
    # a byte-fallback BPE whose merges are not SentencePiece's: llama.cpp would merge "ab" + "c" too
    odd = tmp_path / "odd.json"
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "bc": 4, "abc": 5}
    odd.write_text(
        json.dumps({"model": {"type": "BPE", "byte_fallback": True, "vocab": vocab, "merges": ["a b", "b c", "a bc"]}})
    )
    with pytest.raises(WenmaiError, match=r"'abc'.*'ab' \+ 'c'.*convert_hf_to_gguf"):
        check_supported(config, odd)
    unigram = tmp_path / "unigram.json"
    unigram.write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(WenmaiError, match=r"this one is Unigram.*convert_hf_to_gguf"):
        check_supported(config, unigram)


@pytest.mark.parametrize("tokenizer", ["byte-level", "first"])
def test_a_llama3_rope_run_exports_gguf_that_passes_the_gate(tmp_path, tokenizer):
    """Train, merge and export a Llama-3.1-shaped model (llama3 rope; also with a Mistral-style tokenizer): the
    GGUF gate compares the file's weights with the HF export and checks its template, EOS and tokenizer."""
    from conftest import tiny_recipe
    from tiny_models import write_jsonl

    from finetune.pipeline import load_recipe, start
    from finetune.post_run import extend_run

    model = build_llama(tmp_path / "model", tokenizer, LLAMA3_ROPE)
    rows = [
        {"messages": [{"role": "user", "content": f"Who wrote poem {i}?"}, {"role": "assistant", "content": "Li Bai."}]}
        for i in range(8)
    ]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(tiny_recipe(model, write_jsonl(tmp_path / "d.jsonl", rows), tmp_path / "runs", max_steps=2))
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "r", log=lambda _: None)
    export = {"formats": ["hf", "gguf"], "gguf_types": ["f32"]}
    extend_run(run_dir.root, [("merge", {}), ("export", export)], log=lambda _: None)
    report = json.loads((run_dir.root / "export" / "parity.json").read_text())
    gguf = report["comparisons"]["GGUF F32"]
    assert report["passed"] and gguf["max_abs_logit_diff"] < 1e-5
    assert gguf["reference"] == "HF export (rope llama3 from config.json)"
    # llama.cpp encodes every probe as training did; without it, transformers' rebuild checks byte-level files only
    byte_fallback_unchecked = tokenizer != "byte-level" and importlib.util.find_spec("llama_cpp") is None
    assert gguf.get("tokenizer_agreement") == (None if byte_fallback_unchecked else 1.0)
