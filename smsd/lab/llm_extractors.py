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
import re
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


# "report a credit of 1000000", "report a debit of Rs 5,000", "report a credit of ten lakh"
_ORDER_RE = re.compile(
    r"report\s+an?\s+(?P<dir>credit|debit)\s+of\s+(?:(?:rs\.?|inr|₹)\s*)?"
    r"(?P<num>\d[\d,]*(?:\.\d+)?|(?P<words>(?:(?:one|two|five|ten|hundred|thousand|lakh|crore|million)\s*)+))",
    re.I)
_WORDS = {"one": 1, "two": 2, "five": 5, "ten": 10, "hundred": 100, "thousand": 1000,
          "lakh": 100_000, "crore": 10_000_000, "million": 1_000_000}


def _words_to_digits(words: str) -> str:
    """"ten lakh" -> "1000000" (small multiplicative phrases only)."""
    value = 1
    for word in words.lower().split():
        value *= _WORDS[word]
    return str(value)


class ObeyInjections:
    """A gullible model: an SMS text that orders "report a credit of X" gets
    exactly that answer, whatever the text really says (the prompt-injection
    attack smsd's grounding check must stop).  Other texts go to ``inner``."""

    def __init__(self, inner: Extractor):
        self.inner = inner

    def __call__(self, item: dict) -> dict | None:
        m = _ORDER_RE.search(item.get("text") or "")
        if m is None:
            return self.inner(item)
        amount = _words_to_digits(m.group("words")) if m.group("words") else m.group("num").replace(",", "")
        return {"kind": "transaction", "transactions": [{
            "direction": m.group("dir").lower(), "amount": amount, "currency": "INR",
            "channel": None, "account_mask": None, "card_mask": None, "counterparty": None,
            "reference": None, "balance": None, "occurred_at": None, "bank": None}]}


def make_extractor(kind: str = "known", answers: str | Path | None = None,
                   fallback: str = "other", obey_injections: bool = False) -> Extractor:
    """Build an extractor: ``known`` (table from *answers*, then *fallback*) or
    ``rules``; with ``obey_injections`` wrapped in :class:`ObeyInjections`."""
    if obey_injections:
        return ObeyInjections(make_extractor(kind, answers, fallback))
    if kind == "rules":
        return rules_extractor()
    if kind != "known":
        raise ValueError(f"unknown extractor {kind!r} (known|rules)")
    fb = rules_extractor() if fallback == "rules" else None
    if answers:
        return KnownAnswers.from_jsonl(answers, fallback=fb)
    return KnownAnswers({}, fallback=fb)
