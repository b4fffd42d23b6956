"""The review commands' work: `wenmai review create` (a model's answers to a prompt file, stored as a session's
items) and `wenmai review export` (a session's cleaned feedback as the records the stages read).

    reviewing.create("runs/museum-.../export", "prompts.jsonl", "bronzes-r1", db="review.db")
    reviewing.export("review.db", "bronzes-r1", "feedback/r1", reward_run="runs/museum-...")
"""

from __future__ import annotations

import gc
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.data.pii import build_scrubber
from finetune.data.template import CONTRACT_FILE, read_contract, verify_contract
from finetune.errors import ConfigError, Problem, WenmaiError
from finetune.evaluation import lm
from finetune.evaluation.suite import load_suite
from finetune.evaluation.targets import Target, load, parse_target, run_recipe
from finetune.recipe import Recipe, reward_dimensions
from finetune.recipe.data_policy import PiiOptions
from finetune.recipe.review import ReviewCleaning
from finetune.review import accounts
from finetune.review.cleaning import render_markdown
from finetune.review.records import RECORD_KINDS, session_records
from finetune.review.schema import Dimension, Item, NewAnswer, NewItem, Reviewer, Session, SessionSettings
from finetune.review.store import ReviewStore
from finetune.run_dir import RECIPE_FILE, RunDir, atomic_dir
from reward.score import RewardScorer

Log = Callable[[str], None]
PLAIN_LIST = (".txt", ".lst")


@dataclass
class Prompt:
    key: str
    text: str
    system: str | None = None
    meta: dict | None = None


def read_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from an alignment suite (YAML or JSONL), a CValues-style JSONL file, or a plain list (one a line)."""
    path = Path(path)
    if not path.is_file():
        raise WenmaiError(f"--prompts: {path} not found")
    if path.suffix.lower() in PLAIN_LIST:
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [Prompt(f"line-{n}", line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
    elif path.suffix.lower() in (".jsonl", ".yaml", ".yml"):
        probes = load_suite(path).suite.probes
        prompts = [Prompt(p.id, p.prompt, p.system, {**p.meta, "tags": p.tags} if p.tags else p.meta) for p in probes]
    else:
        raise WenmaiError(
            f"--prompts: {path} is not a prompt file; give an alignment suite (.yaml), JSONL with a `prompt` per "
            "line (CValues style), or a plain list (.txt, one prompt a line)"
        )
    if not prompts:
        raise WenmaiError(f"--prompts: {path} holds no prompts")
    return prompts


def create(
    source: str,
    prompts_file: str | Path,
    name: str,
    db: str | Path,
    against: str | None = None,
    recipe: Recipe | None = None,
    institution: str = "",
    licence: str | None = None,
    rights_holder: str | None = None,
    reviewers_per_item: int = 3,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    limit: int | None = None,
    log: Log = print,
) -> tuple[Session, list[Item]]:
    """Answer every prompt with SOURCE (and OTHER, for A/B) and store them as the items of a new session.

    Everything that can be checked is checked before a model loads: the prompt file, the session name, the
    targets and the reward dimensions reviewers will score.
    """
    prompts = read_prompts(prompts_file)[:limit]
    store = ReviewStore.open(db)
    try:
        if store.has_session(name):
            raise WenmaiError(f"--name: a review session named {name!r} is already in {store.url}; choose another")
        targets = [parse_target(source, recipe=recipe)] + ([parse_target(against, recipe=recipe)] if against else [])
        settings = SessionSettings(
            name=name,
            institution=institution,
            licence=licence,
            rights_holder=rights_holder,
            dimensions=_dimensions(recipe, source),
            reviewers_per_item=reviewers_per_item,
        )
        answers = [_answer_all(target, prompts, max_new_tokens, batch_size, log) for target in targets]
        items = [
            NewItem(key=p.key, prompt=p.text, system=p.system, meta=p.meta or {}, answers=[a[i] for a in answers])
            for i, p in enumerate(prompts)
        ]
        session = store.create_session(settings, items)
        return session, store.items(name)
    finally:
        store.close()


@dataclass
class Export:
    """What `export` wrote: files by kind, record counts, and the cleaning summary."""

    folder: Path
    files: dict[str, Path]
    counts: dict[str, int]
    held_back: int
    noisy_raters: list[str]
    disagreements: int


def export(
    db: str | Path,
    session: str,
    to: str | Path,
    options: ReviewCleaning | None = None,
    reward_run: str | None = None,
    pii: PiiOptions | None = None,
    log: Log = print,
) -> Export:
    """Write a session's cleaned feedback to `to`: ratings/pairs/chat JSONL and the cleaning report (md + JSON).

    The folder appears whole or not at all. With `reward_run`, that run's reward model is the teacher: items where
    it and the experts disagree strongly are listed in the report for a second look (never dropped).
    """
    options = options or ReviewCleaning()
    scrubber = build_scrubber(pii or PiiOptions())
    scrub = (lambda text: scrubber.scrub(text)[0]) if scrubber else None
    teacher = _teacher(reward_run, log) if reward_run else None
    store = ReviewStore.open(db, must_exist=True)
    try:
        found = session_records(store, session, options, scrub, teacher)
    finally:
        store.close()
    folder = Path(to)
    folder.parent.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    with atomic_dir(folder) as tmp:
        for kind in RECORD_KINDS:
            rows = found.records[kind]
            counts[kind] = len(rows)
            if rows:
                text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for _, record in rows)
                (tmp / f"{kind}.jsonl").write_text(text, encoding="utf-8")
                files[kind] = folder / f"{kind}.jsonl"
        report = found.cleaning.model_dump(mode="json") | {"session": session, "records": counts}
        report["excluded"] = found.excluded
        report["teacher"] = reward_run
        (tmp / "cleaning_report.json").write_text(json.dumps(report, ensure_ascii=False, indent=2), encoding="utf-8")
        markdown = render_markdown(found.cleaning, f"Cleaning report: review session {session}")
        (tmp / "cleaning_report.md").write_text(markdown, encoding="utf-8")
    cleaning = found.cleaning
    return Export(
        folder, files, counts, len(cleaning.held_back), list(cleaning.noisy_raters), len(cleaning.disagreements)
    )


def add_user(db: str | Path, pseudonym: str, password: str, role: str = "reviewer") -> Reviewer:
    """A new reviewer account (the password is stored as an argon2 hash)."""
    store = ReviewStore.open(db)
    try:
        return accounts.add_user(store, pseudonym, password, role)
    finally:
        store.close()


def list_users(db: str | Path) -> list[Reviewer]:
    store = ReviewStore.open(db, must_exist=True)
    try:
        return store.reviewers()
    finally:
        store.close()


def set_active(db: str | Path, pseudonym: str, active: bool) -> Reviewer:
    """Enable or disable a reviewer; their past reviews stay."""
    store = ReviewStore.open(db, must_exist=True)
    try:
        return store.set_active(pseudonym, active)
    finally:
        store.close()


def _answer_all(target: Target, prompts: list[Prompt], max_new_tokens: int, batch_size: int, log: Log) -> list:
    """SOURCE's greedy answer to every prompt, rendered with the model's own chat template."""
    log(f"loading {target.label}")
    model, tokenizer = load(target)
    stop_ids = _verified_stop_ids(target, tokenizer)
    chats = [
        ([{"role": "system", "content": p.system}] if p.system else []) + [{"role": "user", "content": p.text}]
        for p in prompts
    ]
    rendered = [lm.render_prompt(tokenizer, chat) for chat in chats]
    replies = lm.generate(
        model, tokenizer, rendered, max_new_tokens, batch_size, desc=f"answers: {target.label}", stop_ids=stop_ids
    )
    del model
    gc.collect()
    generation = {"max_new_tokens": max_new_tokens, "do_sample": False, "stop_token_ids": stop_ids}
    empty = [p.key for p, reply in zip(prompts, replies, strict=True) if not reply.strip()]
    if empty:
        log(f"warning: {target.label} gave an empty answer to {len(empty)} prompt(s) (first: {empty[0]})")
    adapter = str(target.adapter) if target.adapter else None
    model_name = target.source.get("run") or target.source.get("path") or target.section.path
    return [
        NewAnswer(text=reply or "(empty answer)", model=str(model_name), adapter=adapter, generation=generation)
        for reply in replies
    ]


def _verified_stop_ids(target: Target, tokenizer) -> list[int]:
    """The stop ids training recorded, after checking the tokenizer against that template contract (when one is
    there: a stage folder or an export has it; a plain model folder has not)."""
    folders = [Path(target.section.path)]
    if target.tokenizer_dir is not None:
        folders = [target.tokenizer_dir.parent, target.tokenizer_dir, *folders]
    for folder in folders:
        if (folder / CONTRACT_FILE).is_file():
            contract = read_contract(folder)
            verify_contract(tokenizer, contract, f"review create from {target.label}")
            return list(contract["stop_token_ids"])
    return lm.stop_token_ids(tokenizer)


def _dimensions(recipe: Recipe | None, source: str) -> list[Dimension]:
    """The reward dimensions reviewers score: the recipe's, or the source run's."""
    if recipe is None:
        path = Path(source)
        folder = path if (path / RECIPE_FILE).is_file() else path.parent
        if not (folder / RECIPE_FILE).is_file():
            raise ConfigError(
                [Problem("--recipe", f"{source} is not a run folder; give --recipe FILE for the reward dimensions")],
                "cannot tell what reviewers score",
            )
        recipe = run_recipe(RunDir.open(folder))
    return [Dimension(name=d.name, description=d.description, weight=d.weight) for d in reward_dimensions(recipe)]


def _teacher(reward_run: str, log: Log):
    """Score every (item, answer) with a run's reward model, on the dimensions it shares with the session."""
    scorer = RewardScorer.from_stage(reward_run)
    log(f"teacher: reward model of {reward_run} ({', '.join(scorer.dimensions)})")

    def teach(items: list[Item]) -> dict[tuple[int, str], dict[str, float]]:
        units = [(item, answer) for item in items for answer in item.answers]
        if not units:
            return {}
        prompts = [
            ([{"role": "system", "content": i.system}] if i.system else []) + [{"role": "user", "content": i.prompt}]
            for i, _ in units
        ]
        scores = scorer.score(prompts, [a.text for _, a in units])
        return {
            (item.id, answer.label): {dim: scores[dim][n] for dim in scorer.dimensions}
            for n, (item, answer) in enumerate(units)
        }

    return teach
