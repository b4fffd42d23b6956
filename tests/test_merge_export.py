"""Merge and export on tiny models: parity for every LoRA variant, the gate, atomic exports, GGUF, the contract, chat."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import tiny_recipe
from tiny_models import build_model, write_jsonl

from finetune.errors import WenmaiError
from finetune.pipeline import load_recipe, start
from finetune.post_run import extend_run
from finetune.run_dir import RunDir, read_metrics

QUIET = {"log": lambda _: None}
STOP_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"Who wrote poem number {i % 3}?"},
            {"role": "assistant", "content": "Li Bai."},
        ]
    }
    for i in range(24)
]


def train(tmp: Path, model: Path, variant: str = "lora", name: str = "run", **sft) -> RunDir:
    """A finished SFT run on `model` whose adapter is far from zero."""
    data = write_jsonl(tmp / f"{name}.jsonl", STOP_ROWS)
    options = dict(max_steps=6, learning_rate=0.05, warmup=0, lr_scheduler="constant", batch_size=8, save_steps=1000)
    options.update(sft)
    text = tiny_recipe(model, data, tmp / "runs", **options).replace(
        "dropout: 0.0}", f"dropout: 0.0, variant: {variant}}}"
    )
    recipe = tmp / f"{name}.yaml"
    recipe.write_text(text, encoding="utf-8")
    return start(load_recipe(recipe), tmp / "runs" / name, **QUIET)


def build_wide_model(folder: Path, hidden: int = 32) -> Path:
    """A tiny model with wide initial logits, so a short LoRA run makes it answer confidently and stop.

    The pad row of a new embedding is zero (padding_idx), and pad is EOS here: with tied embeddings EOS's logit
    would stay 0 whatever the adapter learns, so that row gets random weights like the others.
    """
    import torch
    from transformers import AutoModelForCausalLM

    build_model(folder, hidden=hidden, initializer_range=0.5)
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        torch.manual_seed(1)
        model.model.embed_tokens.weight[model.config.pad_token_id].normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    return build_wide_model(tmp_path_factory.mktemp("wide-model"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, wide_model) -> RunDir:
    """A run trained to answer `Li Bai.` and stop, merged and exported as HF + every GGUF type."""
    tmp = tmp_path_factory.mktemp("exported")
    run_dir = train(tmp, wide_model, max_steps=80, learning_rate=0.02)
    export = {"formats": ["hf", "gguf"], "gguf_types": ["f32", "f16", "bf16", "q8_0"]}
    return extend_run(run_dir.root, [("merge", {}), ("export", export)], **QUIET)


def copy_run(run_dir: RunDir, target: Path) -> RunDir:
    shutil.copytree(run_dir.root, target)
    return RunDir(target)


# --- merge --------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora", "rslora"])
def test_merged_logits_match_the_adapter_for_each_lora_variant(tmp_path, wide_model, variant):
    import torch
    from transformers import AutoModelForCausalLM

    run_dir = extend_run(train(tmp_path, wide_model, variant).root, [("merge", {})], **QUIET)
    report = json.loads((run_dir.root / "merge" / "parity.json").read_text())
    assert report["passed"] and report["adapter"]["variant"] == variant
    for comparison in report["comparisons"].values():
        assert comparison["max_abs_logit_diff"] < 1e-4 and comparison["greedy_agreement"] == 1.0, comparison
    ids = torch.tensor([[5, 6, 7, 8, 9]])  # the fine-tune is really in the merged weights, not a no-op
    merged = AutoModelForCausalLM.from_pretrained(run_dir.output("merge", "model"))(ids).logits
    base = AutoModelForCausalLM.from_pretrained(wide_model)(ids).logits
    assert (merged - base).abs().max() > 0.1


def _quantise_4bit(model):
    """What a merge into a bitsandbytes 4-bit base does: the merged weights end up on a 16-level grid."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                w = module.weight
                scale = w.abs().amax(dim=1, keepdim=True) / 7
                w.copy_((w / scale).round().clamp(-8, 7) * scale)
    return model


@pytest.mark.parametrize("damage", ["4-bit base", "bfloat16 base"])
def test_parity_gate_refuses_a_merge_into_a_quantised_or_wrong_dtype_base(tmp_path, wide_model, monkeypatch, damage):
    import torch

    from finetune import merging

    fold = merging.fold

    def bad_fold(peft_model):
        merged = fold(peft_model)
        if damage == "4-bit base":
            return _quantise_4bit(merged)
        return merged.to(torch.bfloat16).to(torch.float32)  # the weights went through a bf16 store

    run_dir = train(tmp_path, wide_model)
    monkeypatch.setattr(merging, "fold", bad_fold)
    with pytest.raises(WenmaiError, match="merge refused") as err:
        extend_run(run_dir.root, [("merge", {})], **QUIET)
    assert "max |logit diff|" in str(err.value) and "parity.json" in str(err.value)
    assert not (run_dir.root / "merge" / "model").exists()
    assert not list((run_dir.root / "merge").glob(".model.*"))
    assert run_dir.status("merge").state == "failed"
    assert json.loads((run_dir.root / "merge" / "parity.json").read_text())["passed"] is False


def test_qlora_trains_on_real_4bit_layers_on_cpu_and_merge_reports_both_gaps(tmp_path, monkeypatch):
    """QLoRA for real (bitsandbytes nf4 on CPU): the adapter trains on 4-bit layers, loss falls; merge folds it
    into the unquantised base, gates against unquantised base + adapter, and reports the gap to the nf4 model."""
    from finetune import model as model_module

    layers = []
    load = model_module.load_model

    def spy(section, source, **kwargs):
        loaded = load(section, source, **kwargs)
        layers.append((section.quantization, {type(m).__name__ for m in loaded.modules()}))
        return loaded

    monkeypatch.setattr(model_module, "load_model", spy)
    # 64 wide: bitsandbytes' CPU inference kernel packs 4-bit weights in blocks of 64 input features
    wide_model = build_wide_model(tmp_path / "wide-64", hidden=64)
    data = write_jsonl(tmp_path / "q.jsonl", STOP_ROWS)
    options = dict(max_steps=12, learning_rate=0.05, warmup=0, lr_scheduler="constant", batch_size=8, save_steps=1000)
    text = tiny_recipe(wide_model, data, tmp_path / "runs", **options).replace(
        f"{{path: {wide_model}}}", f"{{path: {wide_model}, quantization: nf4, dtype: float32}}"
    )
    assert "quantization: nf4" in text
    recipe = tmp_path / "q.yaml"
    recipe.write_text(text, encoding="utf-8")
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "q", **QUIET)
    assert layers[0][0] == "nf4" and "Linear4bit" in layers[0][1]  # training saw bitsandbytes 4-bit layers
    losses = [r["loss"] for r in read_metrics(run_dir.metrics_path("sft")) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]

    extend_run(run_dir.root, [("merge", {})], **QUIET)
    assert [q for q, _ in layers[1:]] == ["nf4", "none"]  # the quantised reference, then the base merged into
    assert "Linear4bit" not in layers[2][1]
    report = json.loads((run_dir.root / "merge" / "parity.json").read_text())
    assert report["training_quantization"] == "nf4" and report["merge_dtype"] == "float32" and report["passed"]
    gated = report["comparisons"]["merged"]
    gap = report["quantisation_gap"]
    assert gap["measured"] and gap["gated"] is False and "quantised as in training (nf4)" in gap["reference"]
    # the merge reproduces unquantised base + adapter to float rounding; the 4-bit model it trained on is further
    assert gated["max_abs_logit_diff"] < 2e-3 < gap["max_abs_logit_diff"]
    config = json.loads((run_dir.output("merge", "model") / "config.json").read_text())
    assert "quantization_config" not in config


def test_merge_states_its_memory_and_refuses_when_it_will_not_fit(tmp_path, wide_model, monkeypatch):
    from finetune import merging

    run_dir = train(tmp_path, wide_model, max_steps=2)
    monkeypatch.setattr(merging, "available_memory", lambda device: 1000)
    with pytest.raises(WenmaiError, match=r"not enough memory to merge: the model needs ≈.* on cpu .* available"):
        extend_run(run_dir.root, [("merge", {})], **QUIET)
    assert not (run_dir.root / "merge" / "model").exists()


# --- export -------------------------------------------------------------------------------------


def test_export_loads_with_plain_transformers_and_stops_at_eos(exported):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = exported.output("export", "model")
    contract = json.loads((folder / "template.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert tokenizer.chat_template == contract["chat_template"]
    assert model.generation_config.eos_token_id in (contract["stop_token_ids"], *contract["stop_token_ids"])
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who wrote poem number 1?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1] :].tolist()
    assert out[-1] in contract["stop_token_ids"] and len(out) < 20, tokenizer.decode(out)
    assert tokenizer.decode(out, skip_special_tokens=True).strip() == "Li Bai."


def test_export_writes_gguf_files_that_load_back_within_tolerance(exported):
    from gguf import GGUFReader

    report = json.loads((exported.root / "export" / "parity.json").read_text())
    assert report["passed"]
    names = {c for c in report["comparisons"]}
    assert names == {"HF export", "GGUF F32", "GGUF F16", "GGUF BF16", "GGUF Q8_0"}
    assert report["comparisons"]["GGUF F32"]["max_abs_logit_diff"] < 1e-5  # f32 is the same model, bit for bit
    assert report["comparisons"]["GGUF F32"]["tokenizer_agreement"] == 1.0
    q8 = exported.output("export", "gguf_q8_0")
    fields = GGUFReader(q8).fields
    contract = json.loads((q8.parent / "template.json").read_text())
    assert fields["tokenizer.ggml.eos_token_id"].contents() == contract["eos_token_id"]
    assert fields["tokenizer.chat_template"].contents() == contract["chat_template"]
    assert json.loads(fields["wenmai.provenance"].contents())["run_id"] == exported.name


def test_model_card_has_label_provenance_stages_and_data(exported):
    folder = exported.output("export", "model")
    card = (folder / "README.en.md").read_text()
    provenance = json.loads((folder / "wenmai_provenance.json").read_text())
    block = json.loads(card.split("## Provenance")[1].split("```json")[1].split("```")[0])
    assert block["run_id"] == provenance["run_id"] == exported.name and block["base_model"] == provenance["base_model"]
    assert provenance["files_sha256"]["model.safetensors"] and provenance["date"]
    assert "本内容由人工智能生成" in card and "GB 45438-2025" in card
    assert "| sft | sft |" in card and "| merge | merge |" in card and "`d`: chat records" in card
    assert "| GGUF Q8_0 | HF export |" in card
    assert "`AutoTokenizer.from_pretrained(folder)`" in card  # how to keep the template and EOS with a GGUF


def test_the_cards_usage_snippet_runs_on_the_export_and_gives_the_trained_answer(exported, capsys):
    folder = exported.output("export", "model")
    card = (folder / "README.en.md").read_text()
    code = card.split("## How to use")[1].split("```python")[1].split("```")[0]
    assert '"content": "你好"' in code and code in (folder / "README.md").read_text()  # the Chinese card's too
    exec(code.replace("你好", "Who wrote poem number 2?"), {"EXPORT_DIR": str(folder)})  # noqa: S102
    assert capsys.readouterr().out.strip() == "Li Bai."  # the answer alone, as decoded after the prompt


def test_model_card_summarises_the_data_card_of_the_training_stage(exported):
    folder = exported.output("export", "model")
    card = (folder / "README.en.md").read_text()
    assert (folder / "data_cards" / "sft-data_card.json").is_file() and (
        folder / "data_cards" / "sft-data_card.md"
    ).is_file()
    assert (
        "Data card of stage `sft`: [sft-data_card.json](data_cards/sft-data_card.json), "
        "[sft-data_card.md](data_cards/sft-data_card.md)" in card
    )
    assert "`d`: 24 records kept of 24; licences" in card and "sensitivity public ×24" in card
    assert "data policy: intended use research" in card


def test_model_card_lists_licence_and_rights_from_any_data_card_json(tmp_path, exported):
    run_dir = copy_run(exported, tmp_path / "copy")
    (run_dir.root / "sft" / "data_card.json").write_text(
        json.dumps({"datasets": {"d": {"records": 24, "licence": "CC-BY-4.0", "rights": {"holder": "Palace Museum"}}}})
    )
    extend_run(run_dir.root, [("export", {"formats": ["hf"]})], **QUIET)
    card = (run_dir.output("export", "model") / "README.en.md").read_text()
    assert "datasets.d.licence: CC-BY-4.0" in card and "holder=Palace Museum" in card


def test_a_failed_export_leaves_the_previous_export_and_no_partial_folder(tmp_path, exported, monkeypatch):
    from finetune import gguf_export

    run_dir = copy_run(exported, tmp_path / "copy")
    before = sorted(p.name for p in run_dir.output("export", "model").iterdir())

    def half_written(folder, out_file, *args, **kwargs):
        out_file.write_bytes(b"GGUF half")
        raise OSError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", half_written)
    with pytest.raises(OSError, match="disk full"):
        extend_run(run_dir.root, [("export", {"gguf_types": ["q8_0"]})], **QUIET)
    assert sorted(p.name for p in (run_dir.root / "export" / "model").iterdir()) == before
    assert not [p for p in (run_dir.root / "export").iterdir() if p.name.startswith(".model")]
    assert run_dir.status("export").state == "failed"


def test_export_refused_by_the_gate_writes_no_folder(tmp_path, exported):
    run_dir = copy_run(exported, tmp_path / "copy")
    shutil.rmtree(run_dir.root / "export")
    tight = {"max_abs_logit_diff": 1e-9, "mean_kl": 1e-12, "min_greedy_agreement": 1.0}
    with pytest.raises(WenmaiError, match="export refused") as err:
        extend_run(
            run_dir.root,
            [("export", {"formats": ["hf", "gguf"], "gguf_types": ["q8_0"], "tolerances": {"q8_0": tight}})],
            **QUIET,
        )
    assert "GGUF Q8_0" in str(err.value) and "FAILED" in str(err.value)
    assert not (run_dir.root / "export" / "model").exists()
    assert json.loads((run_dir.root / "export" / "parity.json").read_text())["passed"] is False


def test_large_exports_are_sharded_and_still_load_and_convert(tmp_path, exported):
    run_dir = copy_run(exported, tmp_path / "copy")
    extend_run(run_dir.root, [("export", {"max_shard_size": "40KB", "gguf_types": ["f32"]})], **QUIET)
    folder = run_dir.output("export", "model")
    assert (
        len(list(folder.glob("model-*-of-*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    )
    report = json.loads((folder / "parity.json").read_text())
    assert report["passed"] and report["comparisons"]["GGUF F32"]["max_abs_logit_diff"] < 1e-5


def test_every_stop_token_of_the_template_reaches_generation_config_and_gguf(tmp_path, wide_model):
    from gguf import GGUFReader

    model = tmp_path / "eos-model"
    shutil.copytree(wide_model, model)
    config_file = model / "tokenizer_config.json"  # EOS <|endoftext|>, while ChatML turns end with <|im_end|>
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "eos_token": "<|endoftext|>"}))
    run_dir = train(tmp_path, model, max_steps=2)
    contract = json.loads((run_dir.root / "sft" / "template.json").read_text())
    assert len(contract["stop_token_ids"]) == 2
    extend_run(run_dir.root, [("merge", {}), ("export", {"formats": ["hf", "gguf"], "gguf_types": ["f32"]})], **QUIET)
    folder = run_dir.output("export", "model")
    generation = json.loads((folder / "generation_config.json").read_text())
    assert sorted(generation["eos_token_id"]) == contract["stop_token_ids"]
    fields = GGUFReader(next(folder.glob("*.gguf"))).fields
    end_of_turn = [i for i in contract["stop_token_ids"] if i != contract["eos_token_id"]]
    assert fields["tokenizer.ggml.eos_token_id"].contents() == contract["eos_token_id"]
    assert [fields["tokenizer.ggml.eot_token_id"].contents()] == end_of_turn


def test_gguf_writer_round_trips_llama_qwen2_and_qwen3_exactly(tmp_path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract
    from finetune.gguf_export import write_gguf

    base = build_model(tmp_path / "llama", initializer_range=0.5)
    tokenizer = AutoTokenizer.from_pretrained(base)
    contract = template_contract(tokenizer, end_of_turn_ids(tokenizer))
    ids = torch.tensor([tokenizer("故宫 Li Bai ZZZ", add_special_tokens=False)["input_ids"]])
    for arch in ("llama", "qwen2", "qwen3"):
        folder = tmp_path / arch
        if arch != "llama":
            shape = AutoConfig.from_pretrained(base).to_dict()
            keep = (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
                "tie_word_embeddings",
                "eos_token_id",
                "pad_token_id",
            )
            # transformers reads no head_dim from a qwen3 GGUF and assumes Qwen3's 128 (every real Qwen3 has it)
            head_dim = {"qwen2": 8, "qwen3": 128}[arch]
            config = AutoConfig.for_model(arch, **{k: shape[k] for k in keep}, head_dim=head_dim, initializer_range=0.5)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        write_gguf(folder, folder / "m.gguf", "f32", contract, arch, "gpt-2", {})
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        back = AutoModelForCausalLM.from_pretrained(folder, gguf_file="m.gguf", dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(ids).logits, hf(ids).logits, rtol=0, atol=1e-5, msg=arch)


def test_gguf_refuses_an_architecture_it_cannot_write():
    from finetune.gguf_export import check_supported

    with pytest.raises(WenmaiError, match=r"GPT2LMHeadModel.*convert_hf_to_gguf"):
        check_supported({"architectures": ["GPT2LMHeadModel"]}, Path("/nonexistent"))


# --- commands and bad input --------------------------------------------------------------------


def test_chat_answers_with_the_training_template_and_labels_when_asked(exported, cli):
    import hashlib

    code, out, err = cli("chat", exported.root / "export" / "model", "--prompt", "Who wrote poem number 2?", "--label")
    assert code == 0, err
    reply = json.loads(out.strip().splitlines()[-1])
    assert reply["content"] == "Li Bai." and reply["stopped_at_eos"] is True
    aigc = reply["metadata"]["AIGC"]
    assert aigc["Label"] == "1" and aigc["ReservedCode1"] == hashlib.sha256(b"Li Bai.").hexdigest()
    assert reply["metadata"]["model"]["run_id"] == exported.name and reply["explicit_label"]


def test_chat_refuses_an_export_whose_tokenizer_was_edited(tmp_path, exported, cli):
    run_dir = copy_run(exported, tmp_path / "copy")
    template = run_dir.root / "export" / "model" / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    code, _, err = cli("chat", run_dir.root, "--prompt", "hi")
    assert code == 2 and "template contract broken" in err and "chat_template_sha256" in err


def test_export_command_merges_first_and_reports(tmp_path, wide_model, cli):
    run_dir = train(tmp_path, wide_model, max_steps=2)
    code, out, err = cli("export", run_dir.root, "--format", "hf")
    assert code == 0, err
    assert run_dir.status("merge").state == "done" and run_dir.status("export").state == "done"
    assert "exported:" in out and [s["name"] for s in json.loads(run_dir.lineage_path.read_text())["stages"]] == [
        "sft",
        "merge",
        "export",
    ]
    code, out, err = cli("export", run_dir.root, "--format", "hf")
    assert code == 0 and "done already" in err


def test_export_of_a_run_without_finished_training_names_the_stage(tmp_path, wide_model, cli):
    run_dir = train(tmp_path, wide_model, max_steps=2)
    status = run_dir.status("sft")
    status.state = "failed"
    run_dir.write_status(status)
    code, _, err = cli("export", run_dir.root)
    assert code == 2 and "stage 'sft'" in err and "has not finished (failed)" in err and "--resume" in err


def test_export_rejects_an_unknown_format(tmp_path, wide_model, cli):
    run_dir = train(tmp_path, wide_model, max_steps=2)
    code, _, err = cli("export", run_dir.root, "--format", "hf,onnx")
    assert code == 2 and "--format: unknown value 'onnx'; choose from hf, gguf" in err
    code, _, err = cli("export", run_dir.root, "--gguf-types", "q4_k")
    assert code == 2 and "'q4_k'" in err and "q8_0" in err


def test_export_of_a_run_whose_tokenizer_was_edited_fails_on_the_contract(tmp_path, wide_model, cli):
    run_dir = train(tmp_path, wide_model, max_steps=2)
    config_file = run_dir.root / "sft" / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = "<|endoftext|>"
    config_file.write_text(json.dumps(config))
    code, _, err = cli("export", run_dir.root)
    assert code == 2 and "template contract broken" in err and "eos_token" in err and "sft/tokenizer" in err
    assert not (run_dir.root / "merge" / "model").exists()


def test_merge_command_names_an_unknown_adapter_stage(tmp_path, wide_model, cli):
    run_dir = train(tmp_path, wide_model, max_steps=2)
    code, _, err = cli("merge", run_dir.root, "--adapter", "dpo")
    assert code == 2 and "'dpo' is not a stage name" in err and "producing an adapter: sft" in err
    assert run_dir.status("merge") is None


def test_export_of_a_folder_that_is_not_a_run(tmp_path, cli):
    code, _, err = cli("export", tmp_path)
    assert code == 2 and "not a Wenmai run folder" in err


def test_validate_names_the_missing_gguf_package(monkeypatch):
    import importlib.util

    from finetune.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    recipe = Path(__file__).resolve().parent.parent / "recipes" / "smoke.yaml"
    with pytest.raises(ConfigError) as err:
        load_recipe(recipe)
    assert re.search(
        r"stages\[\d\]\.export\.formats: gguf needs the gguf package: pip install 'wenmai\[gguf\]'.*"
        r"smoke\.yaml:\d+",
        str(err.value),
    )
    load_recipe(recipe, ["stages.export.gguf_required=false"])  # optional GGUF: valid without the package


def test_optional_gguf_is_skipped_with_a_warning_and_a_note_when_the_package_is_missing(
    tmp_path, exported, monkeypatch, capfd
):
    import importlib.util

    run_dir = copy_run(exported, tmp_path / "copy")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    capfd.readouterr()
    extend_run(run_dir.root, [("export", {"gguf_required": False})], **QUIET)
    assert "export: warning: no GGUF files written: the gguf package is not installed" in capfd.readouterr().err
    summary = run_dir.status("export").summary
    assert summary["formats"] == ["hf"] and "pip install 'wenmai[gguf]'" in summary["gguf_skipped"]
    folder = run_dir.output("export", "model")
    assert not list(folder.glob("*.gguf"))
    note = "GGUF asked for but not written: the gguf package is not installed (pip install 'wenmai[gguf]')"
    assert json.loads((folder / "wenmai_provenance.json").read_text())["gguf_skipped"] == note
    assert note in (folder / "README.md").read_text()  # the card's provenance block


@pytest.mark.slow
def test_quickstart_merges_and_exports_smollm2_within_tolerance(quickstart_run):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    run = quickstart_run.root  # the whole quickstart, shared with tests/test_real_model.py (one run, not two)
    merge = json.loads((run / "merge" / "parity.json").read_text())["comparisons"]
    export = json.loads((run / "export" / "parity.json").read_text())["comparisons"]
    assert merge["merged"]["max_abs_logit_diff"] < 2e-3 and merge["merged"]["greedy_agreement"] == 1.0
    assert export["HF export"]["max_abs_logit_diff"] < 1e-4
    assert export["GGUF F16"]["max_abs_logit_diff"] < 0.5 and export["GGUF F16"]["tokenizer_agreement"] == 1.0
    assert export["GGUF Q8_0"]["passed"]
    chat = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli",
            "chat",
            str(run),
            "--prompt",
            "故宫在哪里？",
            "--max-new-tokens",
            "48",
            "--label",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert json.loads(chat.stdout.strip().splitlines()[-1])["metadata"]["AIGC"]["Label"] == "1"
