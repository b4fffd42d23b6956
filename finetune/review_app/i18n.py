"""The review app's languages: Chinese by default, English on request, from the .po catalogues in `locale/`.

The catalogues are the source (msgids in English); they are compiled in memory when the app starts, so no .mo
files live in the repository. Each request gets its own `_` (requests run concurrently: no global install).
Find the messages to translate with `extract_messages()` (templates through Jinja's extractor, Python through
babel's); mark a message in Python that is translated later with `N_`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from babel.messages.extract import DEFAULT_KEYWORDS, extract_from_dir
from babel.messages.mofile import write_mo
from babel.messages.pofile import read_po
from babel.support import Translations

PACKAGE = Path(__file__).parent
LOCALE_DIR = PACKAGE / "locale"
LANGUAGES = {"zh": "zh_CN", "en": "en"}  # the code in URLs and the cookie -> the catalogue's folder
HTML_LANG = {"zh": "zh-CN", "en": "en"}
DEFAULT_LANGUAGE = "zh"
METHODS = [("templates/**.html", "jinja2.ext:babel_extract"), ("**.py", "python")]
PLACEHOLDER = re.compile(r"%\(\w+\)[sd]")

Gettext = Callable[[str], str]


def N_(message: str) -> str:
    """Mark `message` for extraction; it is translated where it is shown."""
    return message


def load_translations(locale_dir: Path = LOCALE_DIR) -> dict[str, Translations]:
    """Every language's catalogue, compiled in memory: {"zh": ..., "en": ...}."""
    return {code: _compile(locale_dir / folder / "LC_MESSAGES" / "messages.po") for code, folder in LANGUAGES.items()}


def catalogue(language: str, locale_dir: Path = LOCALE_DIR):
    """The parsed .po catalogue of `language` ("zh" or "en"), for checks."""
    with (locale_dir / LANGUAGES[language] / "LC_MESSAGES" / "messages.po").open("rb") as f:
        return read_po(f, locale=LANGUAGES[language])


def extract_messages(package_dir: Path = PACKAGE) -> set[str]:
    """Every message the app's templates and Python code pass to `_` (or mark with `N_`)."""
    found = extract_from_dir(
        package_dir, method_map=METHODS, options_map={"templates/**.html": {}}, keywords=DEFAULT_KEYWORDS
    )
    messages = set()
    for _filename, _line, message, _comments, _context in found:
        messages.update([message] if isinstance(message, str) else [m for m in message if m])
    return messages


def placeholders(text: str) -> set[str]:
    """The `%(name)s` placeholders in a message: a translation must keep exactly these."""
    return set(PLACEHOLDER.findall(text))


def _compile(po_file: Path) -> Translations:
    with po_file.open("rb") as f:
        parsed = read_po(f)
    buffer = BytesIO()
    write_mo(buffer, parsed)
    buffer.seek(0)
    return Translations(buffer)
