"""Personal data in Chinese and English text: detect, then mask with typed placeholders or report.

Written here rather than taken from a library: Presidio needs spaCy models fetched from outside the
package registries and has no recognisers for Chinese ids or phone numbers; `phonenumbers` finds the
same phone numbers but ran at about 1.5 MB/s on our machine (these regexes run at tens of MB/s, and
every training stage scrubs); python-stdnum only validates a number you already found. What is left
is regular expressions for candidates and a checksum or structural test for each, so look-alikes
(an 18-digit number with a bad check digit, a year range, a museum accession number) stay.

Counts are by type; the matched text itself is never returned, logged or written.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import WenmaiError

PLACEHOLDERS = {
    "id_card": "<ID_CARD>",
    "mobile": "<PHONE>",
    "landline": "<PHONE>",
    "email": "<EMAIL>",
    "bank_card": "<BANK_CARD>",
    "passport": "<PASSPORT>",
    "ip": "<IP>",
    "person": "<PERSON>",
}
Span = tuple[int, int]
Finder = Callable[[str], Iterable[Span]]

_NOT_ALNUM_BEFORE = r"(?<![0-9A-Za-z])"
_NOT_ALNUM_AFTER = r"(?![0-9A-Za-z])"
_ID_CARD = re.compile(
    _NOT_ALNUM_BEFORE
    + r"[1-8]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
    + _NOT_ALNUM_AFTER
)
_MOBILE = re.compile(_NOT_ALNUM_BEFORE + r"(?:(?:\+|00)86[ -]?)?1[3-9]\d(?:[ -]?\d{4}){2}(?!\d)")
_AREA = r"(?:10|2\d|[3-9]\d{2})"  # 010, 02x, then four-digit codes 03xx-09xx
_LANDLINE = re.compile(
    _NOT_ALNUM_BEFORE + r"(?:(?:\+|00)86[ -]?\(?0?" + _AREA + r"\)?|\(0" + _AREA + r"\)|0" + _AREA + r")"
    r"[ -]?[2-9]\d{2,3}[ -]?\d{4}(?!\d)"
)
_EMAIL = re.compile(r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,24}(?![A-Za-z0-9-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_CARD_PREFIX = re.compile(r"62|4|5[1-5]|2[2-7]|3[47]|35|30|36|38|6011|65")
_PASSPORT_CN = re.compile(_NOT_ALNUM_BEFORE + r"(?:[EG]\d{8}|E[A-HJ-NP-Z]\d{7})" + _NOT_ALNUM_AFTER)
_PASSPORT_LABELLED = re.compile(
    r"(?:护照(?:号码?)?|通行证(?:号码?)?|passport(?:\s*(?:no\.?|number|#))?)[\s:：#号为是]{0,4}"
    r"([A-Z]{1,2}\d{6,9}|\d{9})" + _NOT_ALNUM_AFTER,
    re.IGNORECASE,
)
_IPV4 = re.compile(
    r"(?<![0-9A-Za-z.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![0-9A-Za-z]|\.\d)"
)
_IPV6 = re.compile(r"(?<![0-9A-Za-z:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![0-9A-Za-z:])")
# Context, as for passports. A bare 11-digit number from 13 to 19 is also a count or an inventory number: it is
# a phone number unless the words around it make it one of those (编号/登记号/inventory before it, 件/字节/copies
# after it) and no phone word (电话, tel) stands near. A dotted quad of small numbers is also a section or version
# number (2.1.3.4): it counts only after a word that introduces an address, before a port, or with a three-digit
# part; after a section or version word (第, section, version) never. +86 and 138-1234-5678 count anywhere.
_CUE_BEFORE = 24  # characters searched for a cue before a candidate (about four English words)
_CUE_AFTER = 8  # ... and after it
_PHONE_CUE = re.compile(
    r"电话|手机|联系|致电|拨打|来电|热线|微信|短信|号码"
    r"|(?<![a-z])(?:tel|phone|mobile|cell|call|contact|sms|whatsapp|wechat)(?![a-z])"
)
_IP_CUE = re.compile(
    r"地址|服务器|主机|网关|路由|代理|客户端|来自|日志|访问|请求"
    r"|(?<![a-z])(?:ip|ipv4|address|addr|server|host|gateway|router|proxy|client|dns|ping|from|log|logs)(?![a-z])"
)
_NOT_PHONE_BEFORE = re.compile(
    r"(?:号|共|计|约|总数|(?<![a-z])(?:no|inv|inventory|accession|catalogue|catalog|object|item|isbn|total)\.?)\W{0,3}$"
)
_NOT_PHONE_AFTER = re.compile(
    r"^\s?(?:字节|[元件册人次字个页张枚条米克吨]|(?:bytes?|items?|copies|visitors|people|yuan|rmb)(?![a-z]))"
)
_NOT_IP_BEFORE = re.compile(
    r"(?:第|§|版本|表|图|(?<![a-z])(?:section|sec|chapter|ch|version|ver|release|build|clause|article|art|fig|figure|"
    r"table|para|no|vol)(?![a-z]))\W{0,3}$"
)
_NOT_IP_AFTER = re.compile(r"^\s?[节条章款项版]")
_MAYBE_PII = re.compile(r"[\d@:]")  # every detector but names needs a digit, an @ or a colon
# full-width letters, digits and signs (１３８…, ＠) folded to ASCII one for one, so offsets stay the same
_FULL_WIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def id_card_valid(number: str) -> bool:
    """A mainland resident id (18 characters): a real birth date and the ISO 7064 MOD 11-2 check digit."""
    try:
        datetime.date(int(number[6:10]), int(number[10:12]), int(number[12:14]))
    except ValueError:
        return False
    total = sum(int(d) * w for d, w in zip(number[:17], _ID_WEIGHTS, strict=True))
    return "10X98765432"[total % 11] == number[17].upper()


def luhn_valid(digits: str) -> bool:
    """The Luhn check every payment card number carries."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def find_id_cards(text: str) -> Iterator[Span]:
    for m in _ID_CARD.finditer(text):
        if id_card_valid(m.group()):
            yield m.span()


def _cue(pattern: re.Pattern, text: str, start: int, end: int) -> bool:
    """Whether a cue word stands just before or just after text[start:end] (case-insensitive)."""
    around = text[max(0, start - _CUE_BEFORE) : start] + " " + text[end : end + _CUE_AFTER]
    return pattern.search(around.lower()) is not None


def find_mobiles(text: str) -> Iterator[Span]:
    for m in _MOBILE.finditer(text):
        start, end = m.span()
        spelled_as_phone = not m.group().isdigit()  # +86 / 0086 in front, or split 138 1234 5678 / 138-1234-5678
        if not spelled_as_phone and not _cue(_PHONE_CUE, text, start, end):
            before, after = text[max(0, start - _CUE_BEFORE) : start].lower(), text[end : end + _CUE_AFTER].lower()
            if _NOT_PHONE_BEFORE.search(before) or _NOT_PHONE_AFTER.match(after):
                continue  # 藏品总登记号13912345678, 共15012345678字节, Inventory 18612345678
        yield start, end


def find_landlines(text: str) -> Iterator[Span]:
    for m in _LANDLINE.finditer(text):
        yield m.span()


def find_emails(text: str) -> Iterator[Span]:
    for m in _EMAIL.finditer(text):
        yield m.span()


def find_bank_cards(text: str) -> Iterator[Span]:
    for m in _CARD.finditer(text):
        digits = re.sub(r"[ -]", "", m.group())
        if 13 <= len(digits) <= 19 and _CARD_PREFIX.match(digits) and luhn_valid(digits):
            yield m.span()


def find_passports(text: str) -> Iterator[Span]:
    for m in _PASSPORT_CN.finditer(text):
        yield m.span()
    for m in _PASSPORT_LABELLED.finditer(text):
        yield m.span(1)


def find_ips(text: str) -> Iterator[Span]:
    for m in _IPV4.finditer(text):
        start, end = m.span()
        before, after = text[max(0, start - _CUE_BEFORE) : start].lower(), text[end : end + _CUE_AFTER]
        if _NOT_IP_BEFORE.search(before) or _NOT_IP_AFTER.match(after):
            continue  # 第2.1.3.4节, version 10.0.2.1
        with_port = re.match(r"[:/]\d", after) is not None  # 10.0.0.1:8080, 10.0.0.0/8
        if with_port or any(len(part) == 3 for part in m.group().split(".")) or _cue(_IP_CUE, text, start, end):
            yield m.span()
    for m in _IPV6.finditer(text):
        candidate = m.group()
        if sum(1 for g in candidate.split(":") if g) < 2:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield m.span()


FINDERS: dict[str, Finder] = {
    # order breaks ties between spans of equal length at the same place
    "email": find_emails,
    "id_card": find_id_cards,
    "bank_card": find_bank_cards,
    "passport": find_passports,
    "ip": find_ips,
    "mobile": find_mobiles,
    "landline": find_landlines,
}


class NameList:
    """The `list` person-name detector: names from a file (donors, staff), matched as whole words in Latin script."""

    def __init__(self, names: Iterable[str]):
        names = sorted({n.strip() for n in names if len(n.strip()) >= 2}, key=len, reverse=True)
        parts = [rf"(?<![A-Za-z]){re.escape(n)}(?![A-Za-z])" if n.isascii() else re.escape(n) for n in names]
        self._pattern = re.compile("|".join(parts)) if parts else None

    @classmethod
    def from_file(cls, path: str | Path) -> NameList:
        path = Path(path)
        if not path.is_file():
            raise WenmaiError(f"data.policy.pii.name_list: {path} not found; give a file with one name per line")
        return cls(path.read_text(encoding="utf-8").splitlines())

    def __call__(self, text: str) -> Iterator[Span]:
        if self._pattern is not None:
            for m in self._pattern.finditer(text):
                yield m.span()


def name_detector(names: str, name_list: str | None) -> Finder | None:
    """The person-name detector a policy names: none, list, or an installed `wenmai.name_detectors` entry point."""
    if names == "none":
        return None
    if names == "list":
        return NameList.from_file(name_list or "")
    from importlib.metadata import entry_points

    found = {ep.name: ep for ep in entry_points(group="wenmai.name_detectors")}
    if names not in found:
        installed = ", ".join(sorted(found)) or "none installed"
        raise WenmaiError(
            f"data.policy.pii.names: no person-name detector {names!r}; use none, list, or an installed "
            f"`wenmai.name_detectors` entry point ({installed})"
        )
    return found[names].load()()  # a factory returning a callable text -> (start, end) spans


@dataclass
class Scrubber:
    """Finds personal data of the chosen types in a text and replaces each with its placeholder."""

    types: tuple[str, ...]
    person: Finder | None = None

    def find(self, text: str) -> list[tuple[int, int, str]]:
        """Non-overlapping (start, end, type) spans, longest first where two overlap."""
        spans: list[tuple[int, int, int, str]] = []
        folded = text.translate(_FULL_WIDTH)
        if _MAYBE_PII.search(folded):
            for rank, (kind, finder) in enumerate(FINDERS.items()):
                if kind in self.types:
                    spans += [(s, e, rank, kind) for s, e in finder(folded)]
        if self.person is not None:
            spans += [(s, e, len(FINDERS), "person") for s, e in self.person(text)]
        spans.sort(key=lambda s: (s[0], s[0] - s[1], s[2]))
        chosen, end = [], -1
        for start, stop, _, kind in spans:
            if start >= end:
                chosen.append((start, stop, kind))
                end = stop
        return chosen

    def scrub(self, text: str) -> tuple[str, Counter]:
        """The text with each finding replaced by its typed placeholder, and the counts by type."""
        found = self.find(text)
        if not found:
            return text, Counter()
        pieces, last = [], 0
        for start, stop, kind in found:
            pieces += [text[last:start], PLACEHOLDERS[kind]]
            last = stop
        pieces.append(text[last:])
        return "".join(pieces), Counter(kind for _, _, kind in found)


def build_scrubber(options) -> Scrubber | None:
    """The scrubber for a policy's `pii` options, or None when scrubbing is off."""
    if options.action == "off":
        return None
    return Scrubber(tuple(options.types), name_detector(options.names, options.name_list))
