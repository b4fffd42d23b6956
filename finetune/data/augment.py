"""Counterfactual augmentation: a copy of each training record that names a group, with the terms swapped.

Chinese has no word boundaries, so terms are matched by one regular expression whose alternatives are
every term and every protected word, longest first: at each position the longest one wins, so 其他 (a
protected word) is never read as 他, and 男性 is swapped as a whole before 男 is considered. Latin terms
match only as whole words (he is not inside the or Hermitage) and keep their capitalisation. A copy
carries the original's fields (licence, source, rights holder) and `augmented: {from, swaps}`.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any

from finetune.data.layer import NOT_TEXT, TEXT_FIELDS
from finetune.recipe.augment import AugmentSection

AUGMENTED_FIELD = "augmented"
_LATIN = re.compile(r"[A-Za-z0-9]")


@dataclass
class Swapper:
    """Swaps the terms of the pairs both ways in text, leaving protected words and longer words alone."""

    mapping: dict[str, str]
    pattern: re.Pattern
    terms: set[str] = field(default_factory=set)  # the swapped terms (lowercased); the other keys are protected

    @classmethod
    def from_section(cls, section: AugmentSection) -> Swapper:
        """The swapper for `data.augment` (its pairs and protected words)."""
        return cls.build(section.pairs, section.protect)

    @classmethod
    def build(cls, pairs: list[list[str]], protect: list[str] = ()) -> Swapper:
        """Both directions of every pair; the first pair that names a term decides where it goes."""
        mapping: dict[str, str] = {}
        for a, b in pairs:
            mapping.setdefault(a.lower(), b)
            mapping.setdefault(b.lower(), a)
        terms = set(mapping)
        for word in protect:
            mapping.setdefault(word.lower(), word)  # matched, so it hides the terms inside it, and kept
        alternatives = [_alternative(term) for term in sorted(mapping, key=len, reverse=True)]
        return cls(mapping, re.compile("|".join(alternatives), re.IGNORECASE), terms)

    def swap(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with every term swapped, and how often each term was swapped."""
        counts: dict[str, int] = {}

        def replace(match: re.Match) -> str:
            found = match.group(0)
            key = found.lower()
            if key not in self.terms:  # a protected word
                return found
            counts[key] = counts.get(key, 0) + 1
            return _same_case(found, self.mapping[key])

        return self.pattern.sub(replace, text), counts


class TermGroups:
    """Which group a text names, by the terms of each group (matched as `Swapper` matches them)."""

    def __init__(self, groups: dict[str, list[str]], protect: list[str] = ()) -> None:
        self.label = {term.lower(): name for name, terms in groups.items() for term in terms}
        keys = sorted(
            [*self.label, *(w.lower() for w in protect if w.lower() not in self.label)], key=len, reverse=True
        )
        self.pattern = re.compile("|".join(_alternative(k) for k in keys), re.IGNORECASE)

    def of(self, text: str) -> str | None:
        """The one group whose terms the text names; None when it names none, or terms of several groups."""
        found = {
            self.label[m.group(0).lower()] for m in self.pattern.finditer(text) if m.group(0).lower() in self.label
        }
        return next(iter(found)) if len(found) == 1 else None


def pair_groups(pairs: list[list[str]]) -> dict[str, list[str]]:
    """Two groups from term pairs: every pair's first terms, and its second terms; named by the first pair."""
    return {pairs[0][0]: [a for a, _ in pairs], pairs[0][1]: [b for _, b in pairs]}


def augment_records(records: list[dict], fmt: str, swapper: Swapper) -> tuple[list[dict], dict[str, int]]:
    """A swapped copy of every record that names a term (the others get none), and the swaps by term."""
    copies, totals = [], {}
    for index, record in enumerate(records):
        if record.get(AUGMENTED_FIELD):
            continue  # never a copy of a copy
        twin = copy.deepcopy(record)
        swaps: dict[str, int] = {}
        for container, key in text_slots(twin, fmt):
            container[key], counts = swapper.swap(container[key])
            for term, n in counts.items():
                swaps[term] = swaps.get(term, 0) + n
        if not swaps:
            continue
        origin = str(record["id"]) if record.get("id") is not None else f"#{index + 1}"
        if record.get("id") is not None:
            twin["id"] = f"{record['id']}-counterfactual"
        twin[AUGMENTED_FIELD] = {"from": origin, "swaps": swaps}
        copies.append(twin)
        for term, n in swaps.items():
            totals[term] = totals.get(term, 0) + n
    return copies, totals


def record_text(record: dict, fmt: str) -> str:
    """All of a record's text (each message, each field), joined."""
    return "\n".join(container[key] for container, key in text_slots(record, fmt))


def text_slots(record: dict, fmt: str) -> list[tuple[Any, Any]]:
    """(container, key) of every string of the record's text; roles, ids and metadata are not text."""
    slots: list[tuple[Any, Any]] = []
    keys = TEXT_FIELDS.get(fmt) or [k for k in record if k not in NOT_TEXT and k != AUGMENTED_FIELD]
    for key in keys:
        if key in record:
            _walk(record, key, slots)
    return slots


def _walk(container: Any, key: Any, slots: list[tuple[Any, Any]]) -> None:
    value = container[key]
    if isinstance(value, str):
        slots.append((container, key))
    elif isinstance(value, list):
        for i in range(len(value)):
            _walk(value, i, slots)
    elif isinstance(value, dict):
        for k in value:
            if k not in NOT_TEXT:
                _walk(value, k, slots)


def _alternative(term: str) -> str:
    escaped = re.escape(term)
    if _LATIN.search(term[0]):
        escaped = r"(?<![A-Za-z0-9])" + escaped
    if _LATIN.search(term[-1]):
        escaped += r"(?![A-Za-z0-9])"
    return escaped


def _same_case(found: str, replacement: str) -> str:
    if found.isupper() and len(found) > 1:
        return replacement.upper()
    if found[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement
