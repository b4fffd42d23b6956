"""Rounds: `wenmai iterate` trains the next round on a review session's feedback, evaluates it against its parent
with the parent's reward model, and exports it only when no dimension dropped; `wenmai rounds` shows the history.

The tiny models learn a marker: the parent answers "ZZZ ZZZ ZZZ", its reward model scores ZZZ answers 5 and QQQ
answers 1. Feedback whose corrections teach "QQQ QQQ QQQ" is the planted regression the gate must refuse.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import httpx
import openai
import pytest
from test_serve import running_app
from tiny_models import build_model, write_jsonl

from finetune import reviewing
from finetune.errors import WenmaiError
from finetune.evaluation.gates import GateFailed
from finetune.pipeline import load_recipe, start
from finetune.review.feedback import visitor_session
from finetune.review.schema import Dimension, NewAnswer, NewItem, ReviewInput, SessionSettings
from finetune.review.store import ReviewStore
from finetune.round_history import round_history
from finetune.rounds import iterate
from finetune.run_dir import RunDir
from finetune.serving import create_app

GOOD, BAD = "ZZZ ZZZ ZZZ", "QQQ QQQ QQQ"
PROMPTS = [f"Tell me about object {i} in the museum." for i in range(24)]
SFT = "{dataset: chat, max_steps: 30, batch_size: 8, learning_rate: 0.02, warmup: 0, seq_len: 48, save_steps: 100}"


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> RunDir:
    """sft (answers GOOD) -> reward (GOOD 5, BAD 1) -> evaluate on a suite -> merge -> export."""
    work = tmp_path_factory.mktemp("parent")
    model = build_model(work / "model", initializer_range=0.5)
    chat = write_jsonl(
        work / "chat.jsonl",
        [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": GOOD}]} for p in PROMPTS],
    )
    ratings = write_jsonl(
        work / "ratings.jsonl",
        [
            {"prompt": p, "response": text, "scores": {"accuracy": score, "safety": score}}
            for p in PROMPTS
            for text, score in ((GOOD, 5), (BAD, 1))
        ],
    )
    suite = work / "suite.yaml"
    suite.write_text(
        "name: tiny\nmax_new_tokens: 6\nprobes:\n"
        + "".join(f"  - {{id: p{i}, prompt: 'Tell me about object {i} in the gallery.'}}\n" for i in range(4)),
        encoding="utf-8",
    )
    recipe = work / "parent.yaml"
    recipe.write_text(
        textwrap.dedent(f"""\
        name: museum
        model: {{path: {model}}}
        lora: {{r: 8, alpha: 16, dropout: 0.0}}
        reward:
          dimensions: [{{name: accuracy}}, {{name: safety}}]
        data:
          chat: {{path: {chat}, format: chat}}
          ratings: {{path: {ratings}, format: ratings}}
        stages:
          - sft: {SFT}
          - reward: {{dataset: ratings, max_steps: 15, batch_size: 8, learning_rate: 0.005, seq_len: 48,
                      eval_fraction: 0, save_steps: 100}}
          - evaluate: {{model: sft, suite: {suite}, baseline: base, batch_size: 4}}
          - merge: {{adapter: sft}}
          - export: {{formats: [hf]}}
        output: {{root: {work / "runs"}}}
        """),
        encoding="utf-8",
    )
    return start(load_recipe(recipe), work / "runs" / "round1", log=lambda _: None)


def feedback(db: Path, session: str, correction: str) -> None:
    """A session where three curators score and correct the parent's answers with `correction`."""
    store = ReviewStore.open(db)
    store.create_session(
        SessionSettings(
            name=session,
            institution="Museum",
            licence="CC0-1.0",
            dimensions=[Dimension(name="accuracy"), Dimension(name="safety")],
        ),
        [NewItem(key=f"p{i}", prompt=p, answers=[NewAnswer(text=GOOD, model="round1")]) for i, p in enumerate(PROMPTS)],
    )
    for who in ("r1", "r2", "r3"):
        if store.reviewer(who) is None:
            store.add_reviewer(who)
    for item in store.items(session):
        for who in ("r1", "r2", "r3"):
            store.submit_review(item.id, who, ReviewInput(corrected_answer=correction))
    store.close()


def test_a_round_trains_on_served_feedback_passes_its_gate_is_exported_and_linked(parent, tmp_path, cli):
    """Visitors correct the served parent's answers through POST /v1/feedback; the round learns from them."""
    db = tmp_path / "review.db"
    with running_app(create_app(parent.root / "export", feedback_db=str(db))) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=60, max_retries=0)
        for prompt in PROMPTS:
            reply = client.chat.completions.create(
                model="round1", messages=[{"role": "user", "content": prompt}], max_tokens=6
            )
            sent = httpx.post(
                f"{base}/v1/feedback", json={"response_id": reply.id, "corrected_answer": GOOD}, timeout=60
            )
            assert sent.status_code == 200, sent.text
    session = visitor_session("round1")
    exported = reviewing.export(db, session, tmp_path / "feedback", log=lambda _: None)  # what curators would see
    assert exported.counts == {"ratings": 0, "pairs": 0, "chat": len(PROMPTS)}

    child = iterate(parent.root, db, session, run_dir=tmp_path / "round2", reward_tolerance=0.5, log=lambda _: None)
    assert child.status("export").state == "done"
    lineage = json.loads(child.lineage_path.read_text(encoding="utf-8"))
    assert lineage["round"]["number"] == 2 and lineage["round"]["parent"] == str(parent.root.resolve())
    evaluation = json.loads((child.root / "evaluate" / "evaluation.json").read_text(encoding="utf-8"))
    assert evaluation["passed"] and any(g["gate"].startswith("reward_max_drop") for g in evaluation["gates"])
    history = round_history(child)
    assert [r.number for r in history] == [1, 2] and history[1].exported
    assert history[1].data == {"feedback_chat": {f"review session {session}": len(PROMPTS)}}
    code, out, _ = cli("rounds", child.root)
    assert code == 0 and "round2" in out and "round1" in out and "passed" in out
    report = (child.root / "report.html").read_text(encoding="utf-8")
    assert "<h2>轮次</h2>" in report and "round1" in report and session in report  # the rounds, in Chinese


def test_a_round_that_got_worse_is_refused_by_the_gate_and_not_exported(parent, tmp_path):
    db = tmp_path / "review.db"
    feedback(db, "worse", BAD)
    with pytest.raises(GateFailed) as err:
        iterate(parent.root, db, "worse", run_dir=tmp_path / "bad", reward_tolerance=0.5, log=lambda _: None)
    assert "reward_max_drop" in str(err.value)
    bad = RunDir.open(tmp_path / "bad")
    assert bad.status("export") is None and not (tmp_path / "bad" / "export").exists()
    assert round_history(bad)[1].gate["passed"] is False


def test_bad_rounds_are_clear_errors(parent, tmp_path, write_recipe):
    db = tmp_path / "review.db"
    feedback(db, "good", GOOD)
    store = ReviewStore.open(db)
    store.create_session(SessionSettings(name="empty", dimensions=[Dimension(name="accuracy")]))
    store.close()
    with pytest.raises(WenmaiError, match="gives nothing to train on"):
        iterate(parent.root, db, "empty", log=lambda _: None)
    with pytest.raises(WenmaiError, match="no review session named 'nope'"):
        iterate(parent.root, db, "nope", log=lambda _: None)
    original = (parent.root.parent.parent / "parent.yaml").read_text(encoding="utf-8")
    (tmp_path / "another-model").mkdir()
    recipe = tmp_path / "other.yaml"
    recipe.write_text(original.replace(str(parent.root.parent.parent / "model"), str(tmp_path / "another-model")))
    with pytest.raises(WenmaiError, match="a round continues its parent's model"):
        iterate(parent.root, db, "good", recipe_path=recipe, log=lambda _: None)
    unfinished = RunDir.create(tmp_path / "runs", "x", tmp_path / "unfinished")
    unfinished.recipe_path.write_text(parent.recipe_path.read_text(encoding="utf-8"), encoding="utf-8")
    with pytest.raises(WenmaiError, match="has not finished"):
        iterate(unfinished.root, db, "good", log=lambda _: None)


def test_feedback_rights_given_to_iterate_become_the_feedback_datasets_defaults(parent, tmp_path):
    from finetune.config_io import load_run_recipe
    from finetune.rounds import _child_recipe

    recipe = load_run_recipe(parent).recipe
    counts = {"chat": 3, "ratings": 0, "pairs": 0}
    rights = {"licence": "CC-BY-4.0", "rights_holder": "Museum", "source": None}
    data = _child_recipe(recipe, parent, recipe, "merged", tmp_path / "r.db", "s", counts, 2, rights)
    assert data["data"]["feedback_chat"]["defaults"] == {"licence": "CC-BY-4.0", "rights_holder": "Museum"}
    assert [next(iter(s)) for s in data["stages"]] == ["sft", "evaluate", "merge", "export"]
    assert data["round"] == {"parent": str(parent.root.resolve()), "number": 2, "feedback": f"{tmp_path / 'r.db'}#s"}


def test_a_round_keeps_the_parents_counterfactual_augmentation_for_its_feedback(parent, tmp_path):
    from finetune.config_io import load_run_recipe
    from finetune.data import augmented_datasets
    from finetune.recipe import Recipe
    from finetune.rounds import _child_recipe

    recipe = load_run_recipe(parent).recipe
    section = {"pairs": [["他", "她"]], "datasets": [next(iter(recipe.data.datasets))]}
    recipe = recipe.model_copy(
        update={"data": type(recipe.data).model_validate({**recipe.data.model_dump(), "augment": section})}
    )
    data = _child_recipe(recipe, parent, recipe, "merged", tmp_path / "r.db", "s", {"chat": 3}, 2)
    assert data["data"]["augment"]["pairs"] == [["他", "她"]] and "datasets" not in data["data"]["augment"]
    child = Recipe.model_validate(data)
    assert augmented_datasets(child) == ["feedback_chat"]  # the round's chat feedback gets the swapped copies
