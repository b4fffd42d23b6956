"""The model zoo (configs/models/): each family's fragment, on a tiny random-init model of that family's own config
class and a tokenizer with its special tokens, with its real chat template: the labels cover exactly the assistant
turns and their end-of-turn token, generation stops there, and the template contract survives the export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from finetune.config_io import CONFIGS_DIR
from finetune.data.chat import IGNORE_INDEX, render, tokenize_chat
from finetune.data.template import read_contract, training_contract
from finetune.errors import DataError
from finetune.model import ModelSource, load_tokenizer
from finetune.recipe import LoraSection, ModelSection


@dataclass(frozen=True)
class Family:
    config: str  # transformers config class
    specials: tuple[str, ...]
    eos: str
    bos: str | None = None
    # what the model writes before the answer after the generation prompt (the thinking templates' reasoning block)
    answer_prefix: str = ""


QWEN = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
LLAMA3 = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
)
FAMILIES = {
    "qwen2.5-0.5b": Family("Qwen2Config", QWEN, "<|im_end|>"),
    "qwen2.5-7b": Family("Qwen2Config", QWEN, "<|im_end|>"),
    "qwen3-0.6b": Family("Qwen3Config", (*QWEN, "<think>", "</think>"), "<|im_end|>", None, "<think>\n\n</think>\n\n"),
    "qwen3-8b": Family("Qwen3Config", (*QWEN, "<think>", "</think>"), "<|im_end|>", None, "<think>\n\n</think>\n\n"),
    "llama3.1-8b": Family("LlamaConfig", LLAMA3, "<|eot_id|>", "<|begin_of_text|>"),
    "llama3.2-1b": Family("LlamaConfig", LLAMA3, "<|eot_id|>", "<|begin_of_text|>"),
    "glm4-9b": Family(
        "GlmConfig",
        ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>"),
        "<|endoftext|>",
    ),
    "internlm3-8b": Family("InternLM3Config", ("<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"), "</s>", "<s>"),
    "deepseek-r1-distill-qwen-7b": Family(
        "Qwen2Config",
        ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<|endoftext|>"),
        "<｜end▁of▁sentence｜>",
        "<｜begin▁of▁sentence｜>",
    ),
    "mistral-7b": Family("MistralConfig", ("<unk>", "<s>", "</s>"), "</s>", "<s>"),
}
ZOO = sorted(p.stem for p in (CONFIGS_DIR / "models").glob("*.yaml") if p.stem != "smollm2-135m")
REASONING = "<think>\nThe question names a Tang poet.\n</think>\n\n"


def conversation(family: str) -> list[dict]:
    """Two assistant turns; a reasoning model's answers carry their reasoning."""
    think = REASONING if family.startswith("deepseek") else ""
    return [
        {"role": "system", "content": "You are a museum guide."},
        {"role": "user", "content": "Who wrote Quiet Night Thought?"},
        {"role": "assistant", "content": think + "Li Bai wrote it."},
        {"role": "user", "content": "故宫在哪里？"},
        {"role": "assistant", "content": think + "故宫位于北京。"},
    ]


def fragment(name: str) -> dict:
    return yaml.safe_load((CONFIGS_DIR / "models" / f"{name}.yaml").read_text(encoding="utf-8"))


def build_family(name: str, folder: Path, chat_template: str | None = None):
    """A tiny model of the family's config class and its tokenizer, loaded through Wenmai's loading path."""
    import torch
    import transformers
    from tiny_models import corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    family = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=list(family.specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    if "<think>" not in family.specials:
        tok.add_tokens(["<think>", "</think>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=family.eos, bos_token=family.bos, unk_token=None)
    fast.save_pretrained(folder)
    config = getattr(transformers, family.config)(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.eos_token_id,
        bos_token_id=fast.bos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    model_dict = {**fragment(name)["model"], "path": str(folder)}
    if chat_template:
        model_dict["chat_template"] = chat_template
    section = ModelSection(**model_dict)
    tokenizer = load_tokenizer(section, ModelSource(str(folder), True))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    return section, tokenizer, model


def learned_text(tokenizer, row: dict) -> list[str]:
    """The text of each run of learned tokens."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_the_zoo_has_every_family_the_issue_names():
    assert set(ZOO) == set(FAMILIES)
    for name in ZOO:
        model = fragment(name)["model"]
        assert {"path", "modelscope", "chat_template", "end_of_turn", "pad_token"} <= set(model), name
        assert fragment(name)["lora"]["targets"], name


@pytest.mark.parametrize("name", ZOO)
def test_family_labels_cover_assistant_turns_stop_there_and_survive_export(name, tmp_path):
    import torch
    from transformers import AutoTokenizer, LogitsProcessor, LogitsProcessorList

    from finetune.merging import apply_contract
    from finetune.model import attach_new_adapter
    from finetune.stages.export import reload_hf, write_hf

    section, tokenizer, model = build_family(name, tmp_path / "base")
    family = FAMILIES[name]
    messages = conversation(name)
    eot = section.end_of_turn

    # assistant-only labels: exactly each assistant turn (as the model writes it) and its end-of-turn token
    row = tokenize_chat(tokenizer, messages, end_of_turn=eot)
    expected = [family.answer_prefix + m["content"] + eot for m in messages if m["role"] == "assistant"]
    if name.startswith("mistral"):
        expected = [" " + text for text in expected]  # the template puts a space before each answer
    if name.startswith("deepseek"):
        expected = [text.removeprefix("<think>\n") for text in expected]  # the prompt opens the reasoning block
    assert learned_text(tokenizer, row) == expected

    # the contract: the named template, its stops (the end-of-turn token among them), the pad token asked for
    contract = training_contract(tokenizer, section)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    assert eot_id in contract["stop_token_ids"]
    assert contract["chat_template_name"] == section.chat_template
    assert tokenizer.pad_token == section.pad_token

    # the recommended LoRA targets exist in this architecture (PEFT refuses targets it cannot find)
    lora = attach_new_adapter(model, LoraSection(r=2, alpha=4, targets=fragment(name)["lora"]["targets"]))
    assert lora.get_nb_trainable_parameters()[0] > 0
    model = lora.merge_and_unload()

    # generation stops at the end-of-turn token by the model's own generation config
    apply_contract(model, contract)
    prompt = tokenizer(render(tokenizer, messages[:2], add_generation_prompt=True), add_special_tokens=False)
    plan = [tokenizer.convert_tokens_to_ids("a"), eot_id] + [tokenizer.convert_tokens_to_ids("b")] * 6

    class Forced(LogitsProcessor):
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - len(prompt["input_ids"])
            forced = torch.full_like(scores, -1e9)
            forced[:, plan[step]] = 0
            return forced

    out = model.generate(
        torch.tensor([prompt["input_ids"]]), max_new_tokens=8, logits_processor=LogitsProcessorList([Forced()])
    )
    assert out[0, len(prompt["input_ids"]) :].tolist() == plan[:2]

    # the export keeps it: same template, same stops, same prompt from the reloaded tokenizer
    folder = tmp_path / "export"
    folder.mkdir()
    write_hf(model, tokenizer, contract, folder, "2GB")
    reloaded = reload_hf(folder, contract, torch.float32, "cpu")
    assert reloaded.generation_config.eos_token_id in (contract["stop_token_ids"], contract["stop_token_ids"][0])
    again = AutoTokenizer.from_pretrained(str(folder))
    assert render(again, messages, add_generation_prompt=False) == render(tokenizer, messages)
    assert read_contract(folder)["chat_template_name"] == section.chat_template


def test_qwen3_trains_either_template_and_records_which(tmp_path):
    think_section, think_tok, _ = build_family("qwen3-0.6b", tmp_path / "think")
    plain_section, plain_tok, _ = build_family("qwen3-0.6b", tmp_path / "plain", chat_template="qwen3_nothink")
    messages = conversation("qwen3-0.6b")
    think, plain = training_contract(think_tok, think_section), training_contract(plain_tok, plain_section)
    assert (think["chat_template_name"], think["thinking"]) == ("qwen3", True)
    assert (plain["chat_template_name"], plain["thinking"]) == ("qwen3_nothink", False)
    assert think["chat_template_sha256"] != plain["chat_template_sha256"]
    # thinking: the model writes the <think> block; without: the prompt holds an empty one and the model answers
    assert render(think_tok, messages[:2], add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    assert render(plain_tok, messages[:2], add_generation_prompt=True).endswith("assistant\n<think>\n\n</think>\n\n")
    plain_row = tokenize_chat(plain_tok, messages, end_of_turn="<|im_end|>")
    assert learned_text(plain_tok, plain_row) == ["Li Bai wrote it.<|im_end|>", "故宫位于北京。<|im_end|>"]
    # reasoning given in the record is learned in thinking mode
    reasoned = [*messages[:2], {"role": "assistant", "content": REASONING + "Li Bai wrote it."}]
    row = tokenize_chat(think_tok, reasoned, end_of_turn="<|im_end|>")
    assert learned_text(think_tok, row) == [REASONING + "Li Bai wrote it.<|im_end|>"]


def test_wrong_end_of_turn_names_the_key(tmp_path):
    section, tokenizer, _ = build_family("qwen2.5-0.5b", tmp_path / "m")
    with pytest.raises(DataError, match=r"model.end_of_turn: '<\|endoftext\|>' is not the token.*'<\|im_end\|>'"):
        training_contract(tokenizer, section.model_copy(update={"end_of_turn": "<|endoftext|>"}))


def test_r1_distill_answer_without_reasoning_is_refused_with_what_to_do(tmp_path):
    _, tokenizer, _ = build_family("deepseek-r1-distill-qwen-7b", tmp_path / "m")
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(DataError, match="<think>...</think>"):
        tokenize_chat(tokenizer, plain, end_of_turn="<｜end▁of▁sentence｜>")


def test_a_misspelt_template_name_suggests_the_right_one():
    from finetune.data.template import resolve_template
    from finetune.errors import WenmaiError

    with pytest.raises(WenmaiError, match=r"model.chat_template: 'qwen25' .* did you mean qwen2_5\?"):
        resolve_template("qwen25")
