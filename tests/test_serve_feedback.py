"""Visitor feedback on `wenmai serve` (POST /v1/feedback) lands in the review store where curators see it; the
conversation log is off by default, PII-scrubbed when on, and purged after its retention."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from test_serve import MODEL_ID, TIMEOUT, build_export, client_for, running_app

from finetune.review.feedback import logged_conversation, purge_conversations, visitor_session
from finetune.review.store import ReviewStore
from finetune.serving import create_app

PHONE = "13812345678"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return build_export(tmp_path_factory.mktemp("feedback") / "export")


def chat(base: str, question: str):
    return client_for(base).chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": question}], max_tokens=8
    )


def post(base: str, body: dict) -> httpx.Response:
    return httpx.post(f"{base}/v1/feedback", json=body, timeout=TIMEOUT)


def test_feedback_on_a_served_answer_becomes_a_review_item_curators_see(export, tmp_path):
    db = tmp_path / "review.db"
    with running_app(create_app(export, feedback_db=str(db))) as base:
        reply = chat(base, f"Who cast the bronze ding? My phone is {PHONE}.")
        sent = post(base, {"response_id": reply.id, "thumb": "down", "scores": {"overall": 2}, "comment": "wrong era",
                           "corrected_answer": "It was cast in the Western Zhou.", "visitor": "visitor-7"})  # fmt: skip
        assert sent.status_code == 200, sent.text
        assert post(base, {"response_id": reply.id, "thumb": "up"}).status_code == 200  # another visitor
        for body, status, code in [
            ({"response_id": "chatcmpl-none", "thumb": "up"}, 404, "response_not_found"),
            ({"response_id": reply.id, "scores": {"overall": 7}}, 400, None),
            ({"response_id": reply.id, "scores": {"nope": 3}}, 400, None),
            ({"response_id": reply.id}, 400, None),
            ({"response_id": reply.id, "thumb": "sideways"}, 400, None),
        ]:
            answer = post(base, body)
            assert answer.status_code == status and "error" in answer.json(), (body, answer.text)
            assert code is None or answer.json()["error"]["code"] == code
        assert chat(base, "Still serving?").choices[0].message.content  # bad feedback did not stop the server
    store = ReviewStore.open(db)
    session = visitor_session(MODEL_ID)
    [item] = store.items(session)
    reviews = sorted(store.latest_reviews(session), key=lambda r: r.id)
    store.close()
    assert item.key == reply.id and PHONE not in item.prompt and "<PHONE>" in item.prompt
    assert item.answers[0].text == reply.choices[0].message.content
    assert [(r.thumb, r.scores, r.source) for r in reviews] == [
        ("down", {"A": {"overall": 2}}, "visitor"),
        ("up", {}, "visitor"),
    ]
    assert reviews[0].corrected_answer == "It was cast in the Western Zhou." and reviews[0].comment == "wrong era"
    assert reviews[0].reviewer.startswith("visitor-") and "visitor-7" not in reviews[0].reviewer  # a hash, not the id


def test_conversation_logging_is_off_by_default_and_scrubbed_and_purged_when_on(export, tmp_path):
    db = tmp_path / "review.db"
    with running_app(create_app(export, feedback_db=str(db))) as base:
        chat(base, "Nothing is logged.")
    assert sqlite3.connect(db).execute("select count(*) from conversations").fetchone() == (0,)

    with running_app(create_app(export, feedback_db=str(db), log_days=3)) as base:
        reply = chat(base, f"Call me on {PHONE} about the scroll.")
    with running_app(create_app(export, feedback_db=str(db), log_days=3)) as base:  # a restart: memory is gone
        assert post(base, {"response_id": reply.id, "thumb": "up"}).status_code == 200  # found in the log
    store = ReviewStore.open(db)
    logged = logged_conversation(store, reply.id)
    assert logged is not None and PHONE not in logged.messages[-1]["content"]
    assert purge_conversations(store, datetime.now(timezone.utc) + timedelta(days=2)) == 0
    assert purge_conversations(store, datetime.now(timezone.utc) + timedelta(days=4)) == 1
    assert logged_conversation(store, reply.id) is None
    store.close()


def test_logging_needs_a_store_and_feedback_needs_it_turned_on(export, tmp_path):
    from finetune.errors import WenmaiError

    with pytest.raises(WenmaiError, match="--feedback-db"):
        create_app(export, log_days=3)
    with running_app(create_app(export)) as base:
        answer = post(base, {"response_id": "x", "thumb": "up"})
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "feedback_disabled"


def test_the_serve_command_names_bad_options_before_loading_anything(export, tmp_path, cli):
    code, _, err = cli("serve", export, "--filter", "hide")
    assert code == 2 and "--filter: 'hide' is not one of refuse, redact" in err
    code, _, err = cli("serve", tmp_path, "--port", "1")
    assert code == 2 and "neither a Wenmai export" in err and "Traceback" not in err
    code, _, err = cli("serve", export, "--host", "0.0.0.0", "--port", "1")
    assert code == 2 and "needs an API key" in err
    code, _, err = cli("serve", export, "--log-days", "3", "--port", "1")
    assert code == 2 and "--feedback-db" in err
