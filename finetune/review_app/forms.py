"""The review form: its fields to a `ReviewInput` (the store checks scores, dimensions and labels), and a review
back to field values to prefill the form. Field names: `score.<answer>.<dimension>` (1-5), `choice` (A, B, tie),
`corrected_answer`, `flag` (repeated), `comment`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import ValidationError
from starlette.datastructures import FormData

from finetune.review.schema import FLAGS, Review, ReviewInput
from finetune.review_app.i18n import N_

SCORE_PREFIX = "score."
CHOICES = ("A", "B", "tie")
INTEGER = re.compile(r"[+-]?\d{1,9}")
FLAG_LABELS = {
    "factual_error": N_("Factual error"),
    "sensitive": N_("Sensitive content"),
    "rights_problem": N_("Rights problem"),
}


class FormError(Exception):
    """A form field that cannot become a review; `message` is a msgid, translated with `params` when shown."""

    def __init__(self, message: str, **params: object):
        super().__init__(message)
        self.message, self.params = message, params


@dataclass
class ReviewForm:
    """The form's values as text, as sent or as prefilled from the reviewer's latest version."""

    scores: dict[str, dict[str, str]] = field(default_factory=dict)  # {answer: {dimension: "1".."5"}}
    choice: str = ""
    corrected_answer: str = ""
    flags: list[str] = field(default_factory=list)
    comment: str = ""

    @classmethod
    def from_review(cls, review: Review | None) -> ReviewForm:
        """The form prefilled with `review` (the reviewer's own latest version), or empty."""
        if review is None:
            return cls()
        return cls(
            scores={label: {dim: str(value) for dim, value in dims.items()} for label, dims in review.scores.items()},
            choice=review.choice or "",
            corrected_answer=review.corrected_answer or "",
            flags=list(review.flags),
            comment=review.comment or "",
        )

    @classmethod
    def from_form(cls, form: FormData) -> ReviewForm:
        """The values as posted, kept for showing the form again; malformed score names are kept for `review`."""
        values = cls()
        for name, value in form.multi_items():
            text = value if isinstance(value, str) else ""
            if name.startswith(SCORE_PREFIX):
                label, _, dimension = name.removeprefix(SCORE_PREFIX).partition(".")
                values.scores.setdefault(label, {}).setdefault(dimension, text)
            elif name == "flag":
                values.flags.append(text)
            elif name in ("choice", "corrected_answer", "comment"):
                setattr(values, name, _plain_newlines(text))
        return values

    def review(self, form: FormData) -> ReviewInput:
        """The review the form asks to store; a malformed field is a `FormError` naming it."""
        scores: dict[str, dict[str, int]] = {}
        for name, value in form.multi_items():
            if not name.startswith(SCORE_PREFIX):
                continue
            label, _, dimension = name.removeprefix(SCORE_PREFIX).partition(".")
            if not label or not dimension:
                raise FormError(N_("%(field)s: a score field is named score.<answer>.<dimension>"), field=name)
            text = value.strip() if isinstance(value, str) else ""
            if not INTEGER.fullmatch(text):
                raise FormError(N_("%(field)s: %(value)s is not a whole number from 1 to 5"), field=name, value=text)
            if dimension in scores.get(label, {}):
                raise FormError(N_("%(field)s: given twice; give one score"), field=name)
            scores.setdefault(label, {})[dimension] = int(text)
        if self.choice not in ("", *CHOICES):
            raise FormError(N_("choice: %(value)s is not A, B or tie"), value=self.choice)
        for flag in self.flags:
            if flag not in FLAGS:
                raise FormError(N_("flag: %(value)s is not a known flag"), value=flag)
        try:
            return ReviewInput(
                scores=scores,
                choice=self.choice or None,
                corrected_answer=self.corrected_answer if self.corrected_answer.strip() else None,
                flags=list(dict.fromkeys(self.flags)),
                comment=self.comment if self.comment.strip() else None,
            )
        except ValidationError as err:  # every field is checked above; kept as a net, naming the field
            first = err.errors()[0]
            raise FormError(
                N_("%(field)s: %(value)s"), field=".".join(map(str, first["loc"])), value=first["msg"]
            ) from None

    def checked(self, label: str, dimension: str, score: int) -> bool:
        """Whether the score radio (answer, dimension, score) starts checked."""
        return self.scores.get(label, {}).get(dimension) == str(score)


def _plain_newlines(text: str) -> str:
    """Browsers send a textarea's line breaks as CRLF; the text the reviewer typed has plain ones."""
    return text.replace("\r\n", "\n")
