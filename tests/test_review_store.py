"""The review store keeps every judgement, refuses bad ones whole, and survives concurrent reviewers, on SQLite
and on PostgreSQL (a throwaway cluster, started once; the PostgreSQL cases skip without one, and fail under CI=true).
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.config import Config
from alembic.script import ScriptDirectory
from postgres import postgres_or_skip
from sqlalchemy import create_engine, event, func, select, text
from sqlalchemy.engine import Engine, make_url

from finetune.errors import WenmaiError
from finetune.review.database import MIGRATIONS
from finetune.review.schema import Dimension, NewAnswer, NewItem, ReviewInput, SessionSettings
from finetune.review.store import ReviewError, ReviewStore
from finetune.review.tables import Base

BACKENDS = ["sqlite", "postgres"]
SESSION = "bronzes-r1"
DIMENSIONS = [Dimension(name="accuracy", description="Facts match the catalogue."), Dimension(name="fluency")]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """One PostgreSQL cluster for the whole run; each test that needs it takes a database of its own."""
    with postgres_or_skip() as url:
        yield url


def fresh_database(request: pytest.FixtureRequest, folder: Path) -> str:
    """An empty review database for one test: a SQLite file, or a new database on the throwaway cluster."""
    if request.param == "sqlite":
        return str(folder / "review.db")
    server = request.getfixturevalue("postgres_server")
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    finally:
        engine.dispose()
    return make_url(server).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def db(request, tmp_path) -> str:
    return fresh_database(request, tmp_path)


@pytest.fixture
def store(db) -> Iterator[ReviewStore]:
    opened = ReviewStore.open(db)
    yield opened
    opened.close()


def settings(name: str = SESSION) -> SessionSettings:
    return SessionSettings(
        name=name,
        institution="Shanghai Museum",
        licence="CC-BY-4.0",
        rights_holder="Shanghai Museum",
        consent=True,
        dimensions=DIMENSIONS,
        reviewers_per_item=2,
    )


def one_answer(prompt: str, key: str | None = None) -> NewItem:
    return NewItem(key=key, prompt=prompt, answers=[NewAnswer(text=f"about {prompt}", model="runs/sft-1")])


def two_answers(prompt: str, key: str | None = None) -> NewItem:
    return NewItem(
        key=key,
        prompt=prompt,
        system="You are a museum guide.",
        answers=[
            NewAnswer(text="A ding is a cauldron.", model="runs/sft-1", generation={"max_new_tokens": 64}),
            NewAnswer(text="A ding is a bell.", model="runs/dpo-1", adapter="runs/dpo-1/adapter"),
        ],
        meta={"gallery": "bronzes"},
    )


def row_counts(store: ReviewStore) -> dict[str, int]:
    """Rows in every table of the store: what 'nothing was written' is checked against."""
    with store.engine.connect() as connection:
        return {t.name: connection.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}


# --- round trip --------------------------------------------------------------------------------------


def test_sessions_items_reviewers_and_reviews_round_trip_and_survive_reopening(store, db):
    session = store.create_session(settings())
    other = store.create_session(settings("paintings-r1"))
    one, two = store.add_items(SESSION, [one_answer("What is a gu?", key="p1"), two_answers("What is a ding?", "p2")])
    [elsewhere] = store.add_items("paintings-r1", [one_answer("Who painted this scroll?")])
    store.add_reviewer("r1")
    store.add_reviewer("r2", role="admin", password_hash="hash-of-r2")

    assert session.model_dump(exclude={"id", "created_at"}) == settings().model_dump()
    assert [s.name for s in store.sessions()] == [SESSION, "paintings-r1"] and other.id != session.id
    assert store.items(SESSION) == [one, two]
    assert [a.label for a in one.answers] == ["A"] and [a.label for a in two.answers] == ["A", "B"]
    assert two.answers[1].adapter == "runs/dpo-1/adapter" and two.answers[0].generation == {"max_new_tokens": 64}
    assert (two.key, two.system, two.meta) == ("p2", "You are a museum guide.", {"gallery": "bronzes"})
    assert [(r.pseudonym, r.role, r.active) for r in store.reviewers()] == [
        ("r1", "reviewer", True),
        ("r2", "admin", True),
    ]
    assert store.password_hash("r2") == "hash-of-r2"

    first = store.submit_review(one.id, "r1", ReviewInput(scores={"A": {"accuracy": 2, "fluency": 4}}))
    full = ReviewInput(
        scores={"A": {"accuracy": 5}, "B": {"accuracy": 1}},
        choice="A",
        corrected_answer="A ding is a ritual cauldron.",
        flags=["factual_error"],
        comment="B confuses ding and zhong",
    )
    r1_two = store.submit_review(two.id, "r1", full)
    r2_two = store.submit_review(two.id, "r2", ReviewInput(choice="tie"))
    store.submit_review(elsewhere.id, "r1", ReviewInput(scores={"A": {"fluency": 3}}))
    edited = store.submit_review(
        one.id, "r1", ReviewInput(scores={"A": {"accuracy": 3, "fluency": 4}}, comment="on reflection")
    )

    assert (first.version, edited.version, r1_two.version, r2_two.version) == (1, 2, 1, 1)
    assert r1_two.model_dump(include=set(ReviewInput.model_fields)) == full.model_dump()
    history = store.history(one.id, "r1")
    assert [(r.version, r.scores["A"]["accuracy"], r.comment) for r in history] == [
        (1, 2, None),
        (2, 3, "on reflection"),
    ]
    assert history == [first, edited]

    latest = store.latest_reviews(SESSION)
    assert sorted((r.item_id, r.reviewer, r.version) for r in latest) == [
        (one.id, "r1", 2),
        (two.id, "r1", 1),
        (two.id, "r2", 1),
    ]
    assert edited in latest and r1_two in latest and r2_two in latest
    assert store.count_reviews(SESSION) == 4 and store.count_reviews("paintings-r1") == 1 and store.count_reviews() == 5

    before = (store.sessions(), store.items(SESSION), store.reviewers(), latest, history, row_counts(store))
    store.close()
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", record)
    try:
        reopened = ReviewStore.open(db)
    finally:
        event.remove(Engine, "before_cursor_execute", record)
    try:
        changes = [
            s for s in statements if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP", "INSERT", "UPDATE"))
        ]
        assert changes == [], "opening a migrated store again must not change its tables"
        after = (
            reopened.sessions(),
            reopened.items(SESSION),
            reopened.reviewers(),
            reopened.latest_reviews(SESSION),
            reopened.history(one.id, "r1"),
            row_counts(reopened),
        )
        assert after == before
    finally:
        reopened.close()


def test_the_store_is_at_the_head_revision(store):
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(config).get_current_head()
    with store.engine.connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    assert head == "0003" and versions == [head]


def test_the_sqlite_file_is_in_wal_mode(tmp_path):
    path = tmp_path / "review.db"
    ReviewStore.open(path).close()
    with sqlite3.connect(path) as plain:  # a connection without the store's pragmas: WAL is a property of the file
        assert plain.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# --- bad input: refused whole, the culprit named ------------------------------------------------------


@pytest.fixture(scope="module", params=BACKENDS)
def reviewed(request, tmp_path_factory):
    """A session with a one-answer item and a two-answer item, an active reviewer r1, a disabled r2, one review."""
    opened = ReviewStore.open(fresh_database(request, tmp_path_factory.mktemp("bad-input")))
    opened.create_session(settings())
    one, two = opened.add_items(SESSION, [one_answer("What is a gu?"), two_answers("What is a ding?")])
    opened.add_reviewer("r1")
    opened.add_reviewer("r2")
    opened.set_active("r2", False)
    opened.submit_review(two.id, "r1", ReviewInput(choice="B"))
    yield opened, one, two
    opened.close()


BAD_INPUT = {
    "score-of-7": (
        lambda s, one, two: s.submit_review(two.id, "r1", ReviewInput(scores={"A": {"accuracy": 7}})),
        ["scores.A.accuracy", "7", "1..5"],
    ),
    "unknown-dimension": (
        lambda s, one, two: s.submit_review(two.id, "r1", ReviewInput(scores={"A": {"beauty": 3}})),
        ["scores.A.beauty", "unknown dimension", "accuracy, fluency"],
    ),
    "valid-score-beside-a-bad-one": (
        lambda s, one, two: s.submit_review(
            two.id, "r1", ReviewInput(scores={"A": {"accuracy": 4}, "B": {"accuracy": 0}})
        ),
        ["scores.B.accuracy", "0"],
    ),
    "answer-B-on-a-one-answer-item": (
        lambda s, one, two: s.submit_review(one.id, "r1", ReviewInput(scores={"B": {"accuracy": 3}})),
        ["scores.B", "item {one} has answer A;"],
    ),
    "choice-on-a-one-answer-item": (
        lambda s, one, two: s.submit_review(one.id, "r1", ReviewInput(choice="A")),
        ["choice: item {one} has one answer"],
    ),
    "unknown-item": (lambda s, one, two: s.submit_review(999_999, "r1", ReviewInput(choice="A")), ["item 999999"]),
    "unknown-reviewer": (
        lambda s, one, two: s.submit_review(two.id, "nobody", ReviewInput(choice="A")),
        ["'nobody'", "review user add"],
    ),
    "disabled-reviewer": (
        lambda s, one, two: s.submit_review(two.id, "r2", ReviewInput(choice="A")),
        ["'r2'", "disabled"],
    ),
    "duplicate-session-name": (lambda s, one, two: s.create_session(settings()), [repr(SESSION), "--name"]),
    "empty-review": (
        lambda s, one, two: s.submit_review(two.id, "r1", ReviewInput()),
        ["empty review", "scores", "choice"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_refused_whole_and_names_the_field(reviewed, case):
    store, one, two = reviewed
    write, named = BAD_INPUT[case]
    culprits = [c.format(one=one.id) for c in named]
    before, reviews = row_counts(store), store.count_reviews()
    with pytest.raises(ReviewError) as refused:
        write(store, one, two)
    assert isinstance(refused.value, WenmaiError)
    message = str(refused.value)
    assert all(c in message for c in culprits), f"{message!r} should name {culprits}"
    assert store.count_reviews() == reviews and row_counts(store) == before


# --- a database that cannot be reached ---------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening, closed: nothing answers there
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_postgres_is_a_one_line_error_that_hides_the_password():
    started = time.monotonic()
    with pytest.raises(WenmaiError) as refused:
        ReviewStore.open(f"postgresql+psycopg://curator:s3cret-pw@127.0.0.1:{closed_port()}/wenmai")
    message = str(refused.value)
    assert time.monotonic() - started < 15
    assert "\n" not in message and "s3cret-pw" not in message
    assert "curator:***@127.0.0.1" in message and "cannot open the review database" in message


def test_sqlite_file_in_a_missing_folder_is_a_one_line_error(tmp_path):
    missing = tmp_path / "no-such-folder" / "review.db"
    started = time.monotonic()
    with pytest.raises(WenmaiError) as refused:
        ReviewStore.open(missing)
    message = str(refused.value)
    assert time.monotonic() - started < 15
    assert "\n" not in message and str(missing) in message
    assert not missing.parent.exists()


# --- concurrent reviewers ----------------------------------------------------------------------------

OPEN_ON_GO = """
import sys, time
from pathlib import Path
from finetune.review.store import ReviewStore
db, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ready.touch()
deadline = time.monotonic() + 60
while not go.exists() and time.monotonic() < deadline:
    time.sleep(0.005)
ReviewStore.open(db).close()
"""


def test_processes_opening_a_new_database_at_once_all_get_the_tables(db, tmp_path):
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{n}" for n in range(4)]
    opening = [
        subprocess.Popen([sys.executable, "-c", OPEN_ON_GO, db, mark, go], stderr=subprocess.PIPE, text=True)
        for mark in ready
    ]
    try:
        deadline = time.monotonic() + 60
        while not all(mark.exists() for mark in ready) and time.monotonic() < deadline:
            time.sleep(0.01)
        go.touch()  # all imported: now they open together
        outcomes = [(p.communicate(timeout=60)[1], p.returncode) for p in opening]
    finally:
        for process in opening:
            process.kill()
    failures = [
        f"exit {code}: {[line for line in err.splitlines() if 'Error' in line][-1:]}" for err, code in outcomes if code
    ]
    assert not failures, f"opening the same new database in parallel failed: {failures}"
    store = ReviewStore.open(db)
    try:
        assert row_counts(store) == dict.fromkeys(row_counts(store), 0)
    finally:
        store.close()


WRITERS = 16  # threads, each its own reviewer, each reviewing every item once
RACERS = 4  # threads editing the same (item, reviewer) pair, so version numbers collide
ITEMS = 5
EDITS_EACH = 5
JOIN_TIMEOUT = 120  # seconds for all threads together: a hang fails the test instead of the run


def test_concurrent_writers_lose_no_review_and_number_versions_without_gaps(db):
    setup = ReviewStore.open(db)
    setup.create_session(settings())
    items = setup.add_items(SESSION, [two_answers(f"What is bronze no. {i}?") for i in range(ITEMS)])
    for n in range(WRITERS):
        setup.add_reviewer(f"w{n}")
    setup.add_reviewer("shared")
    barrier = threading.Barrier(WRITERS + RACERS, timeout=60)
    errors: list[str] = []

    def write(reviews: list[tuple[int, str, ReviewInput]]) -> None:
        try:
            own = ReviewStore.open(db)  # each thread its own store, as separate reviewers' processes would
        except BaseException:
            barrier.abort()
            errors.append(traceback.format_exc())
            return
        try:
            barrier.wait()
            for item_id, reviewer, review in reviews:
                own.submit_review(item_id, reviewer, review)
        except BaseException:
            errors.append(traceback.format_exc())
        finally:
            own.close()

    plans = [
        [
            (item.id, f"w{n}", ReviewInput(scores={"A": {"accuracy": 1 + (n + i) % 5}}, comment=f"w{n}-{i}"))
            for i, item in enumerate(items)
        ]
        for n in range(WRITERS)
    ] + [
        [(items[0].id, "shared", ReviewInput(choice="B", comment=f"racer{n}-{k}")) for k in range(EDITS_EACH)]
        for n in range(RACERS)
    ]
    threads = [
        threading.Thread(target=write, args=(plan,), name=f"writer-{n}", daemon=True) for n, plan in enumerate(plans)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    try:
        assert not stuck, f"threads still writing after {JOIN_TIMEOUT} s: {stuck}"
        assert not errors, "\n".join(errors)
        assert setup.count_reviews() == WRITERS * ITEMS + RACERS * EDITS_EACH
        for n in range(WRITERS):
            for i, item in enumerate(items):
                [review] = setup.history(item.id, f"w{n}")
                assert (review.version, review.comment, review.scores) == (
                    1,
                    f"w{n}-{i}",
                    {"A": {"accuracy": 1 + (n + i) % 5}},
                )
        raced = setup.history(items[0].id, "shared")
        assert [r.version for r in raced] == list(range(1, RACERS * EDITS_EACH + 1))
        assert sorted(r.comment for r in raced) == sorted(
            f"racer{n}-{k}" for n in range(RACERS) for k in range(EDITS_EACH)
        )
        newest = [r for r in setup.latest_reviews(SESSION) if r.reviewer == "shared"]
        assert [r.version for r in newest] == [RACERS * EDITS_EACH]
    finally:
        setup.close()


def test_the_migrations_create_exactly_the_tables_the_models_declare(tmp_path):
    """Editing tables.py without a new Alembic revision fails here."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from finetune.review.tables import Base

    store = ReviewStore.open(tmp_path / "m.db")
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    store.close()
    assert differences == []


# --- assignments ---------------------------------------------------------------------------------


def test_each_item_goes_to_k_reviewers_and_a_reviewer_keeps_their_unfinished_item(store):
    store.create_session(settings().model_copy(update={"reviewers_per_item": 2}))
    first, second = store.add_items(SESSION, [one_answer("What is a gu?"), one_answer("What is a jue?")])
    for who in ("r1", "r2", "r3"):
        store.add_reviewer(who)
    assert store.next_item(SESSION, "r1").id == first.id
    assert store.next_item(SESSION, "r1").id == first.id  # not reviewed yet: the same item again
    assert store.next_item(SESSION, "r2").id == second.id  # fewest reviewers first
    assert store.next_item(SESSION, "r3").id == first.id
    assert store.progress(SESSION, "r1") == (0, 2)
    store.submit_review(first.id, "r1", ReviewInput(scores={"A": {"accuracy": 4}}))
    assert store.progress(SESSION, "r1") == (1, 2)
    assert store.next_item(SESSION, "r1").id == second.id
    store.submit_review(second.id, "r1", ReviewInput(scores={"A": {"accuracy": 3}}))
    store.submit_review(first.id, "r3", ReviewInput(scores={"A": {"accuracy": 4}}))
    assert store.next_item(SESSION, "r3") is None  # the second item has its K = 2 reviewers (r2, r1)
    assert store.progress(SESSION, "r3") == (1, 1)
    assert store.is_assigned(first.id, "r3") and not store.is_assigned(second.id, "r3")
    assert store.latest_review(first.id, "r3").scores == {"A": {"accuracy": 4}}
    assert store.session_progress(SESSION) == [
        {"reviewer": "r1", "assigned": 2, "reviewed": 2},
        {"reviewer": "r2", "assigned": 1, "reviewed": 0},
        {"reviewer": "r3", "assigned": 1, "reviewed": 1},
    ]


def test_concurrent_reviewers_never_push_an_item_past_k(db):
    """12 reviewers take items and review them at once; every item ends with exactly K = 3 reviews."""
    setup = ReviewStore.open(db)
    setup.create_session(settings().model_copy(update={"reviewers_per_item": 3}))
    setup.add_items(SESSION, [one_answer(f"Question {i}") for i in range(8)])
    reviewers = [f"r{i}" for i in range(12)]
    for who in reviewers:
        setup.add_reviewer(who)
    errors: list[str] = []

    def work(who: str) -> None:
        store = ReviewStore.open(db)
        try:
            for _ in range(20):  # bounded: 8 items, each reviewer can do at most 8
                item = store.next_item(SESSION, who)
                if item is None:
                    return
                store.submit_review(item.id, who, ReviewInput(scores={"A": {"accuracy": 3}}))
        except Exception:  # noqa: BLE001 - reported by the test
            errors.append(traceback.format_exc())
        finally:
            store.close()

    threads = [threading.Thread(target=work, args=(who,), daemon=True) for who in reviewers]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a reviewer thread did not finish in 120 s"
    assert errors == []
    per_item: dict[int, int] = {}
    for review in setup.latest_reviews(SESSION):
        per_item[review.item_id] = per_item.get(review.item_id, 0) + 1
    setup.close()
    assert sorted(per_item.values()) == [3] * 8
