"""What the server keeps around requests: admission (concurrency and a bounded queue), metrics, headers.

The security headers are those of the review app (`finetune.review_app.web.SECURITY_HEADERS`), tightened
for an API that serves JSON and never a page: nothing may be loaded, framed or cached. They are not imported
from there because the review app's module pulls in Jinja2, babel and the review store.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finetune.errors import WenmaiError
from finetune.net import is_loopback
from finetune.serving.protocol import ApiError

SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Slot:
    """A place among the requests generating now; released once (later calls do nothing)."""

    def __init__(self, admission: Admission):
        self.admission, self.held = admission, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.active -= 1
            self.admission.slots.release()


class Admission:
    """At most `limit` requests generate at once; `queue` more may wait; beyond that a request gets a 429."""

    def __init__(self, limit: int, queue: int):
        self.limit, self.queue = limit, queue
        self.slots = asyncio.Semaphore(limit)
        self.waiting = 0
        self.active = 0

    async def enter(self) -> Slot:
        """A slot, once one is free; a 429 at once when the queue is full."""
        if self.slots.locked() and self.waiting >= self.queue:
            raise ApiError(
                429,
                f"the server is busy: {self.limit} requests are generating and {self.waiting} waiting; retry shortly",
                error_type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        return Slot(self)


@dataclass
class Metrics:
    """Counters since the server started (`GET /metrics`)."""

    requests: int = 0
    tokens_generated: int = 0
    refusals: int = 0
    redacted_answers: int = 0
    redactions: int = 0
    backend_errors: int = 0
    statuses: Counter = field(default_factory=Counter)
    backends: Counter = field(default_factory=Counter)  # answers per backend

    def count_status(self, status: int) -> None:
        self.statuses[status] += 1

    def snapshot(self, admission: Admission) -> dict:
        return {
            "requests": self.requests,
            "tokens_generated": self.tokens_generated,
            "filtered": {
                "refusals": self.refusals,
                "redacted_answers": self.redacted_answers,
                "redactions": self.redactions,
            },
            "generating": admission.active,
            "queue_length": admission.waiting,
            "max_concurrency": admission.limit,
            "max_queue": admission.queue,
            "answers_by_backend": dict(self.backends),
            "backend_errors": self.backend_errors,
            "errors_by_status": {str(k): v for k, v in sorted(self.statuses.items()) if k >= 400},
        }


class ServiceHeaders:
    """Adds the security headers to every response and counts responses by status."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                self.metrics.count_status(message["status"])
            await send(message)

        await self.app(scope, receive, send_with_headers)


def api_key_from_env(api_key_env: str | None, host: str) -> bytes | None:
    """The key from the environment variable named `api_key_env` (which must then be set); required off loopback."""
    key = os.environ.get(api_key_env, "") if api_key_env else ""
    if api_key_env and not key:
        raise WenmaiError(f"serve: the environment variable {api_key_env} is empty or not set; set it to the API key")
    if not key and not is_loopback(host):
        raise WenmaiError(
            f"serve: listening on {host} (beyond this machine) needs an API key: put it in an environment variable "
            "and name that variable with --api-key-env (the key itself never goes on the command line)"
        )
    return key.encode() if key else None
