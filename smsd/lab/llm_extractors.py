"""Where the local LLM server's answers come from: its pluggable extractors.

An extractor is ``(item) -> {"kind", "transactions"} | None``: :class:`KnownAnswers`
answers from a table keyed by SMS text (loadable from the fixtures JSONL
format), :func:`rules_extractor` wraps ``smsd.rules.extract`` (imported
lazily), :func:`make_extractor` builds either from the command line's choice.
Apart from :mod:`smsd.lab.llmserver` because what the "model" answers is
independent of how the server speaks HTTP or injects faults.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable

Extractor = Callable[[dict], "dict | None"]

OTHER = {"kind": "other", "transactions": []}


class KnownAnswers:
    """An extractor that answers from a table keyed by SMS text.

    Unknown texts go to ``fallback(item)`` when given, else ``{"kind": "other", "transactions": []}``.
    """

    def __init__(self, table: dict[str, dict] | None = None, fallback: Extractor | None = None):
        self.table: dict[str, dict] = dict(table or {})
        self.fallback = fallback

    @classmethod
    def from_jsonl(cls, path: str | Path, fallback: Extractor | None = None) -> "KnownAnswers":
        """Load ``{"text", "expected"}`` lines (the format of ``sms_fixtures.jsonl``)."""
        table: dict[str, dict] = {}
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                    table[row["text"]] = row["expected"]
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{path}:{lineno}: not a {{text, expected}} line ({exc.__class__.__name__})") from None
        return cls(table, fallback)

    def __len__(self) -> int:
        return len(self.table)

    def __call__(self, item: dict) -> dict | None:
        answer = self.table.get(item.get("text"))
        if answer is not None:
            return json.loads(json.dumps(answer))  # a private copy: faults may mangle it
        if self.fallback is not None:
            return self.fallback(item)
        return dict(OTHER, transactions=[])


def rules_extractor() -> Extractor:
    """``smsd.rules.extract`` as an extractor, imported only when asked for."""
    rules = importlib.import_module("smsd.rules")

    def extract(item: dict) -> dict | None:
        return rules.extract(item.get("text") or "", sender=item.get("sender"))

    return extract


def make_extractor(kind: str = "known", answers: str | Path | None = None,
                   fallback: str = "other") -> Extractor:
    """Build an extractor: ``known`` (table from *answers*, then *fallback*) or ``rules``."""
    if kind == "rules":
        return rules_extractor()
    if kind != "known":
        raise ValueError(f"unknown extractor {kind!r} (known|rules)")
    fb = rules_extractor() if fallback == "rules" else None
    if answers:
        return KnownAnswers.from_jsonl(answers, fallback=fb)
    return KnownAnswers({}, fallback=fb)
