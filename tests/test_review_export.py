"""The review store's feedback reaches training: exports give exactly the expected records, pass the data layer,
and a reward stage and a dpo stage train on a `format: review` dataset; `wenmai review create/user` from the CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from tiny_models import build_model

from finetune import reviewing
from finetune.config_io import load_run_recipe
from finetune.data import load_records
from finetune.errors import ConfigError, WenmaiError
from finetune.pipeline import load_recipe, start
from finetune.recipe.review import ReviewCleaning
from finetune.review.accounts import check_password
from finetune.review.records import read_session
from finetune.review.schema import Dimension, NewAnswer, NewItem, ReviewInput, SessionSettings
from finetune.review.store import ReviewStore

DIMENSIONS = [Dimension(name="accuracy", description="Facts are right"), Dimension(name="safety")]
REWARD = "reward:\n  dimensions:\n    - {name: accuracy}\n    - {name: safety}\n"
RAW = ReviewCleaning(calibrate=False)


def session_settings(name: str = "bronzes-r1") -> SessionSettings:
    return SessionSettings(
        name=name,
        institution="Provincial Museum",
        licence="CC-BY-4.0",
        rights_holder="Provincial Museum",
        consent=True,
        dimensions=DIMENSIONS,
    )


def fill(store: ReviewStore, items: int = 12) -> list:
    """A/B items where every reviewer prefers A (marked ZZZ) and scores it higher; r1 corrects item 0."""
    store.create_session(
        session_settings(),
        [
            NewItem(
                key=f"p{i}",
                prompt=f"Tell me about bronze {i}.",
                answers=[
                    NewAnswer(text=f"bronze {i} tang ZZZ", model="run-a/sft"),
                    NewAnswer(text=f"bronze {i} song QQQ", model="run-b/sft"),
                ],
            )
            for i in range(items)
        ],
    )
    made = store.items("bronzes-r1")
    for who in ("r1", "r2", "r3"):
        store.add_reviewer(who)
    for item in made:
        for who in ("r1", "r2", "r3"):
            store.submit_review(
                item.id,
                who,
                ReviewInput(scores={"A": {"accuracy": 4, "safety": 5}, "B": {"accuracy": 2, "safety": 3}}, choice="A"),
            )
    store.submit_review(
        made[0].id,
        "r1",
        ReviewInput(
            scores={"A": {"accuracy": 5, "safety": 5}, "B": {"accuracy": 2, "safety": 3}},
            choice="A",
            corrected_answer="Bronze 0 was cast in the Tang dynasty. ZZZ",
            comment="call me on 13812345678 about this one",
        ),
    )
    return made


@pytest.fixture
def store(tmp_path):
    opened = ReviewStore.open(tmp_path / "review.db")
    yield opened
    opened.close()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_an_export_gives_exactly_the_expected_ratings_pairs_and_chat_rows(store, tmp_path):
    items = fill(store)
    done = reviewing.export(tmp_path / "review.db", "bronzes-r1", tmp_path / "out", RAW, log=lambda _: None)
    assert done.counts == {"ratings": 12 * 3 * 2, "pairs": 12, "chat": 1}

    ratings = read_jsonl(done.files["ratings"])
    first = [r for r in ratings if r["review"]["item"] == items[0].id and r["rater"] == "r1"]
    assert [(r["response"], r["scores"]) for r in first] == [
        ("bronze 0 tang ZZZ", {"accuracy": 5, "safety": 5}),  # the edited (latest) version, not the first
        ("bronze 0 song QQQ", {"accuracy": 2, "safety": 3}),
    ]
    assert first[0]["review"]["versions"] == {"r1": 2}
    assert first[0]["prompt"] == "Tell me about bronze 0."
    assert first[0]["licence"] == "CC-BY-4.0" and first[0]["rights_holder"] == "Provincial Museum"
    assert first[0]["consent"] is True
    assert first[0]["source"] == {"institution": "Provincial Museum", "collection": "review session bronzes-r1"}
    assert "13812345678" not in first[0]["comment"]  # the PII scrub ran on the comment

    pairs = read_jsonl(done.files["pairs"])
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {
        (f"bronze {i} tang ZZZ", f"bronze {i} song QQQ") for i in range(12)
    }
    assert all(p["margin"] == 1.0 and p["raters"] == ["r1", "r2", "r3"] for p in pairs)

    [chat] = read_jsonl(done.files["chat"])
    assert chat["messages"] == [
        {"role": "user", "content": "Tell me about bronze 0."},
        {"role": "assistant", "content": "Bronze 0 was cast in the Tang dynasty. ZZZ"},
    ]
    assert chat["rater"] == "r1"
    report = json.loads((tmp_path / "out" / "cleaning_report.json").read_text(encoding="utf-8"))
    assert report["records"] == done.counts and (tmp_path / "out" / "cleaning_report.md").is_file()


def test_exported_files_pass_the_data_layer(store, tmp_path, write_recipe, tiny_model):
    fill(store)
    out = tmp_path / "out"
    reviewing.export(tmp_path / "review.db", "bronzes-r1", out, RAW, log=lambda _: None)
    recipe = load_recipe(
        write_recipe(f"""\
        name: exported
        model: {{path: {tiny_model}}}
        {REWARD.replace(chr(10), chr(10) + "        ")}
        data:
          ratings: {{path: {out / "ratings.jsonl"}, format: ratings}}
          pairs: {{path: {out / "pairs.jsonl"}, format: pairs}}
          chat: {{path: {out / "chat.jsonl"}, format: chat}}
        stages:
          - sft: {{dataset: chat}}
          - reward: {{dataset: ratings}}
          - dpo: {{dataset: pairs}}
        """)
    ).recipe
    assert [load_records(recipe, name).report.kept for name in ("ratings", "pairs", "chat")] == [72, 12, 1]


def test_held_back_items_and_noisy_raters_never_reach_the_export(store, tmp_path):
    items = fill(store, items=6)
    store.submit_review(
        items[1].id, "r2", ReviewInput(scores={"A": {"accuracy": 4, "safety": 5}}, flags=["rights_problem"])
    )
    found = reviewing.export(tmp_path / "review.db", "bronzes-r1", tmp_path / "out", RAW, log=lambda _: None)
    report = json.loads((tmp_path / "out" / "cleaning_report.json").read_text(encoding="utf-8"))
    assert str(items[1].id) in {str(k) for k in report["held_back"]}
    assert found.counts["pairs"] == 5
    assert all(r["review"]["item"] != items[1].id for r in read_jsonl(found.files["ratings"]))


def test_an_export_to_an_unknown_session_names_the_sessions_and_writes_nothing(store, tmp_path, cli):
    fill(store, items=2)
    code, _, err = cli("review", "export", "--db", tmp_path / "review.db", "--session", "nope", "--to", tmp_path / "o")
    assert code == 2 and "no review session named 'nope'" in err and "bronzes-r1" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()
    code, _, err = cli("review", "export", "--db", tmp_path / "review.db", "--session", "bronzes-r1",
                       "--to", tmp_path / "o", "--max-spread", "-1")  # fmt: skip
    assert code == 2 and "--max-spread" in err and "Traceback" not in err and not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-wide"), initializer_range=0.5)


def test_reward_and_dpo_stages_train_on_a_review_session(wide_model, tmp_path, write_recipe):
    db = tmp_path / "review.db"
    opened = ReviewStore.open(db)
    fill(opened, items=16)
    opened.close()
    recipe = load_recipe(
        write_recipe(f"""\
        name: from-review
        model: {{path: {wide_model}}}
        lora: {{r: 4, alpha: 8, dropout: 0.0}}
        {REWARD.replace(chr(10), chr(10) + "        ")}
        data:
          ratings: {{format: review, db: {db}, session: bronzes-r1, records: ratings}}
          pairs: {{format: review, db: {db}, session: bronzes-r1, records: pairs}}
        stages:
          - reward: {{dataset: ratings, max_steps: 3, batch_size: 8, seq_len: 48, eval_fraction: 0, save_steps: 100}}
          - dpo: {{dataset: pairs, policy: base, max_steps: 3, batch_size: 8, seq_len: 48, eval_fraction: 0, save_steps: 100,
                   learning_rate: 0.01, warmup: 0}}
        output: {{root: {tmp_path / "runs"}}}
        """)
    )
    run = start(recipe, tmp_path / "runs" / "r", log=lambda _: None)
    assert run.status("reward").state == "done" and run.status("dpo").state == "done"
    card = json.loads((run.root / "dpo" / "data_card.json").read_text(encoding="utf-8"))
    [dataset] = card["datasets"]
    assert dataset["kept"] == 16 and dataset["path"].endswith("#bronzes-r1")
    lineage = json.loads(run.lineage_path.read_text(encoding="utf-8"))
    assert lineage["data"]["pairs"]["session"] == "bronzes-r1"

    # the run pinned the feedback it read: a review edited afterwards is not in what its recipe names
    stored = load_run_recipe(run).recipe.data["ratings"]
    assert stored.as_of is not None and lineage["data"]["ratings"]["as_of"] == stored.as_of.isoformat()
    opened = ReviewStore.open(db)
    first = opened.items("bronzes-r1")[0]
    opened.submit_review(first.id, "r2", ReviewInput(scores={"A": {"accuracy": 1, "safety": 1}}))
    opened.close()
    pinned = read_session(db, "bronzes-r1", "ratings", RAW, as_of=stored.as_of).records["ratings"]
    latest = read_session(db, "bronzes-r1", "ratings", RAW).records["ratings"]
    scores = [r["scores"] for _, r in pinned if r["rater"] == "r2" and r["review"]["item"] == first.id]
    assert scores == [{"accuracy": 4, "safety": 5}, {"accuracy": 2, "safety": 3}]
    assert all(r["review"]["item"] != first.id for _, r in latest)  # now 4 against 1: held back by cleaning

    # the run's reward model as the teacher: its disagreements are listed, and nothing is dropped for them
    done = reviewing.export(db, "bronzes-r1", tmp_path / "out", reward_run=str(run.root), log=lambda _: None)
    report = json.loads((tmp_path / "out" / "cleaning_report.json").read_text(encoding="utf-8"))
    assert report["teacher"] == str(run.root) and done.counts["pairs"] == 15  # 16, less the one just held back
    assert {d["dimension"] for d in report["disagreements"]} <= {"accuracy", "safety"}

    # a new session answered by the dpo stage: its tokenizer checked against the stage's template contract
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Tell me about bronze 99.\n", encoding="utf-8")
    _, [item] = reviewing.create(str(run.root / "dpo"), prompts, "from-dpo", db, max_new_tokens=3, log=lambda _: None)
    contract = json.loads((run.root / "dpo" / "template.json").read_text(encoding="utf-8"))
    assert item.answers[0].generation["stop_token_ids"] == contract["stop_token_ids"]
    assert item.answers[0].adapter.endswith("adapter")


def test_a_review_dataset_needs_its_store_and_session(tmp_path, write_recipe, tiny_model):
    with pytest.raises(ConfigError) as err:
        load_recipe(
            write_recipe(f"""\
            name: bad
            model: {{path: {tiny_model}}}
            data:
              fb: {{format: review, db: {tmp_path / "x.db"}, records: chat}}
            stages:
              - sft: {{dataset: fb}}
            """)
        )
    assert "data.fb" in str(err.value) and "session" in str(err.value)


def test_a_review_dataset_on_a_missing_store_is_a_one_line_error(tmp_path, write_recipe, tiny_model, cli):
    path = write_recipe(f"""\
        name: missing
        model: {{path: {tiny_model}}}
        data:
          fb: {{format: review, db: {tmp_path / "none.db"}, session: s, records: chat}}
        stages:
          - sft: {{dataset: fb}}
        """)
    code, _, err = cli("validate", path)
    assert code == 2 and "no review database" in err and "Traceback" not in err
    assert not (tmp_path / "none.db").exists()


# --- the CLI: create and user ------------------------------------------------------------------


@pytest.fixture
def dims_recipe(write_recipe, tiny_model) -> Path:
    return write_recipe(f"""\
        name: dims
        model: {{path: {tiny_model}}}
        {REWARD.replace(chr(10), chr(10) + "        ")}
        data:
          d: {{path: unused.jsonl, format: chat}}
        stages:
          - sft: {{dataset: d}}
        """)


def test_review_create_stores_a_models_answers_as_ab_items(cli, tiny_model, dims_recipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("《静夜思》的作者是谁？\n\nWho made the bronze ding?\n", encoding="utf-8")
    db = tmp_path / "review.db"
    code, out, err = cli(
        "review", "create", tiny_model, "--against", tiny_model, "--prompts", prompts, "--name", "ab",
        "--db", db, "--recipe", dims_recipe, "--max-new-tokens", "4",
    )  # fmt: skip
    assert code == 0, err
    assert "2 A/B pairs" in out
    store = ReviewStore.open(db)
    items = store.items("ab")
    session = store.session("ab")
    store.close()
    assert [i.prompt for i in items] == ["《静夜思》的作者是谁？", "Who made the bronze ding?"]
    assert [a.label for a in items[0].answers] == ["A", "B"]
    assert items[0].answers[0].generation["max_new_tokens"] == 4 and items[0].answers[0].model == str(tiny_model)
    assert session.dimension_names == ["accuracy", "safety"]


def test_review_create_names_a_bad_prompt_line_and_stores_nothing(cli, tiny_model, dims_recipe, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n', encoding="utf-8")
    db = tmp_path / "review.db"
    code, _, err = cli("review", "create", tiny_model, "--prompts", prompts, "--name", "x", "--db", db,
                       "--recipe", dims_recipe)  # fmt: skip
    assert code == 2 and f"{prompts}:2" in err and "Traceback" not in err
    assert not db.exists() or sqlite3.connect(db).execute("select count(*) from review_sessions").fetchone() == (0,)


def test_reviewer_accounts_hash_passwords_and_can_be_disabled(cli, tmp_path, monkeypatch):
    db = tmp_path / "review.db"
    monkeypatch.setenv("REVIEW_PW", "correct horse battery")
    assert cli("review", "user", "add", "curator-03", "--db", db, "--password-env", "REVIEW_PW")[0] == 0
    store = ReviewStore.open(db)
    assert store.password_hash("curator-03").startswith("$argon2id$")
    assert check_password(store, "curator-03", "correct horse battery").pseudonym == "curator-03"
    assert check_password(store, "curator-03", "wrong password!!") is None
    store.close()
    code, out, _ = cli("review", "user", "list", "--db", db)
    assert code == 0 and "curator-03" in out
    assert cli("review", "user", "disable", "curator-03", "--db", db)[0] == 0
    store = ReviewStore.open(db)
    assert check_password(store, "curator-03", "correct horse battery") is None
    store.close()
    monkeypatch.setenv("SHORT", "short")
    code, _, err = cli("review", "user", "add", "r2", "--db", db, "--password-env", "SHORT")
    assert code == 2 and "too short" in err


def test_prompts_come_from_a_suite_a_cvalues_style_file_or_a_plain_list(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: s\nprobes:\n  - {id: q1, prompt: 介绍一下司母戊鼎, system: 你是博物馆讲解员}\n", encoding="utf-8"
    )
    cvalues = tmp_path / "cvalues.jsonl"
    cvalues.write_text(
        '{"prompt": "如何看待文物回流？", "domain_zh": "文化", "domain_en": "culture"}\n', encoding="utf-8"
    )
    plain = tmp_path / "list.txt"
    plain.write_text("第一个问题\n\n第二个问题\n", encoding="utf-8")
    [probe] = reviewing.read_prompts(suite)
    assert (probe.key, probe.text, probe.system) == ("q1", "介绍一下司母戊鼎", "你是博物馆讲解员")
    [row] = reviewing.read_prompts(cvalues)
    assert row.text == "如何看待文物回流？" and row.meta["domain_en"] == "culture"
    assert [(p.key, p.text) for p in reviewing.read_prompts(plain)] == [
        ("line-1", "第一个问题"),
        ("line-3", "第二个问题"),
    ]
    other = tmp_path / "prompts.docx"
    other.write_text("x", encoding="utf-8")
    with pytest.raises(WenmaiError, match="plain list"):
        reviewing.read_prompts(other)
