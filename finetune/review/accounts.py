"""Reviewer accounts: pseudonyms and argon2id password hashes (argon2-cffi, its default parameters)."""

from __future__ import annotations

from functools import cache

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

    reviewer = store.reviewer(pseudonym)
    stored = store.password_hash(pseudonym) if reviewer is not None else None
    try:  # an unknown pseudonym costs one verification too, so the answer's timing does not tell who exists
        PasswordHasher().verify(stored or _dummy_hash(), password)
    except (VerificationError, InvalidHashError):
        return None
    if reviewer is None or stored is None or not reviewer.active:
        return None
    return reviewer


@cache
def _dummy_hash() -> str:
    from argon2 import PasswordHasher

    return PasswordHasher().hash("not a password of anyone")


def add_user(store: ReviewStore, pseudonym: str, password: str, role: Role = "reviewer") -> Reviewer:
    """A new account; the password is hashed before it reaches the store."""
    return store.add_reviewer(pseudonym, role, hash_password(password))
