"""The reviewer's pages: sign in and out, the sessions with their progress, the next item, and the review form.

A reviewer sees only items assigned to them and only their own earlier judgements, never another reviewer's.
"""

from __future__ import annotations

import math
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.datastructures import FormData

from finetune.review.accounts import check_password
from finetune.review.schema import FLAGS, Item, Reviewer, Session
from finetune.review.store import ReviewError
from finetune.review_app.forms import FLAG_LABELS, FormError, ReviewForm
from finetune.review_app.i18n import LANGUAGES, N_
from finetune.review_app.web import (
    LANGUAGE_COOKIE,
    Refused,
    check_csrf,
    gettext,
    read_form,
    redirect,
    render,
    safe_next,
    signed_in,
    state,
    text_field,
)

router = APIRouter()
LANGUAGE_COOKIE_AGE = 365 * 24 * 3600


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/") -> Response:
    """The sign-in form (its CSRF token is made here, before anyone is signed in)."""
    return render(request, "login.html", next=safe_next(next), pseudonym="")


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, form: FormData = Depends(read_form)) -> Response:
    """Sign in with a pseudonym and password; failures are counted per client address and per pseudonym."""
    check_csrf(request, form)
    app, _ = state(request), gettext(request)
    pseudonym, password = text_field(form, "pseudonym").strip(), text_field(form, "password")
    target = safe_next(text_field(form, "next"))
    address = request.client.host if request.client else "unknown"
    keys = [f"address:{address}", f"pseudonym:{pseudonym}"]
    wait = app.limiter.retry_after(keys)
    if wait is not None:
        minutes = max(1, math.ceil(wait / 60))
        message = _("Too many failed sign-ins: signing in is locked for %(minutes)d min.") % {"minutes": minutes}
        headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        return render(request, "login.html", 429, headers, error=message, next=target, pseudonym=pseudonym)
    reviewer = check_password(app.store, pseudonym, password) if pseudonym and password else None
    if reviewer is None:
        app.limiter.failed(keys)
        message = _("The pseudonym or the password is wrong, or the account is disabled.")
        return render(request, "login.html", error=message, next=target, pseudonym=pseudonym)
    app.limiter.forget(f"pseudonym:{pseudonym}")
    request.session.clear()  # a fresh session (and form token) for the signed-in reviewer
    request.session.update(user=reviewer.pseudonym, role=reviewer.role)
    return redirect(target)


@router.post("/logout")
def logout(request: Request, form: FormData = Depends(read_form)) -> Response:
    """Sign out (the form carries its token like every other)."""
    signed_in(request)
    check_csrf(request, form)
    request.session.clear()
    return redirect("/login")


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> Response:
    """The sessions, each with this reviewer's progress n / N."""
    me = signed_in(request)
    store = state(request).store
    sessions = [(s, *store.progress(s.name, me.pseudonym)) for s in store.sessions()]
    return render(request, "home.html", sessions=sessions)


@router.get("/s/{session:path}/next")
def next_item(request: Request, session: str) -> Response:
    """To this reviewer's next item (assigning one when needed), or a page saying nothing is left."""
    me = signed_in(request)
    settings = find_session(request, session)
    store = state(request).store
    item = store.next_item(settings.name, me.pseudonym)
    if item is None:
        done, total = store.progress(settings.name, me.pseudonym)
        return render(request, "done.html", session=settings, done=done, total=total)
    return redirect(item_url(settings.name, item.id))


@router.get("/s/{session:path}/item/{item_id:int}", response_class=HTMLResponse)
def item_page(request: Request, session: str, item_id: int) -> Response:
    """The review form of one assigned item, prefilled with this reviewer's own latest version."""
    me = signed_in(request)
    settings, item = assigned_item(request, session, item_id, me)
    previous = state(request).store.latest_review(item.id, me.pseudonym)
    return review_page(request, settings, item, me, ReviewForm.from_review(previous), previous is not None)


@router.post("/s/{session:path}/item/{item_id:int}", response_class=HTMLResponse)
def submit_review(request: Request, session: str, item_id: int, form: FormData = Depends(read_form)) -> Response:
    """Store the reviewer's next version of this item's review, then go to the next item; 400 when a field is bad."""
    me = signed_in(request)
    check_csrf(request, form)
    settings, item = assigned_item(request, session, item_id, me)
    values = ReviewForm.from_form(form)
    _ = gettext(request)
    try:
        state(request).store.submit_review(item.id, me.pseudonym, values.review(form))
    except FormError as err:
        message = _(err.message) % err.params
        return review_page(request, settings, item, me, values, False, message, 400)
    except ReviewError as err:  # the store's check: names the field (scores.A.accuracy) and what is allowed
        message = _("Not stored: %(reason)s") % {"reason": err}
        return review_page(request, settings, item, me, values, False, message, 400)
    return redirect(f"/s/{quote_segment(settings.name)}/next")


@router.get("/lang/{code}")
def choose_language(request: Request, code: str) -> Response:
    """Set the language cookie and go back to the page the reader came from (on this site only)."""
    if code not in LANGUAGES:
        raise Refused(404, N_("There is no such language: choose zh or en."))
    back = "/"
    referer = urlsplit(request.headers.get("referer", ""))
    here = urlsplit(str(request.base_url))
    if (referer.scheme, referer.netloc) == (here.scheme, here.netloc):
        back = safe_next(referer.path + (f"?{referer.query}" if referer.query else ""))
    response = RedirectResponse(back, status_code=303)
    response.set_cookie(
        LANGUAGE_COOKIE,
        code,
        max_age=LANGUAGE_COOKIE_AGE,
        httponly=True,
        samesite="lax",
        secure=state(request).secure_cookies,
    )
    return response


def review_page(
    request: Request,
    session: Session,
    item: Item,
    me: Reviewer,
    values: ReviewForm,
    edited: bool,
    error: str | None = None,
    status_code: int = 200,
) -> Response:
    """The review form of `item` with `values` filled in, and the reviewer's progress."""
    done, total = state(request).store.progress(session.name, me.pseudonym)
    return render(
        request,
        "item.html",
        status_code,
        session=session,
        item=item,
        values=values,
        edited=edited,
        error=error,
        done=done,
        total=total,
        flags=[(flag, FLAG_LABELS.get(flag, flag)) for flag in FLAGS],
        action=item_url(session.name, item.id),
    )


def find_session(request: Request, name: str) -> Session:
    """The session called `name`, else 404."""
    store = state(request).store
    if not store.has_session(name):
        raise Refused(404, N_("There is no review session called %(name)s."), name=name)
    return store.session(name)


def assigned_item(request: Request, session: str, item_id: int, me: Reviewer) -> tuple[Session, Item]:
    """The session and item, when the item is in it (else 404) and assigned to `me` (else 403)."""
    settings = find_session(request, session)
    store = state(request).store
    try:
        item = store.item(item_id)
    except ReviewError:
        item = None
    if item is None or item.session != settings.name:
        raise Refused(404, N_("There is no item %(item)s in this session."), item=item_id)
    if not store.is_assigned(item.id, me.pseudonym):
        raise Refused(403, N_("This item is not assigned to you."))
    return settings, item


def item_url(session: str, item_id: int) -> str:
    """The address of an item's review form."""
    return f"/s/{quote_segment(session)}/item/{item_id}"


def quote_segment(text: str) -> str:
    """`text` as one path segment (a session name may hold any character)."""
    return quote(text, safe="")
