"""From generated tokens to the answer a reader sees: decoding, stop strings, the banned-terms filter, labels.

Streaming and non-streaming answers go through the same steps, fed token chunk by token chunk, so both give
the same text:

1. `TextDecoder` turns token ids into text deltas (holding back an incomplete UTF-8 character).
2. `AnswerGate` cuts the answer at the request's stop strings and applies the banned-terms filter
   (`reward.rules.banned_pattern`, the word-boundary matcher of the rlhf rules). Text is released only once
   no stop string or banned term can still start in it: it holds back the last `len(longest term)`
   characters. In `redact` mode each match becomes `***` and the rest streams with that small delay. In
   `refuse` mode nothing is released until the answer is complete, because a term at the end refuses the
   whole answer and text already sent cannot be taken back; the reader gets either the answer or the refusal.
3. `explicit_label` / `labelled` add the label the reader sees before or after the answer, never inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from finetune.model_card import EXPLICIT_LABEL

LABEL_ZH, LABEL_EN = (part.strip() for part in EXPLICIT_LABEL.split("·"))  # 本内容由人工智能生成 / AI-generated content
LABEL_SEPARATOR = "\n\n"
REDACTED = "***"
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
LATIN_WORD = re.compile(r"[A-Za-z]+")

LabelPosition = Literal["prefix", "suffix", "none"]
LabelLanguage = Literal["auto", "zh", "en", "both"]
FilterMode = Literal["refuse", "redact"]


class TextDecoder:
    """Incremental detokenisation: text deltas whose concatenation is the decoding of all ids so far."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def feed(self, ids: list[int]) -> str:
        """The new text these ids complete (empty while a multi-byte character is unfinished)."""
        self.ids.extend(ids)
        return self._delta(final=False)

    def finish(self) -> str:
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return ""
        if not text.startswith(self.sent):  # decoding changed earlier text: keep what was sent, add only new text
            common = _common_prefix(text, self.sent)
            text = self.sent + text[common:]
        delta, self.sent = text[len(self.sent) :], text
        return delta


@dataclass
class OutputFilter:
    """Banned terms (compiled by `reward.rules.banned_pattern`) and what to do on a match."""

    pattern: re.Pattern
    longest: int
    mode: FilterMode = "refuse"
    refusal: str = "抱歉，我无法回答这个问题。Sorry, I cannot answer that."


class AnswerGate:
    """Stop strings and the output filter on a growing answer: `feed` raw text, get the text safe to show."""

    def __init__(self, stop: list[str] | None = None, output_filter: OutputFilter | None = None):
        self.stop = [s for s in stop or [] if s]
        self.filter = output_filter
        # a stop string may still complete in the last len-1 characters; a term may still start in the last
        # `longest` ones (or end there without the character that decides its word boundary)
        self.hold = max((len(s) - 1 for s in self.stop), default=0) + (output_filter.longest if output_filter else 0)
        self.raw = ""
        self.released = 0  # characters of `raw` already accounted for in the shown text
        self.shown = ""
        self.stopped = False  # a stop string ended the answer
        self.refused = False
        self.redactions = 0
        self.complete = False  # the final text has been released

    @property
    def done(self) -> bool:
        """Nothing more the model says can change the answer: stop early."""
        return self.stopped or self.refused

    def feed(self, text: str) -> str:
        """The text that can be shown now."""
        if self.done:
            return ""
        self.raw += text
        self._cut_at_stop(len(self.raw) - len(text))
        return self._release(final=self.stopped)

    def finish(self) -> str:
        """The rest of the answer once generation has ended (or the refusal, in refuse mode)."""
        return self._release(final=True)

    def _cut_at_stop(self, new_from: int) -> None:
        if not self.stop:
            return
        start = max(0, new_from - self.hold)
        hits = [i for i in (self.raw.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.raw = self.raw[: min(hits)]
            self.stopped = True

    def _release(self, final: bool) -> str:
        if self.complete:
            return ""
        self.complete = final
        decided = len(self.raw) if final else max(0, len(self.raw) - self.hold)
        if self.filter is None:
            cut = max(self.released, decided)
            out, self.released = self.raw[self.released : cut], cut
            return out
        matches = [m for m in self.filter.pattern.finditer(self.raw) if m.start() < decided]
        if self.filter.mode == "refuse":
            self.refused = self.refused or bool(matches)
            if not final:
                return ""
            return self.filter.refusal if self.refused else self.raw
        cut, parts, position = decided, [], 0
        for match in matches:
            parts += [self.raw[position : match.start()], REDACTED]
            position, cut = match.end(), max(cut, match.end())
        parts.append(self.raw[position:cut])
        rendered = "".join(parts)
        self.redactions = len(matches)
        out, self.shown = rendered[len(self.shown) :], max(rendered, self.shown, key=len)
        return out


def explicit_label(language: LabelLanguage, answer: str, prompt: str, position: LabelPosition) -> str:
    """The label text: fixed by `language`, or by the answer's language when it follows the answer and by the
    prompt's when it precedes it (the answer is not known yet when a streamed prefix is sent)."""
    if language == "both":
        return EXPLICIT_LABEL
    if language == "auto":
        language = "zh" if is_chinese(answer if position == "suffix" else prompt) else "en"
    return LABEL_ZH if language == "zh" else LABEL_EN


def labelled(answer: str, label: str, position: LabelPosition) -> str:
    """The answer with its explicit label around it; the answer itself unchanged."""
    if position == "prefix":
        return label + LABEL_SEPARATOR + answer
    if position == "suffix":
        return answer + LABEL_SEPARATOR + label
    return answer


def is_chinese(text: str) -> bool:
    """Whether `text` is mostly Chinese: at least as many Han characters as Latin words (and some of them)."""
    han = len(CJK.findall(text))
    return han > 0 and han >= len(LATIN_WORD.findall(text))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
