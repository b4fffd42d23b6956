"""`wenmai data check | scrub | card` on files and recipes; personal data never leaves in any output."""

from __future__ import annotations

import json
from pathlib import Path

from test_data_policy import chat
from tiny_models import write_jsonl

ROOT = Path(__file__).resolve().parent.parent
PHONES = ["13912345678", "13912345679", "13912345670"]
EMAIL = "wang.fang@example.org"


def messy_rows() -> list[dict]:
    rows = [chat(i, f"The donor left the number {PHONES[i]} and {EMAIL}.", licence="CC-BY-4.0") for i in range(3)]
    for row in rows:
        row["messages"][0]["content"] = "Who donated the bronze mirror?"  # the same record but for the number
    rows += [
        chat(10, "A lacquer box from the Song dynasty.", licence="CC-BY-NC-4.0"),
        chat(11, "A lacquer box from the Song dynasty!", licence="CC-BY-4.0"),
        chat(12, "Human remains: a Han dynasty burial with jade suit.", licence="CC0-1.0", sensitivity="internal"),
    ]
    return rows


def test_scrub_writes_masked_deduplicated_records_and_no_pii(tmp_path, cli):
    source = write_jsonl(tmp_path / "in.jsonl", messy_rows())
    code, out, err = cli("data", "scrub", source, tmp_path / "out.jsonl")
    assert code == 0, out + err
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in written] == ["r0", "r1", "r2", "r10", "r11", "r12"]  # dedup is opt-in (data.policy.dedup)
    text = json.dumps(written, ensure_ascii=False)
    assert not any(p in text for p in PHONES) and EMAIL not in text
    assert text.count("<PHONE>") == 3 and text.count("<EMAIL>") == 3
    assert not any(p in out + err for p in PHONES) and "3 mobile" in out


def test_scrub_with_a_commercial_policy_and_dedup_from_a_recipe(tmp_path, cli, tiny_model):
    source = write_jsonl(tmp_path / "in.jsonl", messy_rows())
    recipe = tmp_path / "policy.yaml"
    recipe.write_text(
        f"name: p\nmodel: {{path: {tiny_model}}}\ndata:\n  policy: {{intended_use: commercial, "
        f"dedup: {{exact: true}}}}\n  d: {{path: {source}, format: chat}}\nstages: [{{sft: {{dataset: d}}}}]\n"
    )
    code, out, err = cli("data", "scrub", source, tmp_path / "out.jsonl", "--recipe", recipe)
    assert code == 0, out + err
    ids = [json.loads(line)["id"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ids == ["r0", "r11", "r12"]  # r1, r2 repeat r0 once masked; r10 is CC-BY-NC (so r11 is no repeat)
    assert "1 licence: CC-BY-NC-4.0 does not permit commercial use" in out and "2 exact" in out


def test_a_policy_file_that_is_not_there_is_named_before_any_record_is_read(tmp_path, cli, tiny_model):
    source = write_jsonl(tmp_path / "in.jsonl", messy_rows())
    recipe = tmp_path / "policy.yaml"
    recipe.write_text(
        f"name: p\nmodel: {{path: {tiny_model}}}\ndata:\n  policy: {{topic_list: missing-topics.yaml}}\n"
        f"  d: {{path: {source}, format: chat}}\nstages: [{{sft: {{dataset: d}}}}]\n"
    )
    code, _, err = cli("data", "check", recipe)
    assert (
        code == 2
        and "data.policy.topic_list" in err
        and "missing-topics.yaml not found" in err
        and "policy.yaml:4" in err
    )
    code, _, err = cli("data", "scrub", source, tmp_path / "out.jsonl", "--recipe", recipe)
    assert code == 2 and "data.policy.topic_list" in err and not (tmp_path / "out.jsonl").exists()


def test_check_shows_counts_and_writes_nothing(tmp_path, cli):
    source = write_jsonl(tmp_path / "in.jsonl", messy_rows())
    code, out, err = cli("data", "check", source)
    assert code == 0, out + err
    assert "6" in out and "3 mobile, 3 email (mask)" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_card_for_a_recipe_lists_sizes_licences_grades_and_register(tmp_path, cli):
    code, out, err = cli("data", "card", ROOT / "recipes" / "quickstart.yaml", "--out", tmp_path)
    assert code == 0, out + err
    card = json.loads((tmp_path / "data_card.json").read_text(encoding="utf-8"))
    culture = next(d for d in card["datasets"] if d["name"] == "culture")
    assert culture["kept"] == 329 and culture["licences"] == {"CC0-1.0": 329}
    assert culture["languages"] == {"zh": 165, "en": 164}  # the README's counts
    assert culture["sources"] == {"Wenmai project / sample cultural Q&A": 329} and culture["grades"] == {"public": 329}
    register = (tmp_path / "sensitive_register.jsonl").read_text(encoding="utf-8").splitlines()
    assert sum(json.loads(line)["dataset"] == "culture" for line in register) == culture["registered"] > 0
    assert {t for line in register for t in json.loads(line)["topics"]} <= {
        "human_remains",
        "sacred_objects",
        "contested_provenance",
        "communities",
    }
    markdown = (tmp_path / "data_card.md").read_text(encoding="utf-8")
    assert "## Dataset `culture`" in markdown and "| CC0-1.0 | 329 |" in markdown


def test_card_of_a_file_with_pii_counts_it_but_never_writes_it(tmp_path, cli):
    source = write_jsonl(tmp_path / "in.jsonl", messy_rows())
    code, out, err = cli("data", "card", source, "--out", tmp_path / "card")
    assert code == 0, out + err
    for path in (tmp_path / "card").iterdir():
        text = path.read_text(encoding="utf-8")
        assert not any(p in text for p in PHONES) and EMAIL not in text, path
    card = json.loads((tmp_path / "card" / "data_card.json").read_text())
    assert card["datasets"][0]["pii_found"] == {"mobile": 3, "email": 3}
    register = [json.loads(line) for line in (tmp_path / "card" / "sensitive_register.jsonl").read_text().splitlines()]
    assert [(e["record"], e["grade"]) for e in register] == [("r12", "internal")]


def test_unknown_format_and_missing_file_are_named(tmp_path, cli):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    code, _, err = cli("data", "check", odd)
    assert code == 2 and "odd.jsonl:1: cannot tell the record format (fields: question, answer); give --format" in err
    code, _, err = cli("data", "check", tmp_path / "none.jsonl")
    assert code == 2 and "none.jsonl: no such file" in err


def test_large_files_show_a_progress_bar_without_changing_results(tmp_path, cli, monkeypatch):
    from finetune.data import layer

    source = write_jsonl(tmp_path / "in.jsonl", messy_rows() * 700)  # 4,200 records: the bar advances in batches
    code, quiet, err = cli("data", "check", source)
    monkeypatch.setattr(layer, "PROGRESS_MIN_BYTES", 0)
    code_bar, with_bar, err_bar = cli("data", "check", source)
    assert code == code_bar == 0, err + err_bar
    assert quiet == with_bar and "4200" in quiet


def test_validate_shows_what_the_data_layer_keeps_out(cli, tiny_model):
    code, out, err = cli("validate", ROOT / "recipes" / "smoke.yaml", "--set", f"model.path={tiny_model}")
    assert code == 0, out + err
    table = out[out.index("Data layer") :]
    assert "culture" in table and "instructions" in table
    assert "eval: dataset" in table  # a training record that repeats an eval record is dropped before training
