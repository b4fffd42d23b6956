"""Text watermarking: watermarked generations are detected; unwatermarked text and a wrong key are not."""

from __future__ import annotations

import io
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_models import build_model, write_jsonl

from finetune.errors import WenmaiError
from finetune.watermark import THRESHOLD, detect, detect_file, key_from_env, watermarking_config

KEY = 424242
PROMPTS = [
    "The Palace Museum",
    "Li Bai wrote",
    "故宫博物院",
    "Answer: A",
    "The Tang dynasty",
    "床前明月光",
    "Who wrote poem",
    "The marker token",
    "Du Fu",
    "李白是唐代诗人",
    "The Forbidden City",
    "What is",
]


@dataclass
class Generations:
    folder: Path
    tokenizer: object
    vocab_size: int
    watermarked: list[str]
    plain: list[str]


@pytest.fixture(scope="module")
def generations(tmp_path_factory) -> Generations:
    """Sampled continuations of the same prompts with the same seed, with and without the watermark.

    The folder is also a Wenmai export (config.json + template.json), for `detect_file`.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.data.template import template_contract, write_contract

    # A wider init than the default (0.02): logits that are not flat, so the sampled text has some structure;
    # at 0.5 the model is so sure of itself that 60 tokens leave the watermark little room.
    folder = build_model(tmp_path_factory.mktemp("wm-model"), initializer_range=0.3)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    write_contract(template_contract(tokenizer, [tokenizer.eos_token_id]), folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)

    def sample(config) -> list[str]:
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                top_k=0,
                max_new_tokens=60,
                min_new_tokens=60,
                pad_token_id=tokenizer.pad_token_id,
                watermarking_config=config,
            )
        return tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)

    return Generations(folder, tokenizer, model.config.vocab_size, sample(watermarking_config(KEY)), sample(None))


def z_scores(texts: list[str], g: Generations, key: int = KEY) -> list[float]:
    results = detect(texts, g.tokenizer, g.vocab_size, key)
    assert all(r.z_score is not None for r in results), [r.reason for r in results]
    return [r.z_score for r in results]


def test_watermarked_text_is_detected_and_the_same_sampling_without_it_is_not(generations):
    marked = detect(generations.watermarked, generations.tokenizer, generations.vocab_size, KEY)
    plain = detect(generations.plain, generations.tokenizer, generations.vocab_size, KEY)
    marked_z, plain_z = [r.z_score for r in marked], [r.z_score for r in plain]
    assert sum(r.watermarked for r in marked) > len(marked) // 2, marked_z
    assert not any(r.watermarked for r in plain), plain_z
    assert statistics.mean(marked_z) - statistics.mean(plain_z) > 3, (marked_z, plain_z)
    assert all(r.tokens >= 40 and 0 <= r.p_value <= 1 for r in marked)
    assert all(r.p_value < 1e-3 for r in marked if r.watermarked)


def test_a_wrong_key_does_not_detect_watermarked_text(generations):
    wrong = z_scores(generations.watermarked, generations, key=KEY + 1)
    right = z_scores(generations.watermarked, generations)
    assert max(wrong) < THRESHOLD, wrong
    assert abs(statistics.mean(wrong)) < 1.5 < statistics.mean(right) - 1.5, (wrong, right)


def test_short_text_gets_no_verdict_and_a_reason(generations):
    short, empty = detect(["Li Bai", ""], generations.tokenizer, generations.vocab_size, KEY)
    for result in (short, empty):
        assert result.z_score is None and result.p_value is None and not result.watermarked
        assert "too short" in result.reason and "needs 16" in result.reason
    assert json.loads(json.dumps(short.to_json()))["z_score"] is None


def test_key_from_unset_or_empty_variable_names_it(monkeypatch):
    monkeypatch.delenv("MUSEUM_WM_KEY", raising=False)
    with pytest.raises(WenmaiError, match=r"MUSEUM_WM_KEY.*export MUSEUM_WM_KEY="):
        key_from_env("MUSEUM_WM_KEY")
    monkeypatch.setenv("MUSEUM_WM_KEY", "")
    with pytest.raises(WenmaiError, match="MUSEUM_WM_KEY"):
        key_from_env("MUSEUM_WM_KEY")


def test_same_secret_gives_the_same_key_in_every_process_and_version(monkeypatch):
    monkeypatch.setenv("MUSEUM_WM_KEY", "palace-museum-2025")
    first = key_from_env("MUSEUM_WM_KEY")
    # Pinned: text watermarked today must still be detected after an upgrade (no salted `hash()`, no new scheme).
    assert first == key_from_env("MUSEUM_WM_KEY") == 2063401291
    monkeypatch.setenv("MUSEUM_WM_KEY", "palace-museum-2026")
    assert key_from_env("MUSEUM_WM_KEY") != first


def test_detect_file_reads_jsonl_plain_text_and_stdin(generations, tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "export" / "model").symlink_to(generations.folder)  # a run folder whose export stage holds the model
    # U+2028 stays raw in JSON written with ensure_ascii=False; it must not split a line.
    texts = [generations.watermarked[0] + "\u2028故宫", generations.watermarked[1], *generations.plain[:2]]
    rows = [{"text": texts[0]}, {"role": "assistant", "content": texts[1]}, {"text": texts[2]}, {"content": texts[3]}]
    jsonl = write_jsonl(tmp_path / "answers.jsonl", rows)
    found = detect_file(jsonl, run, KEY)
    assert [r.watermarked for r in found] == [r.z_score >= THRESHOLD for r in found]
    assert [r.source for r in found] == [f"{jsonl}:{n}" for n in range(1, 5)]
    assert [r.z_score for r in found] == pytest.approx(z_scores(texts, generations))

    plain_file = tmp_path / "answer.txt"
    plain_file.write_text("\n" + texts[0] + "\n\n", encoding="utf-8")
    (whole,) = detect_file(plain_file, generations.folder, KEY)
    assert whole.source == str(plain_file) and whole.z_score == pytest.approx(found[0].z_score, abs=0.2)

    monkeypatch.setattr("sys.stdin", io.StringIO(json.dumps({"content": texts[2]}) + "\n"))
    (piped,) = detect_file("-", generations.folder, KEY)
    assert piped.source == "-:1" and piped.z_score == pytest.approx(found[2].z_score)


def test_jsonl_line_without_text_names_file_and_line(generations, tmp_path):
    jsonl = write_jsonl(tmp_path / "answers.jsonl", [{"text": "A poem by Li Bai."}, {"answer": "no text field"}])
    with pytest.raises(WenmaiError, match=r"answers\.jsonl:2: no `text` or `content`.*keys: answer"):
        detect_file(jsonl, generations.folder, KEY)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(WenmaiError, match=r"broken\.jsonl:2: not a JSON object"):
        detect_file(broken, generations.folder, KEY)


def test_detect_file_rejects_a_folder_that_is_not_an_export(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("Some text to check.", encoding="utf-8")
    with pytest.raises(WenmaiError, match="is not a Wenmai export"):
        detect_file(text, tmp_path, KEY)


def test_bad_scheme_settings_and_inputs_name_the_culprit(tmp_path, generations):
    with pytest.raises(WenmaiError, match="greenlist_ratio: 1.5"):
        watermarking_config(KEY, greenlist_ratio=1.5)
    with pytest.raises(WenmaiError, match="seeding_scheme: 'midhash'"):
        watermarking_config(KEY, seeding_scheme="midhash")
    with pytest.raises(WenmaiError, match=r"missing\.txt: no such file"):
        detect_file(tmp_path / "missing.txt", generations.folder, KEY)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(WenmaiError, match=r"blank\.txt: there is no text"):
        detect_file(blank, generations.folder, KEY)


def test_wenmai_detect_prints_a_verdict_per_text_and_names_a_missing_key(generations, tmp_path, cli, monkeypatch):
    answers = write_jsonl(tmp_path / "a.jsonl", [{"text": generations.watermarked[0]}, {"text": generations.plain[0]}])
    monkeypatch.delenv("NO_SUCH_WENMAI_KEY", raising=False)
    code, _, err = cli("detect", answers, "--model", generations.folder, "--key-env", "NO_SUCH_WENMAI_KEY")
    assert code == 2 and "NO_SUCH_WENMAI_KEY" in err and "Traceback" not in err
    monkeypatch.setattr("finetune.watermark.key_from_env", lambda var: KEY)
    code, out, _ = cli("detect", answers, "--model", generations.folder)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and [r["watermarked"] for r in rows] == [True, False]
