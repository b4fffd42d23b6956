"""`POST /v1/feedback`: a visitor's thumbs, 1-5 scores, comment or corrected answer on one served answer, written
into the review store (the served model's visitor session) where curators see it in the review app.

The server remembers recent answers in memory only (bounded, a day at most) so feedback can find them; with
conversation logging on (`log_days` > 0) they are also stored, PII-scrubbed, for that many days and then deleted.
Everything stored passes the PII scrub first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from finetune.config_io import load_run_recipe
from finetune.data.pii import build_scrubber
from finetune.errors import WenmaiError
from finetune.recipe import Recipe, reward_dimensions
from finetune.recipe.data_policy import PiiOptions
from finetune.review.feedback import (
    Conversation,
    Feedback,
    FeedbackError,
    log_conversation,
    logged_conversation,
    purge_conversations,
    record_feedback,
    visitor_session,
)
from finetune.review.schema import Dimension
from finetune.review.store import ReviewStore
from finetune.run_dir import RECIPE_FILE, RunDir
from finetune.serving.protocol import ApiError

REMEMBERED = 10_000  # recent answers kept in memory for feedback
REMEMBER_SECONDS = 24 * 3600
PURGE_EVERY = 3600.0


class FeedbackSink:
    """Where one server's feedback goes: its review store, recent answers, and the conversation log."""

    def __init__(self, db: str, model_id: str, recipe: Recipe | None, log_days: int = 0):
        self.store = ReviewStore.open(db)
        self.model_id, self.log_days = model_id, log_days
        self.dimensions = [
            Dimension(name=d.name, description=d.description, weight=d.weight)
            for d in (reward_dimensions(recipe) if recipe is not None else [])
        ] or [Dimension(name="overall", description="How good the answer is overall.")]
        policy = recipe.data.policy.pii if recipe is not None else PiiOptions()
        scrubber = build_scrubber(policy if policy.action != "off" else PiiOptions())  # stored text is always scrubbed
        self.scrub = lambda text: scrubber.scrub(text)[0]
        self.recent: OrderedDict[str, tuple[float, Conversation]] = OrderedDict()
        self.last_purge = 0.0

    def close(self) -> None:
        self.store.close()

    async def remember(self, conversation: Conversation) -> None:
        """Keep a served answer for feedback: in memory, and in the log when logging is on."""
        self.recent[conversation.response_id] = (time.monotonic(), conversation)
        while len(self.recent) > REMEMBERED:
            self.recent.popitem(last=False)
        if self.log_days > 0:
            await run_in_threadpool(log_conversation, self.store, conversation, self.log_days, self.scrub)
        if time.monotonic() - self.last_purge > PURGE_EVERY:
            self.last_purge = time.monotonic()
            await run_in_threadpool(purge_conversations, self.store, datetime.now(timezone.utc))

    async def receive(self, body: dict) -> dict:
        """Validate and store one piece of feedback; a 4xx `ApiError` names what was wrong."""
        try:
            feedback = Feedback.model_validate(body)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
        conversation = self._conversation(feedback.response_id) or await run_in_threadpool(
            logged_conversation, self.store, feedback.response_id
        )
        if conversation is None:
            raise ApiError(
                404,
                f"no answer with id {feedback.response_id!r} is known here (answers are kept for feedback for a day, "
                "or for the logging period)",
                param="response_id",
                code="response_not_found",
            )
        try:
            review = await run_in_threadpool(
                record_feedback, self.store, conversation, feedback, self.dimensions, self.scrub
            )
        except FeedbackError as err:
            raise ApiError(400, str(err), param="scores") from None
        return {
            "object": "feedback",
            "id": review.id,
            "response_id": feedback.response_id,
            "session": visitor_session(conversation.model),
            "item": review.item_id,
        }

    def _conversation(self, response_id: str) -> Conversation | None:
        found = self.recent.get(response_id)
        if found is None or time.monotonic() - found[0] > REMEMBER_SECONDS:
            return None
        return found[1]


def served_recipe(source: str | Path) -> Recipe | None:
    """The recipe of the run a served export or run folder came from, when it is on this machine."""
    path = Path(source)
    for folder in (path, path.parent, path.parent.parent, path.parent.parent.parent):
        if (folder / RECIPE_FILE).is_file():
            try:
                return load_run_recipe(RunDir.open(folder)).recipe
            except WenmaiError:
                return None
    return None
