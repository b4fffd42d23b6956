"""From a cleaned review session to the records the stages read: `ratings` (reward), `pairs` (reward, dpo) and
`chat` (sft on corrections), each with the session's rights and provenance and the reviewer's pseudonym.

Items that cleaning held back and the scores of raters it dropped never become records; they are counted by
reason. Comments and corrections pass `scrub` (the data layer's PII scrubber) before they leave the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from finetune.recipe.review import ReviewCleaning
from finetune.review.cleaning import Cleaning, clean
from finetune.review.schema import Item, Review, Session
from finetune.review.store import ReviewStore

RECORD_KINDS = ("ratings", "pairs", "chat")
Scrub = Callable[[str], str]
Teacher = Callable[[list[Item]], dict[tuple[int, str], dict[str, float]]]


@dataclass
class SessionRecords:
    """A session's records of each kind, (where, record) pairs, and what cleaning kept out, by reason."""

    session: Session
    cleaning: Cleaning
    records: dict[str, list[tuple[str, dict]]]
    excluded: dict[str, int] = field(default_factory=dict)


def read_session(
    db: str | Path,
    session: str,
    kind: str,
    options: ReviewCleaning,
    scrub: Scrub | None = None,
    as_of: datetime | None = None,
) -> SessionRecords:
    """One kind of record from a session's latest (up to `as_of`), cleaned feedback: a `format: review` dataset."""
    store = ReviewStore.open(db, must_exist=True)
    try:
        found = session_records(store, session, options, scrub, kinds=(kind,), as_of=as_of)
    finally:
        store.close()
    found.records = {kind: found.records[kind]}
    return found


def session_records(
    store: ReviewStore,
    session: str,
    options: ReviewCleaning,
    scrub: Scrub | None = None,
    teacher: Teacher | None = None,
    kinds: tuple[str, ...] = RECORD_KINDS,
    as_of: datetime | None = None,
) -> SessionRecords:
    """Clean a session's latest reviews (as stored at `as_of`) and build its records of each kind in `kinds`."""
    settings = store.session(session)
    items = store.items(session, as_of)
    reviews = store.latest_reviews(session, as_of)
    cleaning = clean(items, reviews, settings.dimension_names, options, teacher(items) if teacher else None)
    by_item: dict[int, list[Review]] = {}
    for review in reviews:
        by_item.setdefault(review.item_id, []).append(review)
    builder = _Builder(settings, cleaning, scrub or (lambda text: text), store.url)
    records: dict[str, list[tuple[str, dict]]] = {kind: [] for kind in kinds}
    for item in items:
        item_reviews = by_item.get(item.id, [])
        if not item_reviews:
            continue
        if not cleaning.kept(item.id):
            builder.exclude("review: item held back by cleaning")
            continue
        used = [r for r in item_reviews if cleaning.used(r)]
        builder.excluded_raters(len(item_reviews) - len(used))
        if "ratings" in records:
            records["ratings"] += builder.ratings(item, used)
        if "pairs" in records:
            records["pairs"] += builder.pairs(item, used)
        if "chat" in records:
            records["chat"] += builder.chat(item, used)
    return SessionRecords(settings, cleaning, records, builder.excluded)


class _Builder:
    """Makes the records of one session, counting what it leaves out."""

    def __init__(self, session: Session, cleaning: Cleaning, scrub: Scrub, url: str):
        self.session, self.cleaning, self.scrub, self.url = session, cleaning, scrub, url
        self.excluded: dict[str, int] = {}

    def exclude(self, reason: str, count: int = 1) -> None:
        if count:
            self.excluded[reason] = self.excluded.get(reason, 0) + count

    def excluded_raters(self, count: int) -> None:
        self.exclude("review: rater far from consensus", count)

    def ratings(self, item: Item, reviews: list[Review]) -> list[tuple[str, dict]]:
        """One record per reviewer and answer: the (calibrated) 1-5 score per dimension."""
        out = []
        for review in reviews:
            for answer in item.answers:
                raw = review.scores.get(answer.label, {})
                scores = {
                    dim: round(value, 3)
                    for dim in raw
                    if (value := self.cleaning.calibrated(review, answer.label, dim)) is not None
                }
                if not scores:
                    continue
                record = {
                    "prompt": self._prompt(item),
                    "response": answer.text,
                    "scores": scores,
                    "rater": review.reviewer,
                    **self._meta(item, answer.label, [review]),
                }
                record["review"]["raw_scores"] = raw
                if review.comment:
                    record["comment"] = self.scrub(review.comment)
                out.append((self._where(item, answer.label, review.reviewer), record))
        return out

    def pairs(self, item: Item, reviews: list[Review]) -> list[tuple[str, dict]]:
        """One pair per two-answer item with a majority: chosen is the answer more reviewers preferred."""
        if len(item.answers) < 2 or not any(r.choice for r in reviews):
            return []
        winner = self.cleaning.majority(item.id)
        if winner is None:
            self.exclude("review: no majority between A and B")
            return []
        if any("factual_error" in r.flags and r.choice == winner for r in reviews):
            self.exclude("review: preferred answer flagged as a factual error")
            return []
        chosen = next(a for a in item.answers if a.label == winner)
        rejected = next(a for a in item.answers if a.label != winner)
        votes = self.cleaning.votes.get(item.id, {})
        decided = votes.get("A", 0) + votes.get("B", 0)
        margin = (votes.get(winner, 0) - votes.get(rejected.label, 0)) / decided if decided else 0.0
        voters = [r for r in reviews if r.choice in ("A", "B")]
        record = {
            "prompt": self._prompt(item),
            "chosen": chosen.text,
            "rejected": rejected.text,
            "margin": round(margin, 3),
            "raters": sorted(r.reviewer for r in voters),
            **self._meta(item, winner, voters),
        }
        record["review"]["votes"] = votes
        return [(self._where(item, winner, "votes"), record)]

    def chat(self, item: Item, reviews: list[Review]) -> list[tuple[str, dict]]:
        """One conversation per corrected answer: the prompt and the reviewer's correction."""
        out = []
        for review in reviews:
            if not (review.corrected_answer or "").strip():
                continue
            messages = [{"role": "system", "content": item.system}] if item.system else []
            messages += [
                {"role": "user", "content": item.prompt},
                {"role": "assistant", "content": self.scrub(review.corrected_answer.strip())},
            ]
            record = {"messages": messages, "rater": review.reviewer, **self._meta(item, None, [review])}
            out.append((self._where(item, "correction", review.reviewer), record))
        return out

    def _prompt(self, item: Item) -> str | list[dict]:
        if not item.system:
            return item.prompt
        return [{"role": "system", "content": item.system}, {"role": "user", "content": item.prompt}]

    def _meta(self, item: Item, answer: str | None, reviews: list[Review]) -> dict:
        """Rights and provenance from the session, and where in the store the record came from."""
        session = self.session
        meta: dict = {
            "id": f"{session.name}/{item.id}" + (f"/{answer}" if answer else ""),
            "source": {"institution": session.institution or None, "collection": f"review session {session.name}"},
        }
        for key in ("licence", "rights_holder", "consent"):
            value = getattr(session, key)
            if value is not None:
                meta[key] = value
        meta["review"] = {
            "session": session.name,
            "item": item.id,
            "key": item.key,
            "answer": answer,
            "versions": {r.reviewer: r.version for r in reviews},
            "model": next((a.model for a in item.answers if a.label == answer), None),
        }
        return meta

    def _where(self, item: Item, what: str, who: str) -> str:
        return f"{self.url}#{self.session.name}/item {item.id}/{what}/{who}"
