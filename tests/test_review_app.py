"""The curator review app: sign-in is required and rate-limited, reviewers see and change only their own
assignments, forms need their CSRF token, bad scores store nothing, text is kept verbatim and shown escaped, a
review posted through the form comes out of the export, admins follow agreement and export, and every UI text is
in the Chinese catalogue."""

from __future__ import annotations

import io
import json
import re
import zipfile

import pytest
from starlette.testclient import TestClient

from finetune import reviewing
from finetune.review.accounts import add_user
from finetune.review.schema import FLAGS, Dimension, NewAnswer, NewItem, ReviewInput, SessionSettings
from finetune.review.store import ReviewStore
from finetune.review_app import create_app, serve
from finetune.review_app.forms import FLAG_LABELS
from finetune.review_app.i18n import catalogue, extract_messages, placeholders
from finetune.review_app.ratelimit import RateLimiter

SESSION = "bronzes-r1"
PASSWORD = "correct horse battery"
DIMENSIONS = [
    Dimension(name="accuracy", description="Dates, places and names are right"),
    Dimension(name="clarity", description="A visitor understands it on first reading"),
]
NASTY = "<script>alert(1)</script>' OR 1=1; DROP TABLE reviews; --"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path) -> str:
    """A store with one session (K=2): three A/B items and one single-answer item; reviewers r1, r2, admin a1."""
    path = str(tmp_path / "review.db")
    store = ReviewStore.open(path)
    pair = [NewAnswer(text="Cast in the Shang dynasty.", model="run-a"), NewAnswer(text="Song dynasty.", model="run-b")]
    items = [NewItem(key=f"p{i}", prompt=f"When was bronze {i} cast?", answers=pair) for i in range(3)]
    items.append(NewItem(key="p3", prompt="Describe the ding.", system="You are a museum guide.", answers=pair[:1]))
    settings = SessionSettings(
        name=SESSION, institution="Provincial Museum", licence="CC-BY-4.0", dimensions=DIMENSIONS, reviewers_per_item=2
    )
    store.create_session(settings, items)
    add_user(store, "r1", PASSWORD)
    add_user(store, "r2", PASSWORD)
    add_user(store, "a1", PASSWORD, role="admin")
    store.close()
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def app(db, tmp_path, clock):
    app = create_app(
        db, secret_key="test-secret", export_dir=tmp_path / "exports", rate_limiter=RateLimiter(clock=clock)
    )
    yield app
    app.state.review.store.close()


@pytest.fixture
def store(app) -> ReviewStore:
    return app.state.review.store


def client_for(app, address: str = "testclient") -> TestClient:
    return TestClient(app, follow_redirects=False, client=(address, 50000))


def csrf_of(html: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


def sign_in(client: TestClient, pseudonym: str, password: str = PASSWORD):
    token = csrf_of(client.get("/login").text)
    return client.post("/login", data={"csrf": token, "pseudonym": pseudonym, "password": password})


def signed_in(app, pseudonym: str) -> TestClient:
    client = client_for(app)
    assert sign_in(client, pseudonym).status_code == 303
    return client


def next_item_id(client: TestClient) -> int:
    response = client.get(f"/s/{SESSION}/next")
    assert response.status_code == 303, response.text
    return int(response.headers["location"].rsplit("/", 1)[1])


def item_url(item_id: int) -> str:
    return f"/s/{SESSION}/item/{item_id}"


def post_review(client: TestClient, item_id: int, fields: dict, csrf: str | None = "from-page"):
    data = dict(fields)
    if csrf == "from-page":
        data["csrf"] = csrf_of(client.get(item_url(item_id)).text)
    elif csrf is not None:
        data["csrf"] = csrf
    return client.post(item_url(item_id), data=data)


def assign_until(store: ReviewStore, reviewer: str, item_id: int) -> None:
    """Give `reviewer` items (reviewing each through the store) until `item_id` is assigned to them."""
    for _ in range(10):
        if store.is_assigned(item_id, reviewer):
            return
        item = store.next_item(SESSION, reviewer)
        if item.id == item_id:
            return
        store.submit_review(item.id, reviewer, ReviewInput(scores={"A": {"accuracy": 3}}))
    raise AssertionError(f"{item_id} never assigned to {reviewer}")


def test_pages_need_sign_in_and_posts_answer_401(app, store):
    client = client_for(app)
    for page in ("/", "/admin", f"/s/{SESSION}/next"):
        response = client.get(page)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), page
    item_id = store.items(SESSION)[0].id
    response = client.post(item_url(item_id), data={"score.A.accuracy": "4"})
    assert response.status_code == 401
    assert store.count_reviews() == 0


def test_wrong_password_shows_an_error_and_signs_nobody_in(app):
    client = client_for(app)
    response = sign_in(client, "r1", "not the password")
    assert response.status_code == 200
    assert "化名或密码不正确" in response.text
    assert client.get("/").status_code == 303


def test_right_password_signs_in_and_comes_back_to_the_page_asked_for(app):
    client = client_for(app)
    asked = client.get(f"/s/{SESSION}/next")
    login_page = client.get(asked.headers["location"])
    token = csrf_of(login_page.text)
    response = client.post("/login", data={"csrf": token, "pseudonym": "r1", "password": PASSWORD, "next": "/admin"})
    assert response.status_code == 303 and response.headers["location"] == "/admin"
    home = client.get("/")
    assert home.status_code == 200 and SESSION in home.text and "r1" in home.text
    again = {"pseudonym": "r1", "password": PASSWORD, "next": "//evil.example/"}
    assert client.post("/login", data={"csrf": token, **again}).status_code == 403  # signing in made a new token
    off_site = client.post("/login", data={"csrf": csrf_of(client.get("/login").text), **again})
    assert off_site.status_code == 303 and off_site.headers["location"] == "/"


def test_disabled_account_is_signed_out_at_once(app, store):
    r1 = signed_in(app, "r1")
    assert r1.get("/").status_code == 200
    store.set_active("r1", False)
    assert r1.get("/").status_code == 303
    assert sign_in(client_for(app, "10.0.0.9"), "r1").status_code == 200  # refused, with the error page


def test_sign_in_form_without_its_csrf_token_is_refused(app):
    client = client_for(app)
    client.get("/login")
    response = client.post("/login", data={"pseudonym": "r1", "password": PASSWORD})
    assert response.status_code == 403
    assert client.get("/").status_code == 303


def test_sixth_failed_sign_in_is_refused_even_with_the_right_password_until_the_lock_expires(app, clock):
    client = client_for(app, "10.0.0.1")
    for _ in range(5):
        assert sign_in(client, "r1", "wrong password").status_code == 200
    locked = sign_in(client, "r1", "wrong password")
    assert locked.status_code == 429
    assert 0 < int(locked.headers["Retry-After"]) <= 300
    assert "登录失败次数过多" in locked.text
    assert sign_in(client, "r1").status_code == 429  # the right password, still locked
    assert sign_in(client_for(app, "10.0.0.2"), "r1").status_code == 429  # per pseudonym, from anywhere
    assert sign_in(client, "r2").status_code == 429  # per address, whoever signs in
    clock.now += 301
    assert sign_in(client, "r1").status_code == 303


def test_rate_limiter_forgets_failures_after_the_window(clock):
    limiter = RateLimiter(max_failures=2, window_s=60, clock=clock)
    limiter.failed(["a"])
    clock.now += 30
    limiter.failed(["a"])
    assert limiter.retry_after(["a", "b"]) == pytest.approx(30)
    clock.now += 31
    assert limiter.retry_after(["a"]) is None


def test_reviewer_cannot_open_or_post_an_item_assigned_to_someone_else(app, store):
    r1, r2 = signed_in(app, "r1"), signed_in(app, "r2")
    item_id = next_item_id(r1)
    assert r1.get(item_url(item_id)).status_code == 200
    assert next_item_id(r2) != item_id
    assert r2.get(item_url(item_id)).status_code == 403
    token = csrf_of(r2.get("/").text)
    response = r2.post(item_url(item_id), data={"csrf": token, "score.A.accuracy": "4"})
    assert response.status_code == 403
    assert store.count_reviews() == 0
    assert r1.get(item_url(999_999)).status_code == 404
    assert r1.get(f"/s/no-such-session/item/{item_id}").status_code == 404


def test_reviewer_never_sees_another_reviewers_judgement(app, store):
    r1, r2 = signed_in(app, "r1"), signed_in(app, "r2")
    item_id = next_item_id(r1)
    fields = {"score.A.accuracy": "2", "score.B.clarity": "5", "choice": "B", "flag": "sensitive"}
    fields |= {"comment": "R1-ONLY-COMMENT", "corrected_answer": "R1-ONLY-CORRECTION"}
    assert post_review(r1, item_id, fields).status_code == 303
    assign_until(store, "r2", item_id)
    page = r2.get(item_url(item_id))
    assert page.status_code == 200
    assert "R1-ONLY-COMMENT" not in page.text and "R1-ONLY-CORRECTION" not in page.text
    checked = re.findall(r"<input[^>]*\bchecked\b[^>]*>", page.text)
    assert checked == ['<input type="radio" name="choice" value="" checked>']  # only "no choice", nothing of r1's
    own = r1.get(item_url(item_id)).text  # r1 sees their own version prefilled
    assert "R1-ONLY-COMMENT" in own and 'name="score.B.clarity" value="5" checked' in own


def test_review_without_or_with_a_wrong_csrf_token_stores_nothing(app, store):
    r1 = signed_in(app, "r1")
    item_id = next_item_id(r1)
    fields = {"score.A.accuracy": "4", "choice": "A"}
    assert post_review(r1, item_id, fields, csrf=None).status_code == 403
    assert post_review(r1, item_id, fields, csrf="forged-token").status_code == 403
    assert post_review(r1, item_id, fields, csrf="非ASCII").status_code == 403
    assert store.count_reviews() == 0
    assert r1.post("/logout", data={}).status_code == 403


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("score.A.accuracy", "7", "scores.A.accuracy"),
        ("score.A.accuracy", "four", "score.A.accuracy"),
        ("score.A.beauty", "3", "scores.A.beauty"),
        ("score.C.accuracy", "3", "scores.C"),
        ("score.A", "3", "score.A"),
        ("choice", "C", "choice"),
        ("flag", "lovely", "flag"),
    ],
)
def test_bad_field_is_400_naming_it_and_stores_nothing(app, store, field, value, named):
    r1 = signed_in(app, "r1")
    item_id = next_item_id(r1)
    response = post_review(r1, item_id, {field: value, "score.B.clarity": "4", "comment": "kept after the error"})
    assert response.status_code == 400
    assert named in response.text
    assert "kept after the error" in response.text  # the form comes back with what was typed
    assert store.count_reviews() == 0


def test_html_and_sql_metacharacters_are_stored_verbatim_and_shown_escaped(app, store):
    r1 = signed_in(app, "r1")
    item_id = next_item_id(r1)
    assert post_review(r1, item_id, {"score.A.accuracy": "3", "comment": NASTY}).status_code == 303
    [review] = store.latest_reviews(SESSION)
    assert review.comment == NASTY
    page = r1.get(item_url(item_id)).text
    assert "<script>alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert store.count_reviews() == 1  # the DROP TABLE did nothing


def test_review_posted_through_the_form_comes_out_of_the_export(app, store, db, tmp_path):
    r1 = signed_in(app, "r1")
    item_id = next_item_id(r1)
    item = store.item(item_id)
    fields = {
        "score.A.accuracy": "5",
        "score.A.clarity": "4",
        "score.B.accuracy": "2",
        "score.B.clarity": "3",
        "choice": "A",
        "corrected_answer": "Cast in the late Shang dynasty,\r\nabout 1200 BCE.",
        "comment": "B confuses the dynasties",
    }
    assert post_review(r1, item_id, fields).status_code == 303
    flagged = next_item_id(r1)
    flags = {"score.A.accuracy": "1", "flag": ["factual_error", "sensitive", "rights_problem"]}
    assert post_review(r1, flagged, flags).status_code == 303
    assert store.latest_review(flagged, "r1").flags == ["factual_error", "sensitive", "rights_problem"]

    written = reviewing.export(db, SESSION, tmp_path / "out", log=lambda _line: None)
    rows = {kind: [json.loads(line) for line in path.read_text().splitlines()] for kind, path in written.files.items()}
    assert written.held_back >= 1  # the flagged item waits for a curator
    ratings = {r["response"]: r for r in rows["ratings"]}
    assert ratings[item.answers[0].text]["scores"] == {"accuracy": 5, "clarity": 4}
    assert ratings[item.answers[1].text]["scores"] == {"accuracy": 2, "clarity": 3}
    assert ratings[item.answers[0].text]["rater"] == "r1"
    assert ratings[item.answers[0].text]["comment"] == "B confuses the dynasties"
    assert len(rows["ratings"]) == 2
    [pair] = rows["pairs"]
    assert (pair["chosen"], pair["rejected"], pair["margin"]) == (item.answers[0].text, item.answers[1].text, 1.0)
    [chat] = rows["chat"]
    assert chat["messages"] == [
        {"role": "user", "content": item.prompt},
        {"role": "assistant", "content": "Cast in the late Shang dynasty,\nabout 1200 BCE."},
    ]


def test_progress_moves_after_a_review(app):
    r1 = signed_in(app, "r1")
    assert "0 / 4" in r1.get("/").text
    item_id = next_item_id(r1)
    assert "进度：0 / 4" in r1.get(item_url(item_id)).text
    assert post_review(r1, item_id, {"score.A.accuracy": "4"}).status_code == 303
    assert "进度：1 / 4" in r1.get(item_url(next_item_id(r1))).text
    assert "1 / 4" in r1.get("/").text


def test_next_item_never_gives_an_item_to_more_than_k_reviewers(app, store):
    r1 = signed_in(app, "r1")
    first = next_item_id(r1)
    assign_until(store, "r2", first)  # now r1 and r2 have it: K = 2
    add_user(store, "r3", PASSWORD)
    r3 = signed_in(app, "r3")
    given = []
    for _ in range(5):
        response = r3.get(f"/s/{SESSION}/next")
        if response.status_code == 200:
            assert "已没有需要您评审的条目" in response.text
            break
        given.append(int(response.headers["location"].rsplit("/", 1)[1]))
        assert post_review(r3, given[-1], {"score.A.clarity": "3"}).status_code == 303
    assert first not in given and len(given) == 3
    assert r3.get(item_url(first)).status_code == 403


def test_admin_page_is_for_admins_and_shows_agreement_and_export(app, store):
    r1 = signed_in(app, "r1")
    assert r1.get("/admin").status_code == 403
    for item in store.items(SESSION):
        for who, score in (("r1", 4), ("r2", 5)):
            assign_until(store, who, item.id)
            store.submit_review(item.id, who, ReviewInput(scores={"A": {"accuracy": score, "clarity": score - 1}}))
    page = signed_in(app, "a1").get("/admin")
    assert page.status_code == 200
    agreement = page.text.split("各维度的一致性", 1)[1].split("</table>", 1)[0]
    assert '<th scope="row">accuracy</th>' in agreement and '<th scope="row">clarity</th>' in agreement
    assert "Krippendorff" in agreement
    assert f'action="/admin/export/{SESSION}"' in page.text and "导出" in page.text
    assert '<th scope="row">r2</th><td>4</td><td>4</td>' in page.text  # assigned, reviewed


def test_admin_export_writes_the_folder_and_the_zip_downloads(app, store, tmp_path):
    r1 = signed_in(app, "r1")
    item_id = next_item_id(r1)
    assert (
        post_review(r1, item_id, {"score.A.accuracy": "4", "score.B.accuracy": "2", "choice": "A"}).status_code == 303
    )
    a1 = signed_in(app, "a1")
    assert a1.post(f"/admin/export/{SESSION}", data={}).status_code == 403
    assert r1.post(f"/admin/export/{SESSION}", data={"csrf": csrf_of(r1.get("/").text)}).status_code == 403
    page = a1.post(f"/admin/export/{SESSION}", data={"csrf": csrf_of(a1.get("/admin").text)})
    assert page.status_code == 200
    [folder] = (tmp_path / "exports").iterdir()
    assert folder.name.startswith(f"{SESSION}-") and (folder / "ratings.jsonl").is_file()
    assert "ratings.jsonl" in page.text and "cleaning_report.md" in page.text
    download = a1.get(f"/admin/exports/{folder.name}.zip")
    assert download.status_code == 200 and download.headers["content-type"] == "application/zip"
    names = zipfile.ZipFile(io.BytesIO(download.content)).namelist()
    assert f"{folder.name}/ratings.jsonl" in names and f"{folder.name}/pairs.jsonl" in names
    assert r1.get(f"/admin/exports/{folder.name}.zip").status_code == 403
    (tmp_path / "exports" / ".half-written").mkdir()
    for name in ("..", ".half-written", "no-such-export", "..%2F..%2Fetc"):
        assert a1.get(f"/admin/exports/{name}.zip").status_code == 404, name


def test_pages_are_chinese_by_default_and_english_on_request(app):
    client = client_for(app)
    page = client.get("/login")
    assert '<html lang="zh-CN">' in page.text and "登录" in page.text
    switched = client.get("/lang/en", headers={"referer": "http://testserver/login?next=%2F"})
    assert switched.status_code == 303 and switched.headers["location"] == "/login?next=%2F"
    page = client.get("/login")
    assert '<html lang="en">' in page.text and "Sign in" in page.text and "登录" not in page.text
    assert client.get("/lang/en", headers={"referer": "https://evil.example/x"}).headers["location"] == "/"
    assert client.get("/lang/fr").status_code == 404


def test_every_ui_message_has_a_chinese_translation():
    messages = extract_messages()
    assert "Submit" in messages and "Too many failed sign-ins: signing in is locked for %(minutes)d min." in messages
    zh = catalogue("zh")
    untranslated = sorted(m for m in messages if m not in zh or not zh[m].string)
    assert not untranslated, f"add these to locale/zh_CN/LC_MESSAGES/messages.po: {untranslated}"
    broken = sorted(m for m in messages if placeholders(zh[m].string) != placeholders(m))
    assert not broken, f"translations that change the %(...)s placeholders: {broken}"
    assert set(FLAG_LABELS) == set(FLAGS)


def test_every_response_carries_the_security_headers(app):
    client = client_for(app)
    for path in ("/login", "/", "/no-such-page", "/static/review.js", "/static/review.css"):
        headers = client.get(path).headers
        assert headers["content-security-policy"] == "default-src 'self'", path
        assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff", path
        assert headers["referrer-policy"] == "same-origin", path
    cookie = client_for(app).get("/login").headers["set-cookie"]
    assert cookie.startswith("wenmai_review=") and "samesite=strict" in cookie.lower() and "httponly" in cookie.lower()


def test_review_page_shows_the_rubric_the_answers_and_the_shortcut_legend(app, store):
    r1 = signed_in(app, "r1")
    single = next(i for i in store.items(SESSION) if len(i.answers) == 1)
    assign_until(store, "r1", single.id)
    page = r1.get(item_url(single.id)).text
    assert "You are a museum guide." in page and "Describe the ding." in page
    assert "Dates, places and names are right" in page and "键盘快捷键" in page
    assert 'name="choice"' not in page  # one answer: nothing to choose between
    assert '<script src="/static/review.js" defer></script>' in page and "<script>" not in page
    for text in ("事实错误", "敏感内容", "版权问题", "更正后的回答", "备注", "提交"):
        assert text in page


@pytest.mark.parametrize(("host", "warned"), [("127.0.0.1", False), ("localhost", False), ("0.0.0.0", True)])
def test_serve_warns_when_it_listens_beyond_this_machine(db, tmp_path, monkeypatch, capsys, host, warned):
    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: ran.update(options, app=app))
    serve(db, host=host, port=8799, export_dir=tmp_path / "exports", secure_cookies=warned)
    assert (ran["host"], ran["port"]) == (host, 8799)
    assert ("TLS proxy" in capsys.readouterr().err) is warned
    ran["app"].state.review.store.close()
