"""The administrator's pages: each session's progress and agreement, what cleaning would hold back, and exports
(a folder under the export directory, downloadable as a zip)."""

from __future__ import annotations

import io
import re
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import FormData

from finetune import reviewing
from finetune.errors import WenmaiError
from finetune.recipe.review import ReviewCleaning
from finetune.review.cleaning import Cleaning, clean
from finetune.review.schema import Session
from finetune.review.store import ReviewStore
from finetune.review_app.i18n import N_
from finetune.review_app.pages import find_session
from finetune.review_app.web import Refused, check_csrf, gettext, read_form, render, signed_in_admin, state

router = APIRouter()
UNSAFE = re.compile(r"[^\w.-]+")
STAMP = "%Y%m%dT%H%M%SZ"
SHOWN_EXPORTS = 20


@dataclass
class SessionSummary:
    """What the admin page shows for one session."""

    session: Session
    items: int
    reviewed: int  # items with at least one review
    complete: int  # items reviewed by K reviewers or more
    reviewers: list[dict]  # {"reviewer", "assigned", "reviewed"}
    cleaning: Cleaning | None
    held_back: dict[int, list[str]]  # reviewed items that cleaning holds back, with the reasons
    problem: str | None = None


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request) -> Response:
    """Every session: progress per reviewer, complete items, agreement before/after cleaning, held-back items."""
    signed_in_admin(request)
    app = state(request)
    summaries = [summarise(app.store, session) for session in app.store.sessions()]
    return render(request, "admin.html", summaries=summaries, exports=recent_exports(app.export_dir))


@router.post("/admin/export/{session:path}", response_class=HTMLResponse)
def export_session(request: Request, session: str, form: FormData = Depends(read_form)) -> Response:
    """Export a session's cleaned feedback (as `wenmai review export` does) to a new folder under export_dir."""
    signed_in_admin(request)
    check_csrf(request, form)
    settings = find_session(request, session)
    app = state(request)
    app.export_dir.mkdir(parents=True, exist_ok=True)
    folder = new_export_folder(app.export_dir, settings.name)
    try:
        written = reviewing.export(app.db, settings.name, folder, log=lambda _line: None)
    except WenmaiError as err:
        _ = gettext(request)
        message = _("The export failed: %(reason)s") % {"reason": err}
        return render(request, "error.html", 400, status=400, message=message)
    files = sorted(path.name for path in folder.iterdir() if path.is_file())
    return render(request, "exported.html", session=settings, export=written, name=folder.name, files=files)


@router.get("/admin/exports/{name}.zip")
def download_export(request: Request, name: str) -> Response:
    """An export folder as a zip; only a folder directly inside export_dir is served."""
    signed_in_admin(request)
    folder = export_folder(state(request).export_dir, name)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                archive.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
    disposition = f"attachment; filename*=UTF-8''{quote(folder.name + '.zip', safe='')}"
    return Response(buffer.getvalue(), media_type="application/zip", headers={"Content-Disposition": disposition})


def summarise(store: ReviewStore, session: Session) -> SessionSummary:
    """One session's progress and what cleaning (its default options) makes of the reviews so far."""
    items = store.items(session.name)
    reviews = store.latest_reviews(session.name)
    per_item = Counter(review.item_id for review in reviews)
    cleaning, problem = None, None
    if reviews:
        try:
            cleaning = clean(items, reviews, session.dimension_names, ReviewCleaning())
        except WenmaiError as err:
            problem = str(err)
    held = {i: reasons for i, reasons in (cleaning.held_back if cleaning else {}).items() if per_item[i]}
    return SessionSummary(
        session=session,
        items=len(items),
        reviewed=sum(1 for item in items if per_item[item.id]),
        complete=sum(1 for item in items if per_item[item.id] >= session.reviewers_per_item),
        reviewers=store.session_progress(session.name),
        cleaning=cleaning,
        held_back=held,
        problem=problem,
    )


def new_export_folder(export_dir: Path, session: str) -> Path:
    """`<session>-<UTC time>` inside export_dir, the session's name made safe for a folder; never an existing one."""
    stem = f"{UNSAFE.sub('_', session).strip('._') or 'session'}-{datetime.now(timezone.utc).strftime(STAMP)}"
    folder, n = export_dir / stem, 1
    while folder.exists():
        n += 1
        folder = export_dir / f"{stem}-{n}"
    return folder


def export_folder(export_dir: Path, name: str) -> Path:
    """The export called `name`: a folder directly inside export_dir (no path, no hidden or half-written one)."""
    root = export_dir.resolve()
    folder = (export_dir / name).resolve() if name and "/" not in name and "\\" not in name else None
    if folder is None or name.startswith(".") or folder.parent != root or not folder.is_dir():
        raise Refused(404, N_("There is no export called %(name)s."), name=name)
    return folder


def recent_exports(export_dir: Path) -> list[str]:
    """The newest export folders' names (hidden ones are exports still being written)."""
    if not export_dir.is_dir():
        return []
    folders = [p for p in export_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)[:SHOWN_EXPORTS]]
