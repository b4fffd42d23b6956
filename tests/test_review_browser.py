"""The review app in a real browser (Selenium + Debian's chromium and chromium-driver) and under load (20 simulated
reviewers over HTTP on loopback): what curators do in the pages comes out of the export exactly."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from finetune import reviewing
from finetune.recipe.review import ReviewCleaning
from finetune.review.accounts import add_user
from finetune.review.schema import Dimension, NewAnswer, NewItem, SessionSettings
from finetune.review.store import ReviewStore
from finetune.review_app.app import create_app

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "bench"))
from review_app import populate, running_app, simulate  # noqa: E402

CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
PASSWORDS = {"curator-1": "curator-one-pw", "curator-2": "curator-two-pw"}


def no_browser() -> str | None:
    if CHROMEDRIVER and CHROMIUM:
        return None
    return "Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)"


@pytest.fixture
def browser_db(tmp_path) -> str:
    db = str(tmp_path / "review.db")
    store = ReviewStore.open(db)
    store.create_session(
        SessionSettings(
            name="bronzes",
            institution="上海博物馆",
            licence="CC-BY-4.0",
            rights_holder="上海博物馆",
            dimensions=[
                Dimension(name="accuracy", description="事实与馆藏档案一致"),
                Dimension(name="safety", description="不含有害或冒犯的内容"),
            ],
            reviewers_per_item=2,
        ),
        [
            NewItem(key="ding", prompt="大克鼎是哪个朝代的？", answers=[NewAnswer(text="西周晚期。", model="run-1")]),
            NewItem(
                key="zun",
                prompt="四羊方尊出土于哪里？",
                answers=[NewAnswer(text="湖南宁乡。", model="run-1"), NewAnswer(text="河南安阳。", model="run-2")],
            ),
        ],
    )
    for name, password in PASSWORDS.items():
        add_user(store, name, password)
    store.close()
    return db


@pytest.fixture
def driver():
    reason = no_browser()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1400"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    yield browser
    browser.quit()


def sign_in(browser, base: str, name: str) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(f"{base}/login")
    browser.find_element(By.NAME, "pseudonym").send_keys(name)
    browser.find_element(By.NAME, "password").send_keys(PASSWORDS[name])
    submit_and_wait(browser, browser.find_element(By.CSS_SELECTOR, "form button[type=submit]"))


def review_next(browser, base: str, scores: dict[str, dict[str, int]], **fields) -> str:
    """Open the next item, click the scores (and choice, correction, comment), submit; returns the prompt shown."""
    from selenium.webdriver.common.by import By

    browser.get(f"{base}/s/bronzes/next")
    prompt = browser.find_element(By.CSS_SELECTOR, "[data-role=prompt]").text
    for label, dims in scores.items():
        for dim, value in dims.items():
            browser.find_element(By.CSS_SELECTOR, f'input[name="score.{label}.{dim}"][value="{value}"]').click()
    if "choice" in fields:
        browser.find_element(By.CSS_SELECTOR, f'input[name="choice"][value="{fields["choice"]}"]').click()
    if "corrected_answer" in fields:
        browser.find_element(By.NAME, "corrected_answer").send_keys(fields["corrected_answer"])
    if "comment" in fields:
        browser.find_element(By.NAME, "comment").send_keys(fields["comment"])
    submit_and_wait(browser, browser.find_element(By.CSS_SELECTOR, "form#review button[type=submit]"))
    return prompt


def submit_and_wait(browser, button) -> None:
    """Click a submit button and wait until the next page replaced this one (redirects and cookies settled)."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    button.click()
    WebDriverWait(browser, 20).until(expected_conditions.staleness_of(button))


def test_two_curators_review_in_the_browser_and_the_export_holds_exactly_their_rows(driver, browser_db, tmp_path):
    from selenium.webdriver.common.by import By

    with running_app(create_app(browser_db)) as base:
        sign_in(driver, base, "curator-1")
        assert "大克鼎是哪个朝代的？" in review_next(
            driver, base, {"A": {"accuracy": 5, "safety": 4}}, corrected_answer="西周晚期（约公元前9世纪）。"
        )
        assert "四羊方尊" in review_next(
            driver, base, {"A": {"accuracy": 5, "safety": 5}, "B": {"accuracy": 1, "safety": 5}}, choice="A"
        )
        sign_in(driver, base, "curator-2")
        review_next(driver, base, {"A": {"accuracy": 4, "safety": 4}}, comment="<b>好</b>")
        review_next(driver, base, {"A": {"accuracy": 4, "safety": 5}, "B": {"accuracy": 2, "safety": 4}}, choice="A")
        driver.get(f"{base}/")
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang").startswith("zh")
        screenshot = Path(os.environ.get("WENMAI_SCREENSHOTS", tmp_path)) / "review-app.png"
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        driver.get(f"{base}/s/bronzes/item/2")  # curator-2's own A/B item, their review prefilled
        driver.save_screenshot(str(screenshot))
        assert screenshot.stat().st_size > 10_000

    done = reviewing.export(browser_db, "bronzes", tmp_path / "out", ReviewCleaning(calibrate=False), log=print)
    ratings = [json.loads(line) for line in done.files["ratings"].read_text(encoding="utf-8").splitlines()]
    assert sorted((r["rater"], r["prompt"][:4], r["response"], r["scores"]["accuracy"]) for r in ratings) == sorted(
        [
            ("curator-1", "大克鼎是", "西周晚期。", 5),
            ("curator-1", "四羊方尊", "湖南宁乡。", 5),
            ("curator-1", "四羊方尊", "河南安阳。", 1),
            ("curator-2", "大克鼎是", "西周晚期。", 4),
            ("curator-2", "四羊方尊", "湖南宁乡。", 4),
            ("curator-2", "四羊方尊", "河南安阳。", 2),
        ]
    )
    assert next(r for r in ratings if r["rater"] == "curator-2" and r["prompt"].startswith("大克鼎"))["comment"] == (
        "<b>好</b>"
    )
    [pair] = [json.loads(line) for line in done.files["pairs"].read_text(encoding="utf-8").splitlines()]
    assert (pair["chosen"], pair["rejected"], pair["raters"]) == (
        "湖南宁乡。",
        "河南安阳。",
        ["curator-1", "curator-2"],
    )
    [chat] = [json.loads(line) for line in done.files["chat"].read_text(encoding="utf-8").splitlines()]
    assert chat["messages"][-1]["content"] == "西周晚期（约公元前9世纪）。" and chat["rater"] == "curator-1"


def test_twenty_reviewers_at_once_lose_no_score(tmp_path):
    db = str(tmp_path / "load.db")
    session, names = populate(db, reviewers=20, items=30, k=2)
    with running_app(create_app(db)) as base:
        result = asyncio.run(asyncio.wait_for(simulate(base, session, names, per_reviewer=3), timeout=240))
    assert result["errors"] == []
    store = ReviewStore.open(db)
    stored = {(r.reviewer, r.item_id) for r in store.latest_reviews(session)}
    per_item: dict[int, int] = {}
    for _, item_id in stored:
        per_item[item_id] = per_item.get(item_id, 0) + 1
    store.close()
    assert len(result["accepted"]) == 60 and set(result["accepted"]) == stored
    assert max(per_item.values()) <= 2  # no item past K
