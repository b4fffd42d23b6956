"""The Ollama Modelfile: it parses, its stops are the template contract's, and its TEMPLATE, rendered with Go's
text/template (Debian's golang-go) the way Ollama renders it, gives the same prompt as the chat template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_model_zoo import FAMILIES, ZOO, build_family, fragment

from finetune.data.chat import render
from finetune.data.template import training_contract
from finetune.ollama import GO_TEMPLATES, go_template, identify_template, modelfile, parse_modelfile, stop_tokens

# Ollama's template data: `.Messages` of api.Message (Role, Content, Thinking), `.System`, `.Prompt`, `.Response`
GO_RENDER = """package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role     string
	Content  string
	Thinking string
}

type Data struct {
	System   string
	Prompt   string
	Response string
	Messages []Message
}

func main() {
	text, err := os.ReadFile(os.Args[1])
	if err != nil {
		panic(err)
	}
	raw, err := os.ReadFile(os.Args[2])
	if err != nil {
		panic(err)
	}
	var data Data
	if err := json.Unmarshal(raw, &data); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("modelfile").Parse(string(text)))
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
"""
FAMILY_OF = {fragment(name)["model"]["chat_template"]: name for name in ZOO}


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render a Go template for a list of messages, with Go's own text/template (built once)."""
    if shutil.which("go") is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("Go is required under CI=true (apt-get install golang-go)", pytrace=False)
        pytest.skip("Go is not installed (apt-get install golang-go): the Modelfile TEMPLATE cannot be rendered here")
    folder = tmp_path_factory.mktemp("go")
    (folder / "render.go").write_text(GO_RENDER, encoding="utf-8")
    env = {**os.environ, "GOCACHE": str(folder / "cache"), "GOPATH": str(folder / "gopath"), "GO111MODULE": "off"}
    subprocess.run(
        ["go", "build", "-o", str(folder / "render"), str(folder / "render.go")], check=True, env=env, timeout=300
    )

    def render_go(template: str, messages: list[dict]) -> str:
        (folder / "template.txt").write_text(template, encoding="utf-8")
        data = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
        (folder / "data.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        done = subprocess.run(
            [str(folder / "render"), str(folder / "template.txt"), str(folder / "data.json")],
            capture_output=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr.decode()
        return done.stdout.decode("utf-8")

    return render_go


SYSTEM = {"role": "system", "content": "You are a museum guide."}
CONVERSATIONS = {
    "with a system message": [
        SYSTEM,
        {"role": "user", "content": "Who wrote Quiet Night Thought?"},
        {"role": "assistant", "content": "Li Bai wrote it."},
        {"role": "user", "content": "故宫在哪里？"},
    ],
    "without one": [{"role": "user", "content": "故宫在哪里？"}],
}


@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=str)
@pytest.mark.parametrize("name", sorted(set(GO_TEMPLATES) - {"chatml"}))
def test_modelfile_template_renders_the_chat_template_prompt(name, conversation, go_render, tmp_path):
    family = FAMILY_OF.get(name, "qwen3-0.6b")
    section, tokenizer, _ = build_family(family, tmp_path, chat_template=name)
    contract = training_contract(tokenizer, section)
    messages = CONVERSATIONS[conversation]
    expected = render(tokenizer, messages, add_generation_prompt=True)

    text = modelfile("model-q8_0.gguf", contract, tokenizer, system="本内容由人工智能生成 · AI-generated content")
    parsed = parse_modelfile(text)
    assert parsed["FROM"] == "./model-q8_0.gguf"
    assert parsed["PARAMETER"]["stop"] == stop_tokens(contract, tokenizer)
    assert [tokenizer.convert_tokens_to_ids(t) for t in parsed["PARAMETER"]["stop"]] == contract["stop_token_ids"]
    assert section.end_of_turn in parsed["PARAMETER"]["stop"]
    assert parsed["SYSTEM"] == "本内容由人工智能生成 · AI-generated content"
    assert go_render(parsed["TEMPLATE"], messages) == expected


def test_runtime_bos_is_left_to_llama_cpp_when_the_tokenizer_adds_it(go_render, tmp_path):
    from tokenizers import processors

    section, tokenizer, _ = build_family("llama3.1-8b", tmp_path)
    bos = tokenizer.bos_token
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    contract = training_contract(tokenizer, section)
    template = parse_modelfile(modelfile("m.gguf", contract, tokenizer))["TEMPLATE"]
    messages = CONVERSATIONS["with a system message"]
    assert bos not in template
    assert bos + go_render(template, messages) == render(tokenizer, messages, add_generation_prompt=True)


def test_a_template_known_by_its_text_is_translated_and_an_unknown_one_is_left_to_ollama(tmp_path):
    section, tokenizer, _ = build_family("qwen2.5-0.5b", tmp_path)
    contract = {**training_contract(tokenizer, section), "chat_template_name": None}
    assert identify_template(contract) == "qwen2_5"  # the tokenizer's own template, byte-identical to the named one
    unknown = {**contract, "chat_template": "{{ messages[0]['content'] }}"}
    parsed = parse_modelfile(modelfile("m.gguf", unknown, tokenizer))
    assert "TEMPLATE" not in parsed
    assert parsed["PARAMETER"]["stop"] == stop_tokens(contract, tokenizer)


def test_every_zoo_template_has_a_go_translation():
    assert {fragment(name)["model"]["chat_template"] for name in ZOO} | {"qwen3_nothink"} <= set(GO_TEMPLATES)
    assert go_template("mistral", "<s>").count("<s>") == 1 and "<s>" not in go_template("mistral", None)
    assert set(FAMILIES) == set(ZOO)


def test_unclosed_template_block_is_refused_with_its_line():
    with pytest.raises(ValueError, match='line 2: TEMPLATE opens """ and never closes it'):
        parse_modelfile('FROM ./m.gguf\nTEMPLATE """{{ .Prompt }}\n')


def test_parse_reads_a_written_file(tmp_path):
    path = Path(tmp_path / "Modelfile")
    path.write_text('FROM ./m.gguf\nPARAMETER stop "<|im_end|>"\nPARAMETER temperature 0.7\n', encoding="utf-8")
    assert parse_modelfile(path.read_text(encoding="utf-8"))["PARAMETER"] == {
        "stop": ["<|im_end|>"],
        "temperature": ["0.7"],
    }


def test_export_writes_a_modelfile_and_the_card_says_how_to_run_the_gguf(tmp_path, go_render):
    from test_merge_export import QUIET, build_wide_model, train
    from transformers import AutoTokenizer

    from finetune.ollama import AIGC_SYSTEM_NOTE
    from finetune.post_run import extend_run

    run_dir = train(tmp_path, build_wide_model(tmp_path / "model"), max_steps=2)
    export = {"formats": ["hf", "gguf"], "gguf_types": ["f32"], "modelfile_aigc_label": True}
    extend_run(run_dir.root, [("merge", {}), ("export", export)], **QUIET)
    folder = run_dir.output("export", "model")
    contract = json.loads((folder / "template.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))

    parsed = parse_modelfile((folder / "Modelfile").read_text(encoding="utf-8"))
    gguf = next(folder.glob("*.gguf"))
    assert parsed["FROM"] == f"./{gguf.name}"
    assert [tokenizer.convert_tokens_to_ids(t) for t in parsed["PARAMETER"]["stop"]] == contract["stop_token_ids"]
    assert parsed["SYSTEM"] == AIGC_SYSTEM_NOTE and "本内容由人工智能生成" in parsed["SYSTEM"]
    messages = [{"role": "system", "content": parsed["SYSTEM"]}, *CONVERSATIONS["with a system message"][1:]]
    assert go_render(parsed["TEMPLATE"], messages) == render(tokenizer, messages, add_generation_prompt=True)
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert f"llama-cli -m {gguf.name}" in card and "ollama create my-model -f Modelfile" in card
