"""Reviewer accounts: pseudonyms and argon2id password hashes (argon2-cffi, its default parameters)."""

from __future__ import annotations

from finetune.errors import WenmaiError
from finetune.review.schema import Reviewer, Role
from finetune.review.store import ReviewStore

MIN_PASSWORD = 10


def hash_password(password: str) -> str:
    """An argon2id hash of `password` (salted; the password itself is never stored)."""
    from argon2 import PasswordHasher

    if len(password) < MIN_PASSWORD:
        raise WenmaiError(f"the password is too short: use at least {MIN_PASSWORD} characters")
    return PasswordHasher().hash(password)


def check_password(store: ReviewStore, pseudonym: str, password: str) -> Reviewer | None:
    """The reviewer when `password` is theirs and the account is active, else None (no hint which part failed)."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    reviewer = next((r for r in store.reviewers() if r.pseudonym == pseudonym), None)
    if reviewer is None or not reviewer.active:
        return None
    stored = store.password_hash(pseudonym)
    if stored is None:
        return None
    try:
        PasswordHasher().verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    return reviewer


def add_user(store: ReviewStore, pseudonym: str, password: str, role: Role = "reviewer") -> Reviewer:
    """A new account; the password is hashed before it reaches the store."""
    return store.add_reviewer(pseudonym, role, hash_password(password))
