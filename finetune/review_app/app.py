"""The curator review app: server-rendered pages over the review store, in Chinese by default (English on request).

    app = create_app("review.db", secret_key=os.environ["WENMAI_REVIEW_SECRET"])

Every page needs a signed-in reviewer, on loopback too; sessions live in a signed cookie (`wenmai_review`,
same-site strict, 8 hours from sign-in). Every form carries a per-session CSRF token, and every response the
security headers of `web.SECURITY_HEADERS`.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from finetune.review.store import ReviewStore
from finetune.review_app import admin, pages
from finetune.review_app.i18n import load_translations
from finetune.review_app.ratelimit import RateLimiter
from finetune.review_app.web import (
    NotSignedIn,
    Refused,
    ReviewApp,
    SecurityHeaders,
    http_error_page,
    refused_page,
    sign_in_first,
)

STATIC = Path(__file__).parent / "static"
SESSION_COOKIE = "wenmai_review"
SESSION_MAX_AGE = 8 * 3600


def create_app(
    db: str,
    secret_key: str | None = None,
    export_dir: Path = Path("review-exports"),
    secure_cookies: bool = False,
    rate_limiter: RateLimiter | None = None,
) -> FastAPI:
    """The review app over the store at `db` (opened once, here; closed when the server stops).

    `secret_key` signs the session cookies. Without one a random key is made, so every sign-in ends when the
    server restarts; give a fixed key (from a secret store, not the command line) to keep sessions across restarts.
    `secure_cookies` marks cookies HTTPS-only: set it when the app sits behind a TLS proxy. `rate_limiter` counts
    failed sign-ins (5 per client address and per pseudonym in 5 minutes by default; tests pass a fake clock).
    """
    store = ReviewStore.open(db)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            store.close()

    app = FastAPI(title="Wenmai review", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.review = ReviewApp(
        db=str(db),
        store=store,
        translations=load_translations(),
        limiter=rate_limiter or RateLimiter(),
        export_dir=Path(export_dir),
        secure_cookies=secure_cookies,
    )
    app.include_router(pages.router)
    app.include_router(admin.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_exception_handler(Refused, refused_page)
    app.add_exception_handler(NotSignedIn, sign_in_first)
    app.add_exception_handler(HTTPException, http_error_page)
    app.add_middleware(
        SessionMiddleware,
        secret_key=secret_key or secrets.token_urlsafe(32),
        session_cookie=SESSION_COOKIE,
        max_age=SESSION_MAX_AGE,
        same_site="strict",
        https_only=secure_cookies,
    )
    app.add_middleware(SecurityHeaders)  # added last: outermost, so refusals and errors get the headers too
    return app
