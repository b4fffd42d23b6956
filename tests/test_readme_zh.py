"""README.zh-CN.md keeps in step with README.md: the same commands and recipes, the real quickstart recipe."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"^(wenmai|pip|pytest|python -m pytest|bash)(?=\s|$)")
RECIPE = re.compile(r"recipes/[\w./-]+\.yaml")
GUIDE = "## 博物馆与出版社指南"


def test_both_readmes_name_the_same_commands_and_recipes():
    english, chinese = _english_mirrored(), _read("README.zh-CN.md").split(GUIDE)[0]
    assert commands(english) == commands(chinese), _difference(commands(english), commands(chinese))
    assert set(RECIPE.findall(english)) == set(RECIPE.findall(chinese))
    assert {"wenmai run", "wenmai validate", "pytest"} <= commands(chinese), "the first screen's commands"


def test_the_guide_names_only_commands_and_recipes_the_english_readme_documents():
    guide = _read("README.zh-CN.md").split(GUIDE)[1]
    english = _read("README.md")
    assert commands(guide) and commands(guide) <= commands(english), commands(guide) - commands(english)
    assert set(RECIPE.findall(guide)) <= set(RECIPE.findall(english))


def test_the_recipe_blocks_show_the_real_quickstart_recipe():
    quickstart = _read("recipes/quickstart.yaml")
    for readme in ("README.md", "README.zh-CN.md"):
        blocks = re.findall(r"```yaml\n(.*?)```", _read(readme), re.S)
        assert quickstart in blocks, f"{readme} shows a quickstart recipe that is not recipes/quickstart.yaml"


def test_the_readmes_link_each_other_and_the_guide():
    assert "(README.zh-CN.md)" in _read("README.md") and "博物馆与出版社指南" in _read("README.md")
    chinese = _read("README.zh-CN.md")
    assert "(README.md)" in chinese and "(#博物馆与出版社指南)" in chinese
    for topic in ("带着权利信息的数据", "专家评审", "门槛", "导出与交付", "人工智能生成内容标识"):
        assert re.search(rf"^### \d\. {topic}", chinese.split(GUIDE)[1], re.M), topic


def test_the_chinese_readme_is_written_in_chinese():
    prose = re.sub(r"```.*?```|`[^`\n]*`|\([^)\s]*\)", "", _read("README.zh-CN.md"), flags=re.S)
    letters = [c for c in prose if c.isalpha()]
    han = [c for c in letters if "\u4e00" <= c <= "\u9fff"]
    assert len(han) / len(letters) > 0.7, f"{len(han)} Han characters of {len(letters)} letters outside code"


def commands(text: str) -> set[str]:
    """Commands in code blocks and inline code: `wenmai` by its subcommand path, others by their whole line."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    lines = [line for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) for line in block.splitlines()]
    found = set()
    for line in lines + spans:
        line = re.sub(r"\s+#.*$", "", line.strip().lstrip("#").strip())  # comments, and commands inside them
        line = re.sub(r"^([A-Z_]+=\S+\s+)+", "", line)  # VAR=... wenmai ...
        if COMMAND.match(line):
            found.add(_normal(line))
    return found


def _normal(line: str) -> str:
    words = line.split()
    if words[0] != "wenmai":
        return " ".join(words)
    path = ["wenmai"]
    for word in words[1:3]:
        if not re.fullmatch(r"[a-z][a-z-]*", word):
            break
        path.append(word)
    return " ".join(path)


def _english_mirrored() -> str:
    """What the Chinese README mirrors: up to the code map (set-up, quickstart, tests, the recipe walk-through),
    and installing on a GPU machine."""
    text = _read("README.md")
    gpu = text.split("## Installing on a GPU machine")[1].split("\n## ")[0]
    return text.split("## Code map")[0] + gpu


def _difference(english: set[str], chinese: set[str]) -> str:
    return f"only in README.md: {sorted(english - chinese)}; only in README.zh-CN.md: {sorted(chinese - english)}"


def _read(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")
