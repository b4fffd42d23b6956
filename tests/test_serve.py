"""`wenmai serve` on a tiny export, through the official `openai` client on loopback: the greedy answers of
`generate`, streamed or not, from both backends and under concurrency; labels on every answer; the banned-terms
filter; the API key; bad input refused with OpenAI's error body while the server keeps serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from tiny_models import build_model

from finetune.errors import WenmaiError
from finetune.model_card import PROVENANCE_FILE
from finetune.serving import create_app, serve
from finetune.serving.answers import LABEL_EN, LABEL_ZH, AnswerGate, OutputFilter
from finetune.serving.protocol import ApiError
from finetune.serving.runtime import Admission
from reward.rules import banned_pattern

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
from serve_speed import running_app  # noqa: E402

MODEL_ID = "tiny-run"
TIMEOUT = 60
QUESTIONS = [
    "Who wrote Quiet Night Thought?",
    "故宫在哪里？",
    "Tell me about the Palace Museum.",
    "What is ZZZ?",
    "李白是谁？",
    "Name a Tang poet.",
    "What does the Forbidden City hold?",
    "床前明月光的下一句是什么？",
]
MAX_TOKENS = 40


def build_export(folder: Path) -> Path:
    """A tiny model saved as a Wenmai export (template contract, provenance) that answers and then stops.

    A random model almost never picks EOS, so the output row of EOS (untied from the input embeddings, so the
    prompt is read as before) becomes 1.5 x the row of a token the model says greedily: wherever that token
    would win with a positive logit, EOS wins instead.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.chat import end_of_turn_ids
    from finetune.data.template import template_contract, write_contract

    build_model(folder, initializer_range=0.5)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    eos = tokenizer.eos_token_id
    said = generate(model, tokenizer, [eos], QUESTIONS[0], 8)[0]
    with torch.no_grad():
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight.detach().clone())
        model.lm_head.weight[eos] = model.lm_head.weight[said[5]] * 1.5
    model.save_pretrained(folder)
    write_contract(template_contract(tokenizer, end_of_turn_ids(tokenizer)), folder)
    provenance = {
        "run_id": MODEL_ID,
        "producer": {"organisation": "Test Museum", "tool": "Wenmai", "tool_version": "test"},
        "base_model": {"path": "tiny"},
    }
    (folder / PROVENANCE_FILE).write_text(json.dumps(provenance), encoding="utf-8")
    return folder


def generate(model, tokenizer, stop_ids: list[int], question: str, max_new_tokens: int) -> tuple[list[int], bool]:
    """Plain greedy `model.generate` with the chat template and stop ids: new ids (stop id dropped), stopped."""
    import torch

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stop_ids,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    stopped = bool(new) and new[-1] in stop_ids
    return (new[:-1] if stopped else new), stopped


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return build_export(tmp_path_factory.mktemp("serve") / "export")


@pytest.fixture(scope="module")
def reference(export) -> dict[str, tuple[str, bool, int]]:
    """Each question's greedy answer from `generate`: text, whether it ended at a stop id, token count."""
    from finetune.generate import ExportedModel

    exported = ExportedModel(export)
    answers = {}
    for question in QUESTIONS:
        ids, stopped = generate(exported.model, exported.tokenizer, exported.stop_ids, question, MAX_TOKENS)
        answers[question] = (exported.tokenizer.decode(ids, skip_special_tokens=True), stopped, len(ids))
    assert any(s for _, s, _ in answers.values()) and not all(s for _, s, _ in answers.values())
    return answers


@pytest.fixture(scope="module")
def server(export):
    """The default server (continuous batching, label after the answer, no API key) and an openai client."""
    with running_app(create_app(export, max_concurrency=8)) as base:
        yield base, client_for(base)


def client_for(base: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key=key, timeout=TIMEOUT, max_retries=0)


def ask(client: openai.OpenAI, question: str, stream: bool = False, **options) -> tuple[str, str, dict]:
    """(content, finish_reason, extra fields) of one answer, streamed or not."""
    messages = [{"role": "user", "content": question}]
    options = {"max_tokens": MAX_TOKENS, **options}
    if not stream:
        reply = client.chat.completions.create(model=MODEL_ID, messages=messages, **options)
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.model_extra
    parts, last = [], None
    for chunk in client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True, **options):
        parts += [c.delta.content for c in chunk.choices if c.delta.content]
        last = chunk
    return "".join(parts), last.choices[0].finish_reason, last.model_extra


def answer_of(content: str) -> str:
    """The model's answer inside content labelled after it (the default)."""
    assert content.endswith("\n\n" + LABEL_EN) or content.endswith("\n\n" + LABEL_ZH), content
    return content.rsplit("\n\n", 1)[0]


# --- answers ---------------------------------------------------------------------------------------


def test_chat_and_stream_give_the_greedy_answer_of_generate_and_stop_at_eos(server, reference):
    _, client = server
    for question, (expected, stopped, _count) in reference.items():
        content, finish, _ = ask(client, question)
        assert answer_of(content) == expected
        assert finish == ("stop" if stopped else "length"), question
        assert ask(client, question, stream=True)[:2] == (content, finish)
    question = next(q for q, (_, stopped, count) in reference.items() if stopped and count > 3)
    short, finish, _ = ask(client, question, max_tokens=3)
    assert finish == "length" and reference[question][0].startswith(answer_of(short))
    reply = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": question}])
    assert reply.usage.completion_tokens == reference[question][2]  # the stop id is not part of the answer
    assert "<|im_end|>" not in reply.choices[0].message.content


def test_stop_strings_end_the_answer_before_them(server, reference):
    _, client = server
    question = max(reference, key=lambda q: len(reference[q][0]))
    said = reference[question][0]
    stop = said[8:11]
    expected = said[: said.index(stop)]
    for stream in (False, True):
        content, finish, _ = ask(client, question, stream=stream, stop=[stop, "never said"])
        assert answer_of(content) == expected and finish == "stop"


def test_concurrent_clients_get_their_one_by_one_answers(server, reference):
    base, client = server
    jobs = [(q, i % 2 == 1) for i, q in enumerate(QUESTIONS)]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, client, q, stream) for q, stream in jobs]
        answers = [f.result(timeout=TIMEOUT) for f in futures]
    for (question, _), (content, _, _) in zip(jobs, answers, strict=True):
        assert answer_of(content) == reference[question][0], question
    counts = httpx.get(f"{base}/metrics", timeout=TIMEOUT).json()
    assert counts["generating"] == 0 and counts["queue_length"] == 0 and counts["tokens_generated"] > 0
    assert counts["answers_by_backend"] == {"continuous-batching": counts["requests"]}


def test_both_backends_give_the_same_greedy_text(export, server, reference):
    _, batched = server
    with running_app(create_app(export, backend="plain")) as base:
        plain = client_for(base)
        for question in QUESTIONS[:4]:
            answer = ask(plain, question)[:2]
            assert answer == ask(batched, question)[:2] and answer_of(answer[0]) == reference[question][0]
            assert ask(plain, question, stream=True)[:2] == answer
        sampled, finish, _ = ask(batched, QUESTIONS[0], temperature=0.9, top_p=0.9)  # sampling: plain backend
        assert finish in ("stop", "length") and answer_of(sampled) is not None


def test_watermarked_answers_come_from_generate_with_sampling(export):
    from transformers import WatermarkingConfig

    app = create_app(export, watermarking_config=WatermarkingConfig(bias=2.5, seeding_scheme="selfhash"))
    with running_app(app) as base:
        assert app.state.serving.batched is None  # the watermark processor crashes continuous batching
        content, finish, extra = ask(client_for(base), QUESTIONS[1])
        assert finish in ("stop", "length") and extra["aigc"]["AIGC"]["Label"] == "1"


def test_a_run_folder_serves_its_stage_through_the_model_loading_path(tiny_model, chat_file, tmp_path):
    from conftest import tiny_recipe

    from finetune.evaluation import targets
    from finetune.pipeline import load_recipe, start

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(tiny_recipe(tiny_model, chat_file, tmp_path / "runs", max_steps=1), encoding="utf-8")
    run_dir = start(load_recipe(recipe), tmp_path / "runs" / "run", log=lambda _: None)
    model, tokenizer = targets.load(targets.parse_target("sft", run=run_dir))
    stop_ids = json.loads((run_dir.root / "sft" / "template.json").read_text())["stop_token_ids"]
    ids, _ = generate(model, tokenizer, stop_ids, QUESTIONS[1], 12)
    with running_app(create_app(run_dir.root, adapter_stage="sft")) as base:
        models = httpx.get(f"{base}/v1/models", timeout=TIMEOUT).json()["data"]
        assert [m["id"] for m in models] == ["run/sft"]
        reply = client_for(base).chat.completions.create(
            model="run/sft", messages=[{"role": "user", "content": QUESTIONS[1]}], max_tokens=12
        )
        assert answer_of(reply.choices[0].message.content) == tokenizer.decode(ids, skip_special_tokens=True)
        assert reply.model_extra["aigc"]["model"]["run_id"] == "run"
    with pytest.raises(WenmaiError, match="no such stage \\(its stages: sft\\)"):
        create_app(run_dir.root, adapter_stage="dpo")
    with pytest.raises(WenmaiError, match="neither a Wenmai export"):
        create_app(tmp_path / "runs")


# --- labels ----------------------------------------------------------------------------------------


def test_every_answer_carries_both_labels_at_the_configured_position(export, server, reference):
    base, client = server
    for stream in (False, True):
        content, _, extra = ask(client, QUESTIONS[0], stream=stream)
        assert content == reference[QUESTIONS[0]][0] + "\n\n" + LABEL_EN  # the answer as generated, label after
        aigc = extra["aigc"]["AIGC"]
        assert aigc["Label"] == "1" and aigc["ContentProducer"] == "Test Museum"
        assert aigc["ReservedCode1"] == hashlib.sha256(content.encode()).hexdigest()
        assert extra["aigc"]["model"]["run_id"] == MODEL_ID
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": QUESTIONS[0]}], "max_tokens": 5}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT)
    header = json.loads(response.headers["X-AIGC-Label"])
    assert header == response.json()["aigc"]["AIGC"] and header["ProduceID"] == response.json()["id"]

    with running_app(create_app(export, label_position="prefix")) as prefix_base:
        prefixed = client_for(prefix_base)
        for question, label in ((QUESTIONS[1], LABEL_ZH), (QUESTIONS[0], LABEL_EN)):  # the question's language
            content, _, extra = ask(prefixed, question)
            assert content == label + "\n\n" + reference[question][0]
            assert ask(prefixed, question, stream=True)[0] == content
            assert extra["aigc"]["AIGC"]["ReservedCode1"] == hashlib.sha256(content.encode()).hexdigest()
        messages = [{"role": "user", "content": QUESTIONS[1]}]
        stream = prefixed.chat.completions.create(model=MODEL_ID, messages=messages, stream=True, max_tokens=5)
        first = next(c.choices[0].delta.content for c in stream if c.choices[0].delta.content)
        assert first == LABEL_ZH + "\n\n"  # the reader sees the label before any of the answer


# --- output filter ---------------------------------------------------------------------------------


def test_banned_term_is_refused_or_redacted(export, reference, tmp_path):
    question = next(q for q, (text, _, _) in reference.items() if re.search(r"[\u4e00-\u9fff]", text))
    said = reference[question][0]
    term = re.search(r"[\u4e00-\u9fff]", said).group()  # a character the model really says greedily
    clean = next(q for q, (text, _, _) in reference.items() if term not in text)
    banned = tmp_path / "banned.txt"
    banned.write_text(f"# test list\n{term}\n", encoding="utf-8")

    refusal = "不能回答。"
    with running_app(create_app(export, banned_terms=banned, refusal=refusal)) as base:
        client = client_for(base)
        for stream in (False, True):
            content, finish, _ = ask(client, question, stream=stream)
            assert answer_of(content) == refusal and finish == "content_filter"
            assert answer_of(ask(client, clean, stream=stream)[0]) == reference[clean][0]
        assert httpx.get(f"{base}/metrics", timeout=TIMEOUT).json()["filtered"]["refusals"] == 2

    with running_app(create_app(export, banned_terms=banned, filter_mode="redact")) as base:
        client = client_for(base)
        for stream in (False, True):
            content, finish, _ = ask(client, question, stream=stream)
            assert answer_of(content) == said.replace(term, "***") and term not in content
            assert finish in ("stop", "length")
        assert httpx.get(f"{base}/metrics", timeout=TIMEOUT).json()["filtered"]["redactions"] == 2 * said.count(term)


@pytest.mark.parametrize("mode", ["refuse", "redact"])
def test_streamed_filter_matches_the_filter_on_the_whole_text_at_every_split(mode):
    terms = ["class", "ass", "故宫"]
    output_filter = OutputFilter(banned_pattern(terms), max(map(len, terms)), mode, "REFUSED")
    texts = ["The classic class list.", "A brass ass, an ASS!", "去故宫看看", "nothing here", "clas", "ass"]
    for text in texts:
        whole = AnswerGate(None, output_filter)
        expected = whole.feed(text) + whole.finish()
        for split in range(1, len(text)):
            gate = AnswerGate(["STOP"], output_filter)
            shown = gate.feed(text[:split]) + gate.feed(text[split:] + "STOP and more") + gate.finish()
            assert shown == expected, (text, split)
        if mode == "redact":
            assert expected == banned_pattern(terms).sub("***", text)
    gate = AnswerGate(None, output_filter)
    assert gate.feed("classic!") + gate.finish() == "classic!"  # word boundaries: neither `class` nor `ass`


# --- access and admission ----------------------------------------------------------------------------


def test_api_key_is_enforced_when_set_and_required_beyond_loopback(export, monkeypatch):
    monkeypatch.setenv("TEST_SERVE_KEY", "s3cret-key")
    with running_app(create_app(export, api_key_env="TEST_SERVE_KEY")) as base:
        with pytest.raises(openai.AuthenticationError) as wrong:
            ask(client_for(base, "not-the-key"), QUESTIONS[0])
        assert wrong.value.status_code == 401 and wrong.value.body["code"] == "invalid_api_key"
        missing = httpx.get(f"{base}/v1/models", timeout=TIMEOUT)
        assert missing.status_code == 401 and missing.json()["error"]["type"] == "invalid_request_error"
        assert httpx.get(f"{base}/metrics", timeout=TIMEOUT).status_code == 401
        assert httpx.get(f"{base}/health", timeout=TIMEOUT).json() == {"status": "ok"}
        assert ask(client_for(base, "s3cret-key"), QUESTIONS[0])[1] in ("stop", "length")

    monkeypatch.delenv("TEST_SERVE_KEY")
    for host in ("0.0.0.0", "192.168.1.5"):
        with pytest.raises(WenmaiError, match="needs an API key"):
            create_app(export, host=host)
        with pytest.raises(WenmaiError, match="TEST_SERVE_KEY is empty or not set"):
            serve(export, host=host, api_key_env="TEST_SERVE_KEY")


def test_a_full_queue_is_answered_429():
    async def scenario() -> None:
        admission = Admission(limit=1, queue=1)
        first = await admission.enter()
        waiting = asyncio.ensure_future(admission.enter())
        await asyncio.sleep(0)
        with pytest.raises(ApiError) as full:
            await admission.enter()
        assert full.value.status == 429 and full.value.code == "queue_full"
        first.release()
        second = await asyncio.wait_for(waiting, 5)
        assert admission.active == 1 and admission.waiting == 0
        second.release()
        second.release()  # twice: still one slot
        assert admission.active == 0 and not admission.slots.locked()

    asyncio.run(scenario())


BAD_REQUESTS = [
    ({"model": "another-model"}, 404, "model", "model_not_found"),
    ({"messages": []}, 400, "messages", None),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", None),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "messages.0.content", None),
    ({"messages": [{"role": "user"}]}, 400, "messages.0.content", None),
    ({"messages": [{"role": "user", "content": "故宫 " * 2000}]}, 400, "messages", "context_length_exceeded"),
    ({"max_tokens": 1020}, 400, "messages", "context_length_exceeded"),
    ({"max_tokens": -3}, 400, "max_tokens", None),
    ({"max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ({"temperature": -1}, 400, "temperature", None),
]


@pytest.mark.parametrize(("change", "status", "param", "code"), BAD_REQUESTS)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, change, status, param, code):
    base, client = server
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "故宫在哪里？"}], **change}
    response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["code"] == code
    assert error["message"]
    if code == "context_length_exceeded":
        assert "1024" in error["message"]  # the context length, and what the request took
    with pytest.raises(openai.APIStatusError) as refused:  # the official client raises the same
        client.chat.completions.create(**body)
    assert refused.value.status_code == status
    assert ask(client, QUESTIONS[0])[1] in ("stop", "length")


def test_a_body_that_is_not_json_is_a_400(server):
    base, _ = server
    response = httpx.post(f"{base}/v1/chat/completions", content=b"{not json", timeout=TIMEOUT)
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert response.headers["X-Content-Type-Options"] == "nosniff" and response.headers["Cache-Control"] == "no-store"
    models = httpx.get(f"{base}/v1/models", timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID]
    errors = httpx.get(f"{base}/metrics", timeout=TIMEOUT).json()["errors_by_status"]
    assert errors.get("400", 0) >= 1
