"""What every page of the review app shares: the app's state, rendering in the reader's language, who is signed
in, CSRF tokens, refusals as pages, and the security headers on every response."""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from babel.support import Translations
from fastapi import Request
from fastapi.responses import HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader
from starlette.datastructures import FormData, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finetune.review.schema import Reviewer
from finetune.review.store import ReviewStore
from finetune.review_app.i18n import DEFAULT_LANGUAGE, HTML_LANG, LANGUAGES, N_, Gettext
from finetune.review_app.ratelimit import RateLimiter

TEMPLATES = Path(__file__).parent / "templates"
LANGUAGE_COOKIE = "wenmai_lang"
MAX_FORM_BYTES = 2 * 1024 * 1024  # a review with a long corrected answer is a few kB
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'",  # no inline scripts or styles: they live in static/
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass
class ReviewApp:
    """One app's state: its store (opened once), catalogues, sign-in limiter and where exports go."""

    db: str
    store: ReviewStore
    translations: dict[str, Translations]
    limiter: RateLimiter
    export_dir: Path
    secure_cookies: bool
    templates: Environment = field(default_factory=lambda: templates_environment())


class Refused(Exception):
    """A request the app refuses, shown as a page: `message` is a msgid, translated with `params` when shown."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, **params: object):
        super().__init__(message)
        self.status, self.message, self.headers, self.params = status, message, headers or {}, params


class NotSignedIn(Exception):
    """No one is signed in: a page (GET) sends the reader to /login, anything else is answered 401."""


def templates_environment() -> Environment:
    """Jinja2 with autoescape on for every template (all are HTML)."""
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["segment"] = lambda value: quote(str(value), safe="")
    return env


def state(request: Request) -> ReviewApp:
    """The app's `ReviewApp`."""
    return request.app.state.review


def language(request: Request) -> str:
    """The reader's language: the cookie set by /lang/{code}, else Chinese."""
    chosen = request.cookies.get(LANGUAGE_COOKIE, DEFAULT_LANGUAGE)
    return chosen if chosen in LANGUAGES else DEFAULT_LANGUAGE


def gettext(request: Request) -> Gettext:
    """This request's `_` (each request its own: requests run concurrently)."""
    return state(request).translations[language(request)].gettext


def render(
    request: Request, template: str, status_code: int = 200, headers: dict | None = None, **context
) -> HTMLResponse:
    """A page from `template` in the reader's language, with who is signed in and the form token."""
    code = language(request)
    page = state(request).templates.get_template(template)
    html = page.render(
        _=gettext(request),
        lang=HTML_LANG[code],
        language=code,
        user=request.session.get("user"),
        role=request.session.get("role"),
        csrf=csrf_token(request),
        **context,
    )
    return HTMLResponse(html, status_code=status_code, headers=headers)


def signed_in(request: Request) -> Reviewer:
    """The signed-in reviewer, still active in the store (a disabled account is signed out at once)."""
    name = request.session.get("user")
    reviewer = state(request).store.reviewer(name) if name else None
    if reviewer is None or not reviewer.active:
        if name:
            request.session.clear()
        raise NotSignedIn()
    if request.session.get("role") != reviewer.role:  # the store's word, not the cookie's
        request.session["role"] = reviewer.role
    return reviewer


def signed_in_admin(request: Request) -> Reviewer:
    """The signed-in reviewer when an admin, else 403."""
    reviewer = signed_in(request)
    if reviewer.role != "admin":
        raise Refused(403, N_("Only an administrator can open this page."))
    return reviewer


def csrf_token(request: Request) -> str:
    """This session's form token, made when first needed (the sign-in page makes it for the sign-in form)."""
    token = request.session.get("csrf")
    if not token:
        token = request.session["csrf"] = secrets.token_urlsafe(32)
    return token


def check_csrf(request: Request, form: FormData) -> None:
    """Refuse (403) a form whose token is missing or not this session's."""
    sent, expected = form.get("csrf"), request.session.get("csrf")
    if not (isinstance(sent, str) and expected and hmac.compare_digest(sent.encode(), expected.encode())):
        raise Refused(403, N_("This form has expired or did not come from this site. Reload the page and try again."))


async def read_form(request: Request) -> FormData:
    """The posted form (a dependency: parsed before a sync endpoint runs in the thread pool)."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_FORM_BYTES:
        raise Refused(413, N_("The form is too large."))
    return await request.form()


def text_field(form: FormData, name: str) -> str:
    """A text field as sent (an upload or a missing field reads as empty)."""
    value = form.get(name)
    return value if isinstance(value, str) else ""


def safe_next(target: str | None) -> str:
    """`target` when it is a path on this site, else "/" (never a redirect to another site)."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    return target if not parts.scheme and not parts.netloc else "/"


def redirect(url: str) -> RedirectResponse:
    """A 303 to `url`: after a form, the browser asks for the next page with GET."""
    return RedirectResponse(url, status_code=303)


async def refused_page(request: Request, error: Refused) -> HTMLResponse:
    """A refusal as a page in the reader's language."""
    _ = gettext(request)
    message = _(error.message) % error.params if error.params else _(error.message)
    return render(request, "error.html", error.status, error.headers, status=error.status, message=message)


async def sign_in_first(request: Request, _error: NotSignedIn):
    """GET: to the sign-in page, coming back here after; anything else: 401."""
    if request.method in ("GET", "HEAD"):
        here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return redirect(f"/login?next={quote(here, safe='')}")
    _ = gettext(request)
    message = _("Sign in first.")
    return render(request, "error.html", 401, status=401, message=message)


async def http_error_page(request: Request, error) -> HTMLResponse:
    """Starlette's own errors (an unknown address, a wrong method) as a page in the reader's language."""
    _ = gettext(request)
    messages = {404: _("There is no such page."), 405: _("This page does not take that kind of request.")}
    message = messages.get(error.status_code, _("The request could not be handled."))
    return render(
        request,
        "error.html",
        error.status_code,
        getattr(error, "headers", None),
        status=error.status_code,
        message=message,
    )


class SecurityHeaders:
    """Adds the security headers to every response, and keeps signed-in pages out of shared caches."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                if not static:
                    headers["Cache-Control"] = "no-store"
            await send(message)

        await self.app(scope, receive, send_with_headers)
