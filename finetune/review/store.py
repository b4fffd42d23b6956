"""The review store: a SQLite file by default (WAL; transactions take turns, each a few milliseconds), PostgreSQL by
URL for a team. Opening it brings its tables up to date with Alembic. Every write is checked before it is
stored (a score of 7, an unknown dimension or item is an error naming the field, and nothing is written), and
nothing is overwritten: editing a review stores its next version; exports read each reviewer's latest.

    store = ReviewStore.open("review.db")            # or "postgresql+psycopg://user@host/db"
    store.create_session(SessionSettings(name="bronzes-r1", dimensions=[...]))
    [item] = store.add_items("bronzes-r1", [NewItem(prompt="...", answers=[NewAnswer(text="...", model="...")])])
    store.add_reviewer("r1")
    store.submit_review(item.id, "r1", ReviewInput(scores={"A": {"accuracy": 4}}))
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError
from sqlalchemy.orm import Session as OrmSession
from sqlalchemy.orm import sessionmaker

from finetune.errors import WenmaiError
from finetune.recipe.review import DEFAULT_DB
from finetune.review.database import READ_ONLY, database_url, engine_for, migrate, shown_url
from finetune.review.schema import (
    ANSWER_LABELS,
    Item,
    NewItem,
    Review,
    Reviewer,
    ReviewInput,
    Role,
    Session,
    SessionSettings,
)
from finetune.review.tables import (
    AnswerRow,
    AssignmentRow,
    ItemRow,
    ReviewerRow,
    ReviewRow,
    ScoreRow,
    SessionRow,
    as_utc,
    item_model,
    review_model,
    reviewer_model,
    session_model,
)

RETRIES = 8  # a concurrent edit of the same review took the version number: take the next one


class ReviewError(WenmaiError):
    """A write the store refuses (bad score, unknown dimension, item or reviewer); nothing was stored."""


class ReviewStore:
    """Sessions, items, reviewers and versioned reviews in one database."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.url = shown_url(str(engine.url.render_as_string(hide_password=False)))
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @classmethod
    def open(cls, db: str | Path = DEFAULT_DB, must_exist: bool = False) -> ReviewStore:
        """Open (and migrate) the store at `db`; a database that cannot be reached is a one-line error."""
        url = database_url(db)
        if must_exist and url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise WenmaiError(f"--db: no review database at {url.removeprefix('sqlite:///')}; create one first")
        try:
            engine = engine_for(url)
            migrate(engine)
        except ArgumentError as err:
            raise WenmaiError(
                f"--db: {shown_url(url)!r} is not a database URL ({err}); give a file path or "
                "postgresql+psycopg://user:password@host:port/database"
            ) from None
        except (DatabaseError, ModuleNotFoundError) as err:  # unreachable, refused, or not a database
            reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
            raise WenmaiError(f"cannot open the review database {shown_url(url)}: {reason}") from None
        return cls(engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[OrmSession]:
        """One transaction: committed when the block ends, rolled back (nothing stored) when it raises.

        `write=False` marks one that only reads: on SQLite it does not wait for writers."""
        with self._sessions.begin() as db:
            if not write:
                db.connection(execution_options={READ_ONLY: True})
            yield db

    # --- sessions -------------------------------------------------------------------------

    def create_session(self, settings: SessionSettings, items: list[NewItem] = ()) -> Session:
        """A new review session (its name must be new) and its first items, in one transaction."""
        with self.transaction() as db:
            if db.scalar(select(SessionRow.id).where(SessionRow.name == settings.name)) is not None:
                raise ReviewError(f"a review session named {settings.name!r} exists; choose another --name")
            row = SessionRow(**settings.model_dump(exclude={"dimensions"}), dimensions=_dimensions(settings))
            db.add(row)
            try:
                db.flush()
            except IntegrityError:  # created by someone else in the same moment
                raise ReviewError(f"a review session named {settings.name!r} exists; choose another --name") from None
            self._add_items(db, row, items)
            return session_model(row)

    def has_session(self, name: str) -> bool:
        with self.transaction(write=False) as db:
            return db.scalar(select(SessionRow.id).where(SessionRow.name == name)) is not None

    def session(self, name: str) -> Session:
        """The session called `name`."""
        with self.transaction(write=False) as db:
            return session_model(self._session_row(db, name))

    def sessions(self) -> list[Session]:
        with self.transaction(write=False) as db:
            return [session_model(row) for row in db.scalars(select(SessionRow).order_by(SessionRow.id))]

    # --- items ----------------------------------------------------------------------------

    def add_items(self, session: str, items: list[NewItem]) -> list[Item]:
        """Store prompts with their answers (labelled A, B) in `session`, all or none."""
        with self.transaction() as db:
            return self._add_items(db, self._session_row(db, session), items)

    def items(self, session: str, as_of: datetime | None = None) -> list[Item]:
        """Every item of `session` (added up to `as_of`, when given), in the order they were added."""
        with self.transaction(write=False) as db:
            row = self._session_row(db, session)
            query = select(ItemRow).where(ItemRow.session_id == row.id)
            if as_of is not None:
                query = query.where(ItemRow.created_at <= as_utc(as_of))
            return [item_model(r, session) for r in db.scalars(query.order_by(ItemRow.id))]

    def item(self, item_id: int) -> Item:
        with self.transaction(write=False) as db:
            row = self._item_row(db, item_id)
            return item_model(row, row.session.name)

    # --- reviewers ------------------------------------------------------------------------

    def add_reviewer(self, pseudonym: str, role: Role = "reviewer", password_hash: str | None = None) -> Reviewer:
        """A reviewer account under a pseudonym (no real names are stored)."""
        pseudonym = pseudonym.strip()
        if not pseudonym:
            raise ReviewError("a reviewer needs a pseudonym (e.g. curator-03)")
        with self.transaction() as db:
            if db.scalar(select(ReviewerRow.id).where(ReviewerRow.pseudonym == pseudonym)) is not None:
                raise ReviewError(f"reviewer {pseudonym!r} exists")
            row = ReviewerRow(pseudonym=pseudonym, role=role, password_hash=password_hash, active=True)
            db.add(row)
            try:
                db.flush()
            except IntegrityError:  # added by someone else in the same moment
                raise ReviewError(f"reviewer {pseudonym!r} exists") from None
            return reviewer_model(row)

    def reviewer(self, pseudonym: str) -> Reviewer | None:
        """The account under `pseudonym`, or None."""
        with self.transaction(write=False) as db:
            row = db.scalar(select(ReviewerRow).where(ReviewerRow.pseudonym == pseudonym))
            return reviewer_model(row) if row is not None else None

    def reviewers(self) -> list[Reviewer]:
        with self.transaction(write=False) as db:
            return [reviewer_model(r) for r in db.scalars(select(ReviewerRow).order_by(ReviewerRow.pseudonym))]

    def set_active(self, pseudonym: str, active: bool) -> Reviewer:
        """Enable or disable an account; a disabled reviewer's past reviews stay."""
        with self.transaction() as db:
            row = self._reviewer_row(db, pseudonym)
            row.active = active
            return reviewer_model(row)

    def password_hash(self, pseudonym: str) -> str | None:
        with self.transaction(write=False) as db:
            return self._reviewer_row(db, pseudonym).password_hash

    # --- reviews --------------------------------------------------------------------------

    def submit_review(self, item_id: int, reviewer: str, review: ReviewInput, source: str = "curator") -> Review:
        """Store `reviewer`'s judgement of an item as that reviewer's next version; checked first, all or nothing."""
        for attempt in range(RETRIES):
            try:
                with self.transaction() as db:
                    item = self._item_row(db, item_id)
                    who = self._reviewer_row(db, reviewer, lock=True)  # one reviewer's versions are taken in turn
                    if not who.active:
                        raise ReviewError(f"reviewer {reviewer!r} is disabled; enable the account to review")
                    _check_review(review, item, item.session)
                    latest = db.scalar(
                        select(func.max(ReviewRow.version)).where(
                            ReviewRow.item_id == item_id, ReviewRow.reviewer_id == who.id
                        )
                    )
                    row = ReviewRow(
                        item_id=item_id,
                        reviewer_id=who.id,
                        version=(latest or 0) + 1,
                        **review.model_dump(exclude={"scores"}),
                        source=source,
                        scores=[
                            ScoreRow(answer=answer, dimension=dim, value=value)
                            for answer, scores in review.scores.items()
                            for dim, value in scores.items()
                        ],
                    )
                    db.add(row)
                    db.flush()
                    return review_model(row)
            except IntegrityError:
                if attempt == RETRIES - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def latest_reviews(self, session: str, as_of: datetime | None = None) -> list[Review]:
        """Each reviewer's latest version of each item's review in `session` (as stored at `as_of`, when given:
        nothing is overwritten, so a time pins exactly what an export or a run read)."""
        with self.transaction(write=False) as db:
            row = self._session_row(db, session)
            newest = (
                select(ReviewRow.item_id, ReviewRow.reviewer_id, func.max(ReviewRow.version).label("version"))
                .join(ItemRow, ItemRow.id == ReviewRow.item_id)
                .where(ItemRow.session_id == row.id)
            )
            if as_of is not None:
                newest = newest.where(ReviewRow.created_at <= as_utc(as_of))
            newest = newest.group_by(ReviewRow.item_id, ReviewRow.reviewer_id).subquery()
            found = db.scalars(
                select(ReviewRow)
                .join(
                    newest,
                    (ReviewRow.item_id == newest.c.item_id)
                    & (ReviewRow.reviewer_id == newest.c.reviewer_id)
                    & (ReviewRow.version == newest.c.version),
                )
                .order_by(ReviewRow.item_id, ReviewRow.id)
            )
            return [review_model(r) for r in found]

    def history(self, item_id: int, reviewer: str) -> list[Review]:
        """Every version of one reviewer's review of one item, oldest first."""
        with self.transaction(write=False) as db:
            who = self._reviewer_row(db, reviewer)
            found = db.scalars(
                select(ReviewRow)
                .where(ReviewRow.item_id == item_id, ReviewRow.reviewer_id == who.id)
                .order_by(ReviewRow.version)
            )
            return [review_model(r) for r in found]

    def latest_review(self, item_id: int, reviewer: str) -> Review | None:
        """The reviewer's own latest version of their review of one item, if any."""
        versions = self.history(item_id, reviewer)
        return versions[-1] if versions else None

    # --- assignments: each item goes to K reviewers -----------------------------------------

    def next_item(self, session: str, reviewer: str) -> Item | None:
        """The reviewer's next item: one assigned to them and not yet reviewed, else a newly assigned item with
        fewer than K reviewers (fewest first, then oldest); None when nothing is left for them.

        The session row is locked while assigning, so concurrent reviewers never push an item past K; finding an
        item already theirs only reads.
        """
        with self.transaction(write=False) as db:
            pending = self._pending(db, self._session_row(db, session), self._reviewer_row(db, reviewer))
            if pending is not None:
                return item_model(pending, session)
        with self.transaction() as db:
            row = self._session_row(db, session, lock=True)
            who = self._reviewer_row(db, reviewer)
            if not who.active:
                raise ReviewError(f"reviewer {reviewer!r} is disabled")
            pending = self._pending(db, row, who)  # assigned meanwhile (another tab of the same reviewer)
            if pending is not None:
                return item_model(pending, session)
            reviewed, mine = _items_of(who)
            counts = _assignment_counts()
            taken = func.coalesce(counts.c.n, 0)
            candidate = db.scalar(
                select(ItemRow)
                .outerjoin(counts, counts.c.item_id == ItemRow.id)
                .where(
                    ItemRow.session_id == row.id,
                    ItemRow.id.not_in(mine),
                    ItemRow.id.not_in(reviewed),
                    taken < row.reviewers_per_item,
                )
                .order_by(taken, ItemRow.id)
                .limit(1)
            )
            if candidate is None:
                return None
            db.add(AssignmentRow(item_id=candidate.id, reviewer_id=who.id))
            db.flush()
            return item_model(candidate, session)

    @staticmethod
    def _pending(db: OrmSession, session: SessionRow, who: ReviewerRow) -> ItemRow | None:
        """The oldest item assigned to the reviewer that they have not reviewed."""
        reviewed, mine = _items_of(who)
        return db.scalar(
            select(ItemRow)
            .where(ItemRow.session_id == session.id, ItemRow.id.in_(mine), ItemRow.id.not_in(reviewed))
            .order_by(ItemRow.id)
            .limit(1)
        )

    def is_assigned(self, item_id: int, reviewer: str) -> bool:
        """Whether the item was given to the reviewer (the app shows and accepts nothing else)."""
        with self.transaction(write=False) as db:
            who = self._reviewer_row(db, reviewer)
            found = db.scalar(
                select(AssignmentRow.id).where(AssignmentRow.item_id == item_id, AssignmentRow.reviewer_id == who.id)
            )
            return found is not None

    def progress(self, session: str, reviewer: str) -> tuple[int, int]:
        """(n, N) for the reviewer: items reviewed, and items that are or can still be theirs."""
        with self.transaction(write=False) as db:
            row = self._session_row(db, session)
            who = self._reviewer_row(db, reviewer)
            reviewed, mine = _items_of(who)
            in_session = ItemRow.session_id == row.id
            done = db.scalar(select(func.count(ItemRow.id)).where(in_session, ItemRow.id.in_(reviewed))) or 0
            theirs = (
                db.scalar(
                    select(func.count(ItemRow.id)).where(in_session, ItemRow.id.in_(mine) | ItemRow.id.in_(reviewed))
                )
                or 0
            )
            counts = _assignment_counts()
            open_slots = (
                db.scalar(
                    select(func.count(ItemRow.id))
                    .outerjoin(counts, counts.c.item_id == ItemRow.id)
                    .where(
                        in_session,
                        ItemRow.id.not_in(mine),
                        ItemRow.id.not_in(reviewed),
                        func.coalesce(counts.c.n, 0) < row.reviewers_per_item,
                    )
                )
                or 0
            )
            return int(done), int(theirs + open_slots)

    def session_progress(self, session: str) -> list[dict]:
        """Per reviewer with work in the session: items assigned and items reviewed."""
        with self.transaction(write=False) as db:
            row = self._session_row(db, session)
            assigned = dict(
                db.execute(
                    select(ReviewerRow.pseudonym, func.count(AssignmentRow.id))
                    .join(AssignmentRow, AssignmentRow.reviewer_id == ReviewerRow.id)
                    .join(ItemRow, ItemRow.id == AssignmentRow.item_id)
                    .where(ItemRow.session_id == row.id)
                    .group_by(ReviewerRow.pseudonym)
                ).all()
            )
            reviewed = dict(
                db.execute(
                    select(ReviewerRow.pseudonym, func.count(func.distinct(ReviewRow.item_id)))
                    .join(ReviewRow, ReviewRow.reviewer_id == ReviewerRow.id)
                    .join(ItemRow, ItemRow.id == ReviewRow.item_id)
                    .where(ItemRow.session_id == row.id)
                    .group_by(ReviewerRow.pseudonym)
                ).all()
            )
            return [
                {"reviewer": name, "assigned": int(assigned.get(name, 0)), "reviewed": int(reviewed.get(name, 0))}
                for name in sorted(set(assigned) | set(reviewed))
            ]

    def count_reviews(self, session: str | None = None) -> int:
        """Stored review versions (all of them), in one session or the whole store."""
        with self.transaction(write=False) as db:
            query = select(func.count(ReviewRow.id))
            if session is not None:
                query = query.join(ItemRow, ItemRow.id == ReviewRow.item_id).where(
                    ItemRow.session_id == self._session_row(db, session).id
                )
            return int(db.scalar(query) or 0)

    def _add_items(self, db: OrmSession, session: SessionRow, items: list[NewItem]) -> list[Item]:
        keys = [item.key for item in items if item.key is not None]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ReviewError(f"prompt id {repeated[0]!r} appears twice; each prompt needs its own id")
        rows = []
        for item in items:
            answers = [
                AnswerRow(label=label, **answer.model_dump())
                for label, answer in zip(ANSWER_LABELS, item.answers, strict=False)
            ]
            rows.append(ItemRow(session_id=session.id, **item.model_dump(exclude={"answers"}), answers=answers))
        db.add_all(rows)
        try:
            db.flush()
        except IntegrityError:
            raise ReviewError(f"session {session.name!r} already has an item with one of these prompt ids") from None
        return [item_model(r, session.name) for r in rows]

    # --- lookups --------------------------------------------------------------------------

    def _session_row(self, db: OrmSession, name: str, lock: bool = False) -> SessionRow:
        query = select(SessionRow).where(SessionRow.name == name)
        row = db.scalar(query.with_for_update() if lock else query)
        if row is None:
            known = ", ".join(db.scalars(select(SessionRow.name).order_by(SessionRow.id))) or "none yet"
            raise ReviewError(f"no review session named {name!r} in {self.url} (sessions: {known})")
        return row

    def _item_row(self, db: OrmSession, item_id: int) -> ItemRow:
        row = db.get(ItemRow, item_id)
        if row is None:
            raise ReviewError(f"no item {item_id} in the review store {self.url}")
        return row

    def _reviewer_row(self, db: OrmSession, pseudonym: str, lock: bool = False) -> ReviewerRow:
        query = select(ReviewerRow).where(ReviewerRow.pseudonym == pseudonym)
        row = db.scalar(query.with_for_update() if lock else query)
        if row is None:
            raise ReviewError(f"no reviewer {pseudonym!r}; add one with `wenmai review user add {pseudonym}`")
        return row


def _items_of(who: ReviewerRow):
    """(items the reviewer reviewed, items assigned to them), as subqueries."""
    return (
        select(ReviewRow.item_id).where(ReviewRow.reviewer_id == who.id),
        select(AssignmentRow.item_id).where(AssignmentRow.reviewer_id == who.id),
    )


def _assignment_counts():
    """(item_id, n): how many reviewers each item is assigned to."""
    return (
        select(AssignmentRow.item_id, func.count(AssignmentRow.id).label("n"))
        .group_by(AssignmentRow.item_id)
        .subquery()
    )


def _check_review(review: ReviewInput, item: ItemRow, session: SessionRow) -> None:
    labels = [a.label for a in item.answers]
    names = [d["name"] for d in session.dimensions]
    for answer, scores in review.scores.items():
        if answer not in labels:
            raise ReviewError(
                f"scores.{answer}: item {item.id} has answer{'s' if len(labels) > 1 else ''} "
                f"{', '.join(labels)}; score those"
            )
        for dim, value in scores.items():
            if dim not in names:
                raise ReviewError(
                    f"scores.{answer}.{dim}: unknown dimension; session {session.name!r} scores {', '.join(names)}"
                )
            if isinstance(value, bool) or not 1 <= value <= 5:
                raise ReviewError(f"scores.{answer}.{dim}: {value} is outside 1..5 (1 = worst, 5 = best)")
    if review.choice is not None and len(labels) < 2:
        raise ReviewError(f"choice: item {item.id} has one answer; A/B/tie needs two")
    if not (review.scores or review.choice or review.corrected_answer or review.flags or review.thumb):
        raise ReviewError("an empty review: give scores, a choice, a corrected answer, a flag or a thumb")


def _dimensions(settings: SessionSettings) -> list[dict]:
    return [d.model_dump() for d in settings.dimensions]
