"""GGUF files from an exported HF folder, written with the `gguf` package (llama.cpp's own Python library).

Why not llama.cpp's `convert_hf_to_gguf.py`: the `gguf` wheel does not ship it; the copy vendored in the
`llama-cpp-python` sdist is not importable as a package, needs `sentencepiece`, and its requirements pin
transformers 4.57 / torch 2.11 / protobuf<5, which conflict with ours; Unsloth fetches llama.cpp at run
time, which an offline machine cannot. So Wenmai writes the file itself for the architectures it knows, with
`gguf`'s writer, its tensor-name maps, its special-token reader and its quantisers, and follows llama.cpp's
conventions (checked tensor by tensor against the vendored converter, see scripts/bench/README.md):
Llama q/k weights permuted for llama.cpp's rotary layout, 1-D tensors kept in F32, tied embeddings
stored once. Any other architecture or tokenizer is refused with a pointer to llama.cpp's converter,
which reads the HF export folder as it is.
"""

from __future__ import annotations

import json
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
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", "default") not in ("default", None):
        raise WenmaiError(f"GGUF export does not write rope scaling ({rope.get('rope_type')}) yet; {LLAMA_CPP_HINT}")
    try:
        model = json.loads(tokenizer_json.read_text(encoding="utf-8"))["model"]
    except (OSError, KeyError, json.JSONDecodeError):
        raise WenmaiError(
            f"GGUF export needs a fast tokenizer (tokenizer.json) in the export; {LLAMA_CPP_HINT}"
        ) from None
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise WenmaiError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM style); "
            f"this one is {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}; "
            f"{LLAMA_CPP_HINT}"
        )
    return ARCHITECTURES[names[0]][0]


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
    matched against the rules transformers knows by llama.cpp name; a plain byte-level splitter is `gpt2`.
    """
    if source_gguf is not None:
        from gguf import GGUFReader

        field = GGUFReader(str(source_gguf)).fields.get("tokenizer.ggml.pre")
        if field is not None:
            return str(field.contents()), True
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        return "gpt2", True
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if splits:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

        for llama_cpp_name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():
            if regex == splits[0]:
                return llama_cpp_name, True
    return "default", False


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
    rope = config.get("rope_parameters") or {}
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


def _add_tokenizer(writer: Any, folder: Path, contract: dict, pre_tokenizer: str, config: dict) -> None:
    """Vocabulary, token types and merges from the export's tokenizer; EOS, pad, stop ids and template from the contract."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    special = set(tokenizer.all_special_ids)
    tokens, types = [], []
    for index in range(config["vocab_size"]):
        if index not in vocab:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
        elif index in special or (index in added and added[index].special):
            tokens.append(vocab[index])
            types.append(gguf.TokenType.CONTROL)
        elif index in added:
            tokens.append(vocab[index])
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(vocab[index])
            types.append(gguf.TokenType.NORMAL)
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
