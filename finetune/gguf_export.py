"""GGUF files from an exported HF folder, written with the `gguf` package (llama.cpp's own Python library).

Why not llama.cpp's `convert_hf_to_gguf.py`: the `gguf` wheel does not ship it; the copy vendored in the
`llama-cpp-python` sdist is not importable as a package, needs `sentencepiece`, and its requirements pin
transformers 4.57 / torch 2.11 / protobuf<5, which conflict with ours; Unsloth fetches llama.cpp at run
time, which an offline machine cannot. So Wenmai writes the file itself for the architectures it knows, with
`gguf`'s writer, its tensor-name maps, its special-token reader and its quantisers, and follows llama.cpp's
conventions (checked tensor by tensor against the vendored converter, see scripts/bench/README.md):
Llama q/k weights permuted for llama.cpp's rotary layout, 1-D tensors kept in F32, tied embeddings
stored once, llama3 rope scaling as the `rope_freqs` tensor and linear scaling as metadata. Byte-level BPE
tokenizers are written as llama.cpp's `gpt2` model, BPE with byte fallback (Llama 2, Mistral) as its `llama`
model. llama.cpp itself runs the files in tests/test_gguf_llama_cpp.py. Any other architecture, rope type
or tokenizer is refused with a pointer to llama.cpp's converter, which reads the HF export folder as it is.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

from finetune.errors import WenmaiError

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
ARCHITECTURES = {  # transformers class -> (llama.cpp architecture, permute q/k for rotary)
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Qwen3ForCausalLM": ("qwen3", False),
}
ROPE_TYPES = ("default", "linear", "llama3")  # what llama.cpp's converter writes the same way for these models
LLAMA_CPP_HINT = (
    "convert the HF export with llama.cpp instead: python convert_hf_to_gguf.py EXPORT_DIR "
    "--outtype q8_0 (from a llama.cpp checkout)"
)


def check_supported(config: dict, tokenizer_json: Path) -> str:
    """The llama.cpp architecture for this model; raise when the writer cannot convert it faithfully."""
    names = config.get("architectures") or ["?"]
    if names[0] not in ARCHITECTURES:
        raise WenmaiError(
            f"GGUF export supports {', '.join(ARCHITECTURES)}; this model is {names[0]}; {LLAMA_CPP_HINT}"
        )
    arch = ARCHITECTURES[names[0]][0]
    rope_type = rope_parameters(config).get("rope_type") or "default"
    if rope_type not in ROPE_TYPES or (rope_type == "llama3" and arch != "llama"):
        raise WenmaiError(
            f"GGUF export writes rope scaling {', '.join(ROPE_TYPES)} (llama3 for Llama only); this model's is "
            f"{rope_type}; {LLAMA_CPP_HINT}"
        )
    try:
        spec = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        model = spec["model"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise WenmaiError(
            f"GGUF export needs a fast tokenizer (tokenizer.json) in the export; {LLAMA_CPP_HINT}"
        ) from None
    if model.get("type") != "BPE":
        raise WenmaiError(
            f"GGUF export writes BPE tokenizers (byte-level as in GPT-2, Llama 3, Qwen, SmolLM; or with byte "
            f"fallback as in Llama 2, Mistral); this one is {model.get('type')}; {LLAMA_CPP_HINT}"
        )
    if model.get("byte_fallback"):
        _sentencepiece_scores(model)  # raises when llama.cpp's tokenizer would split text differently
    return arch


def rope_parameters(config: dict) -> dict:
    """The rope settings of an HF config (transformers 5 `rope_parameters`, older `rope_scaling`)."""
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def write_gguf(
    folder: Path,
    out_file: Path,
    gguf_type: str,
    contract: dict,
    name: str,
    pre_tokenizer: str,
    extra_metadata: dict[str, str],
) -> dict:
    """Write `folder` (an HF export) as one GGUF file of `gguf_type`; returns what was written."""
    import gguf
    from safetensors import safe_open

    started = time.perf_counter()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = check_supported(config, folder / "tokenizer.json")
    permute_qk = ARCHITECTURES[config["architectures"][0]][1]
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_name(name)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_file_type(_FILE_TYPES[gguf_type](gguf))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_hyperparameters(writer, config, arch)
    _add_tokenizer(writer, folder, contract, pre_tokenizer, config)
    for key, value in extra_metadata.items():
        writer.add_string(key, value)

    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), config["num_hidden_layers"])
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    tensors, tied = 0, config.get("tie_word_embeddings", False)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if tied and hf_name == "lm_head.weight":
                    continue
                target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if target is None:
                    raise WenmaiError(f"GGUF export: no GGUF name for tensor {hf_name}; {LLAMA_CPP_HINT}")
                data = f.get_tensor(hf_name).float().numpy()
                if permute_qk and target.endswith("attn_q.weight"):
                    data = _rotary_permute(data, heads)
                elif permute_qk and target.endswith("attn_k.weight"):
                    data = _rotary_permute(data, kv_heads)
                array, qtype = _encode(gguf, data, gguf_type)
                writer.add_tensor(target, array, raw_dtype=qtype)
                tensors += 1
    factors = llama3_rope_factors(config)
    if factors is not None:  # llama.cpp divides each rotary frequency by its factor, as transformers' llama3 rope does
        writer.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors)
        tensors += 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "file": out_file.name,
        "type": gguf_type,
        "tensors": tensors,
        "bytes": out_file.stat().st_size,
        "pre_tokenizer": pre_tokenizer,
        "seconds": round(time.perf_counter() - started, 2),
    }


def pre_tokenizer_name(folder: Path, source_gguf: Path | None) -> tuple[str, bool]:
    """llama.cpp's name for how this tokenizer splits text before BPE, and whether it was recognised.

    A base model that came from a GGUF keeps its file's name. Otherwise the split rule in tokenizer.json is
    matched against the rules transformers knows by llama.cpp name; a plain byte-level splitter is `gpt-2`.
    """
    if source_gguf is not None:
        from gguf import GGUFReader

        field = GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents()), True
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt-2", True  # llama.cpp's name ("gpt2" is its tokenizer model, refused as a pre-tokenizer)
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if splits:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for llama_cpp_name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == splits[0]:
                return llama_cpp_name, True
    return "default", False


def tokenizer_agreement(
    gguf_file: Path, contract: dict, texts: list[str], expected: list[list[int]], max_tokens: int
) -> float | None:
    """Share of `texts` the GGUF's own tokenizer encodes to `expected` (their last `max_tokens` ids).

    Raises when the file's chat template or EOS is not the template contract's. The tokenizer is llama.cpp's
    when llama-cpp-python is installed; otherwise the one transformers rebuilds from the file, for byte-level
    BPE files only (for byte-fallback ones it puts '▁' where llama.cpp does not): None then, nothing checked."""
    rebuilt = tokenizer_from_gguf(gguf_file)
    found = (rebuilt.chat_template, rebuilt.eos_token_id)
    if found != (contract["chat_template"], contract["eos_token_id"]):
        raise WenmaiError(
            f"template contract broken at {gguf_file.name}: loaded with transformers it has EOS id {found[1]} and "
            f"{'the' if found[0] == contract['chat_template'] else 'another'} chat template; training's EOS is "
            f"{contract['eos_token_id']}"
        )
    try:
        import llama_cpp
    except ImportError:
        from gguf import GGUFReader

        if GGUFReader(str(gguf_file)).fields["tokenizer.ggml.model"].contents() != "gpt2":
            return None

        def encode(text: str) -> list[int]:
            return rebuilt(text, add_special_tokens=False)["input_ids"]

    else:
        vocab = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)

        def encode(text: str) -> list[int]:
            return vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    same = sum(encode(text)[-max_tokens:] == ids for text, ids in zip(texts, expected, strict=True))
    return same / max(len(texts), 1)


def tokenizer_from_gguf(gguf_file: Path) -> Any:
    """The tokenizer transformers builds from the GGUF alone, with the file's chat template and EOS.

    Given `gguf_file=` on the export folder, transformers builds the tokenizer from the folder's tokenizer.json
    and reads neither the folder's template nor the file's; a folder holding only the GGUF avoids that."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="wenmai-gguf-") as alone:
        (Path(alone) / gguf_file.name).symlink_to(gguf_file.resolve())
        return AutoTokenizer.from_pretrained(alone, gguf_file=gguf_file.name)


def gguf_file_name(name: str, gguf_type: str) -> str:
    return f"{name}-{gguf_type.upper()}.gguf"


# --- helpers -------------------------------------------------------------------------------------

_FILE_TYPES = {
    "f32": lambda g: g.LlamaFileType.ALL_F32,
    "f16": lambda g: g.LlamaFileType.MOSTLY_F16,
    "bf16": lambda g: g.LlamaFileType.MOSTLY_BF16,
    "q8_0": lambda g: g.LlamaFileType.MOSTLY_Q8_0,
}


def _add_hyperparameters(writer: Any, config: dict, arch: str) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = rope_parameters(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if rope.get("rope_type") == "linear":  # llama3: the rope_freqs tensor (`llama3_rope_factors`)
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def llama3_rope_factors(config: dict) -> Any:
    """llama.cpp's `rope_freqs` for the llama3 rope type (Llama 3.1-3.3): one divisor per rotary frequency.

    The formula of llama.cpp's converter (`LlamaModel.generate_extra_tensors`) and transformers'
    `_compute_llama3_parameters`: long wavelengths are slowed by `factor`, short ones kept, and the band between
    interpolated. Computed in float32 torch arithmetic as the converter does, so the bytes are the same. None
    for any other rope type."""
    import torch

    rope = rope_parameters(config)
    if rope.get("rope_type") != "llama3":
        return None
    base = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32).numpy()


def _add_tokenizer(writer: Any, folder: Path, contract: dict, pre_tokenizer: str, config: dict) -> None:
    """Vocabulary, token types and merges from the export's tokenizer; EOS, pad, stop ids and template from the contract.

    A byte-level BPE is written as llama.cpp's `gpt2` model. A BPE with byte fallback (converted from
    SentencePiece: Llama 2, Mistral) is written as its `llama` model, which merges the pair whose result has the
    highest score: each token's score is minus the rank of its first merge, so the merge order is BPE's.
    """
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    byte_fallback = bool(model.get("byte_fallback"))
    scores = _sentencepiece_scores(model) if byte_fallback else {}
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids)
    tokens, types, token_scores = [], [], []
    for index in range(config["vocab_size"]):
        token = vocab.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif byte_fallback and index == tokenizer.unk_token_id:
            tokens.append(token)
            types.append(gguf.TokenType.UNKNOWN)
        elif index in special or (index in added and added[index].special):
            tokens.append(token)
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            tokens.append(token)
            types.append(gguf.TokenType.USER_DEFINED)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(gguf.TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
        token_scores.append(scores.get(token, -1000.0) if types[-1] == gguf.TokenType.NORMAL else -1000.0)
    if byte_fallback:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_space_prefix(_space_prefix(tokenizer, contract["eos_token"]))
        writer.add_token_scores(token_scores)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special_vocab = gguf.SpecialVocab(folder, load_merges=True, n_vocab=config["vocab_size"])
    special_vocab.special_token_ids["eos"] = contract["eos_token_id"]
    special_vocab.special_token_ids["pad"] = contract["pad_token_id"]
    others = [i for i in contract["stop_token_ids"] if i != contract["eos_token_id"]]
    if others:
        special_vocab.special_token_ids["eot"] = others[0]  # llama.cpp stops on EOS and EOT
    special_vocab.chat_template = contract["chat_template"]
    bos = tokenizer.bos_token_id  # add BOS only if the HF tokenizer does (chat templates usually write their own)
    special_vocab.add_special_token["bos"] = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    special_vocab.add_to_gguf(writer, quiet=True)


def _space_prefix(tokenizer: Any, special: str) -> bool:
    """llama.cpp's `add_space_prefix`: whether a '▁' goes before text at the start and after each special token.

    Legacy Llama 2 tokenizers (and Metaspace 'always') put one at both places, 'never' at neither: llama.cpp
    matches them exactly. transformers 5 rebuilds Llama/Mistral tokenizers with Metaspace 'first': at the start
    of the text only. llama.cpp cannot say that; without a prefix it matches every text that starts with a
    special token (each chat-template prompt), and differs only in the first word of text that does not."""

    def prefixed(text: str, skip: int) -> bool:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(text, add_special_tokens=False)["input_ids"])
        return pieces[skip].startswith("\u2581")

    return prefixed("a", 0) and prefixed(special + "a", 1)


def _sentencepiece_scores(model: dict) -> dict[str, float]:
    """Each merged token's score for llama.cpp's `llama` tokenizer: minus the rank of the merge that makes it.

    llama.cpp merges any adjacent pair whose concatenation is in the vocabulary, best score first; BPE applies
    only its listed merges. The two agree when every way of cutting a merged token into two known tokens is a
    listed merge, as in tokenizers converted from SentencePiece; anything else is refused."""
    vocab = model.get("vocab") or {}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges") or []]
    listed = set(merges)
    scores: dict[str, float] = {}
    for rank, (left, right) in enumerate(merges):
        scores.setdefault(left + right, -float(rank))
    for token in scores:
        for cut in range(1, len(token)):
            pair = (token[:cut], token[cut:])
            if pair[0] in vocab and pair[1] in vocab and pair not in listed:
                raise WenmaiError(
                    f"GGUF export: this byte-fallback tokenizer makes {token!r} by one merge but not by "
                    f"{pair[0]!r} + {pair[1]!r}, so llama.cpp's tokenizer would split text differently; "
                    f"{LLAMA_CPP_HINT}"
                )
    return scores


def _rotary_permute(weight: Any, heads: int) -> Any:
    """HF stores each head's rotary halves apart ([x0..x31, y0..y31]); llama.cpp wants them interleaved."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(gguf: Any, data: Any, gguf_type: str) -> tuple[Any, Any]:
    """A tensor in the file's type; 1-D tensors (norms, biases) stay F32 as llama.cpp expects."""
    import numpy as np

    qtypes = gguf.GGMLQuantizationType
    if data.ndim <= 1 or gguf_type == "f32":
        return data.astype(np.float32), qtypes.F32
    if gguf_type == "f16":
        return data.astype(np.float16), qtypes.F16
    qtype = qtypes.BF16 if gguf_type == "bf16" else qtypes.Q8_0
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.quants.QuantError:  # rows not a multiple of the block size: llama.cpp falls back to F16 too
        return data.astype(np.float16), qtypes.F16
