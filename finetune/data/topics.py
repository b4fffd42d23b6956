"""The institution's sensitive-topic list (data, supplied by the user) and matching records against it.

The list is a YAML file:

    topics:
      human_remains:
        description: Human remains and funerary objects (ICOM Code of Ethics 4.3, 4.4)
        keywords: [遗骸, 木乃伊, human remains, mummy]

A record matches a topic when its `topics` metadata names it, or its text contains one of the
topic's keywords (case-insensitive).
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.errors import WenmaiError


class Topic(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    keywords: list[str] = Field(default_factory=list)


class TopicFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topics: dict[str, Topic]


class TopicList:
    """Named topics and a single pattern over all their keywords."""

    def __init__(self, topics: dict[str, Topic]):
        self.topics = topics
        self._by_keyword = {k.casefold(): name for name, t in topics.items() for k in t.keywords if k.strip()}
        words = sorted(self._by_keyword, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, words)), re.IGNORECASE) if words else None

    @classmethod
    def load(cls, path: str | Path | None) -> TopicList:
        """The topic list in `path` (an empty list when no file is configured)."""
        if path is None:
            return cls({})
        import yaml

        path = Path(path)
        if not path.is_file():
            raise WenmaiError(f"data.policy.topic_list: {path} not found; give a YAML file of topics and keywords")
        try:
            return cls(TopicFile.model_validate(yaml.safe_load(path.read_text(encoding="utf-8"))).topics)
        except (yaml.YAMLError, ValidationError) as err:
            raise WenmaiError(
                f"{path}: not a topic list ({err}); expected `topics: {{name: {{keywords: [...]}}}}`"
            ) from None

    def match(self, tags: list[str], texts: list[str]) -> list[str]:
        """Topics this record touches: by its own tags, then by keywords in its text."""
        hits = [t for t in tags if t in self.topics]
        if self._pattern is not None:
            for text in texts:
                for m in self._pattern.finditer(text):
                    name = self._by_keyword[m.group().casefold()]
                    if name not in hits:
                        hits.append(name)
        return hits
