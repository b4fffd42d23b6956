"""The export's Ollama Modelfile: FROM the GGUF, the chat template in Go's text/template, the template contract's stops.

Ollama renders prompts with Go templates, not Jinja, so each of Wenmai's named templates has a hand translation
here (`GO_TEMPLATES`), checked in tests by rendering both for the same conversation. Ollama hands the template
`.Messages` (each `.Role`, `.Content`, `.Thinking`), with the Modelfile's SYSTEM as the first message when the
request has none. BOS: llama.cpp adds it when the GGUF says so (`tokenizer.ggml.add_bos_token`), so a template
writes it only when the tokenizer does not add it itself. Tool calls are not translated.
"""

from __future__ import annotations

import json
from typing import Any

from finetune.data.template import resolve_template
from finetune.errors import WenmaiError
from finetune.model_card import EXPLICIT_LABEL

MODELFILE = "Modelfile"
# `$last`: the message is the last one; the generation prompt follows a last message that is not the assistant's
_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"
_HAS_SYSTEM = '(and .Messages (eq (index .Messages 0).Role "system"))'
_CHATML_TURNS = (
    "{{- range $i, $m := .Messages }}" + _LAST + "<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n"
    '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ end }}{{- end }}'
)
_QWEN3_TURNS = (
    "{{- range $i, $m := .Messages }}" + _LAST + '{{- if eq $m.Role "assistant" }}<|im_start|>assistant\n<think>\n'
    "{{ $m.Thinking }}\n</think>\n\n{{ $m.Content }}<|im_end|>\n"
    "{{ else }}<|im_start|>{{ $m.Role }}\n{{ $m.Content }}<|im_end|>\n{{ end }}"
    '{{ if and $last (ne $m.Role "assistant") }}<|im_start|>assistant\n{{ THINK }}{{ end }}{{- end }}'
)
_LLAMA3 = (
    "{{ BOS }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
    "Today Date: 26 Jul 2024\n\n{{ if " + _HAS_SYSTEM + " }}{{ (index .Messages 0).Content }}{{ end }}<|eot_id|>"
    "{{- range $i, $m := .Messages }}" + _LAST + '{{- if not (and (eq $i 0) (eq $m.Role "system")) }}'
    "<|start_header_id|>{{ $m.Role }}<|end_header_id|>\n\n{{ $m.Content }}<|eot_id|>{{ end }}"
    '{{ if and $last (ne $m.Role "assistant") }}<|start_header_id|>assistant<|end_header_id|>\n\n{{ end }}'
    "{{- end }}"
)
GO_TEMPLATES: dict[str, str] = {
    "chatml": _CHATML_TURNS,
    "qwen2_5": (
        "{{- if not " + _HAS_SYSTEM + " }}<|im_start|>system\n"
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n{{ end }}" + _CHATML_TURNS
    ),
    "qwen3": _QWEN3_TURNS.replace("{{ THINK }}", ""),
    "qwen3_nothink": _QWEN3_TURNS.replace("{{ THINK }}", "<think>\n\n</think>\n\n"),
    "llama3_1": _LLAMA3,
    "llama3_2": _LLAMA3,
    "internlm3": "{{ BOS }}" + _CHATML_TURNS,
    "deepseek_r1_distill": (
        '{{ BOS }}{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}{{ end }}{{ end }}'
        "{{- range $i, $m := .Messages }}" + _LAST + '{{- if eq $m.Role "user" }}<｜User｜>{{ $m.Content }}'
        '{{- else if eq $m.Role "assistant" }}<｜Assistant｜>{{ $m.Content }}<｜end▁of▁sentence｜>{{ end }}'
        '{{ if and $last (ne $m.Role "assistant") }}<｜Assistant｜><think>\n{{ end }}{{- end }}'
    ),
    "glm4": (
        "[gMASK]<sop>{{- range $i, $m := .Messages }}" + _LAST + "{{ if $m.Content }}<|{{ $m.Role }}|>\n"
        '{{ $m.Content }}{{ end }}{{ if and $last (ne $m.Role "assistant") }}<|assistant|>\n{{ end }}{{- end }}'
    ),
    "mistral": (
        '{{- $sys := "" }}{{ if ' + _HAS_SYSTEM + " }}{{ $sys = (index .Messages 0).Content }}{{ end }}{{ BOS }}"
        '{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}'
        "{{ if and $sys (eq $i 1) }} [INST] {{ $sys }}\n\n{{ $m.Content }} [/INST]"
        "{{ else }} [INST] {{ $m.Content }} [/INST]{{ end }}"
        '{{ else if eq $m.Role "assistant" }} {{ $m.Content }}</s>{{ end }}{{- end }}'
    ),
}


def identify_template(contract: dict) -> str | None:
    """The named template the contract's chat template is (by name, or by identical text), or None."""
    name = contract.get("chat_template_name")
    if name in GO_TEMPLATES:
        return name
    for candidate in GO_TEMPLATES:
        try:
            if resolve_template(candidate) == contract.get("chat_template"):
                return candidate
        except WenmaiError:  # a template read from TRL, when TRL is missing
            continue
    return None


AIGC_SYSTEM_NOTE = (
    f"{EXPLICIT_LABEL}。你是人工智能助手，你的回答是人工智能生成的内容。"
    "You are an AI assistant; your answers are AI-generated content."
)


def default_system(system: str | None, aigc_label: bool) -> str | None:
    """The Modelfile's SYSTEM text: the AIGC note when asked, then the recipe's own system message."""
    parts = ([AIGC_SYSTEM_NOTE] if aigc_label else []) + ([system] if system else [])
    return "\n\n".join(parts) or None


def go_template(name: str, bos_token: str | None) -> str:
    """The Go template for named template `name`; `bos_token` is written only when given (the runtime adds it)."""
    return GO_TEMPLATES[name].replace("{{ BOS }}", bos_token or "")


def modelfile(gguf_file: str, contract: dict, tokenizer: Any, system: str | None = None) -> str:
    """The Modelfile text: FROM the GGUF beside it, TEMPLATE (when the template is one Wenmai translates), a stop
    parameter per stop token of the template contract, and SYSTEM when given."""
    lines = [
        "# Ollama Modelfile written by Wenmai: `ollama create NAME -f Modelfile`, then `ollama run NAME`.",
        f"FROM ./{gguf_file}",
    ]
    name = identify_template(contract)
    if name:
        lines.append(f"# TEMPLATE: the {name} chat template training used, in Go's text/template")
        lines.append(_block("TEMPLATE", go_template(name, runtime_bos(tokenizer))))
    else:
        lines.append(
            "# TEMPLATE: not written (the chat template is not one Wenmai translates); Ollama derives one from the "
            "GGUF's tokenizer.chat_template. Check `ollama show NAME --template` before serving."
        )
    for token in stop_tokens(contract, tokenizer):
        lines.append(f"PARAMETER stop {json.dumps(token, ensure_ascii=False)}")
    if system:
        lines.append(_block("SYSTEM", system))
    return "\n".join(lines) + "\n"


def runtime_bos(tokenizer: Any) -> str | None:
    """The BOS text a Go template must write: None when tokenizing adds BOS (the GGUF then tells llama.cpp to)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    return None if tokenizer("a")["input_ids"][:1] == [bos] else tokenizer.bos_token


def stop_tokens(contract: dict, tokenizer: Any) -> list[str]:
    """The contract's stop ids as token strings, in id order."""
    return [tokenizer.convert_ids_to_tokens(i) for i in contract["stop_token_ids"]]


def parse_modelfile(text: str) -> dict[str, Any]:
    """A Modelfile's instructions: FROM, TEMPLATE, SYSTEM (strings) and PARAMETER (name -> list of values).

    Raises ValueError on a line that is not an instruction or an unclosed triple-quoted value."""
    parsed: dict[str, Any] = {"PARAMETER": {}}
    lines = iter(text.splitlines())
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, value = line.partition(" ")
        if not instruction.isalpha():
            raise ValueError(f"line {number}: {line!r} is not a Modelfile instruction")
        if value.startswith('"""'):
            value = value[3:]
            while '"""' not in value:
                try:
                    value += "\n" + next(lines)
                except StopIteration:
                    raise ValueError(f'line {number}: {instruction} opens """ and never closes it') from None
            value = value[: value.index('"""')]
        if instruction.upper() == "PARAMETER":
            key, raw = value.split(maxsplit=1)
            parsed["PARAMETER"].setdefault(key, []).append(json.loads(raw) if raw.startswith('"') else raw)
        else:
            parsed[instruction.upper()] = value
    return parsed


def _block(instruction: str, value: str) -> str:
    if '"""' in value:
        raise ValueError(f'{instruction} text holds """, which a Modelfile cannot quote')
    return f'{instruction} """{value}"""'
