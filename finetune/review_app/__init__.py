"""The curator review web app: reviewers score a model's answers per reward dimension in their browser; admins
follow progress and agreement and export the cleaned feedback. `serve(db)` runs it; `create_app(db)` builds it."""

from finetune.review_app.app import create_app
from finetune.review_app.server import serve

__all__ = ["create_app", "serve"]
