"""The grounding check: every value an answer stores must be in the SMS itself.

What smsd stores is money, and a wrong amount is worse than a missing one.
An LLM can invent a number, and an SMS is written by whoever sent it (prompt
injection), so before an answer — the LLM's or the rules' — is journaled as a
result, :func:`problem` checks it against the SMS text:

* each ``amount`` and ``balance`` occurs in the text as a number.  Digit
  grouping is normalised (``1,23,456.50``, ``123,456.50``, ``123456.5`` and
  ``1.234,56`` all read as numbers), currency symbols and codes are ignored
  (``Rs.500``, ``INR500``, ``₹500``), and values are compared as Decimals, so
  ``"500.00"`` is grounded by ``Rs 500``;
* the digits of ``account_mask`` and ``card_mask`` occur in the text;
* an SMS that addresses instructions to a model ("ignore previous
  instructions ...") grounds no transaction at all: its numbers are the
  attacker's, not a bank's.

A failing answer is an invalid item with the reason ``ungrounded: <field>``;
the pipeline asks it again alone and quarantines it after ``max_attempts``.
Reasons name fields only, never text.  Standard library only.
"""
from __future__ import annotations

import dataclasses
import re
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable

from .model import Sms, SmsResult

__all__ = ["PREFIX", "ground", "numbers_in", "problem", "gives_instructions"]

#: Every grounding failure reason starts with this (status counts them by it).
PREFIX = "ungrounded: "

# A run of digits with the separators numbers are grouped with; split into
# readings by _readings.  Unicode digits count (\d).
_NUMBER_TOKEN_RE = re.compile(r"\d(?:[\d,.'\u00a0\u202f\u2009]*\d)?")
_GROUPING = str.maketrans("", "", ",'\u00a0\u202f\u2009")
_PLAIN_RE = re.compile(r"^\d+(?:\.\d+)?$")
_DIGITS_RE = re.compile(r"\d+")

# Wording addressed to a model, not to a bank customer.  Deliberately narrow:
# a bank SMS never tells its reader to ignore instructions or prompts.
_INSTRUCTION_RES = (
    # "ignore previous instructions", "disregard all the above rules"; not "ignore if
    # paid. As per RBI guidelines": the words must follow each other.
    re.compile(r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+)?(?:of\s+)?(?:the\s+|your\s+|my\s+)?"
               r"(?:previous|prior|above|earlier|preceding|original|system|all|these|those|other)?\s*"
               r"(?:instructions?|prompts?|rules|guidelines|directions)\b", re.I),
    re.compile(r"\bsystem\s+(?:prompt|message|instructions?)\b", re.I),
    re.compile(r"\b(?:new|updated)\s+instructions?\s*:", re.I),
    re.compile(r"\byou\s+are\s+(?:now\s+)?(?:an?\s+)?(?:ai|assistant|language\s+model|llm|chatbot)\b", re.I),
)


def _decimal(text: str) -> Decimal | None:
    if not _PLAIN_RE.match(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


def _readings(token: str) -> list[Decimal]:
    """Every number a token may stand for: grouped with commas (Indian or
    Western) or with dots and a decimal comma; a token that is neither (a date
    such as "12.06.2025") stands for each of its pieces."""
    out = []
    for candidate in (token.translate(_GROUPING),
                      token.replace(".", "").replace(",", ".").translate(_GROUPING)):
        value = _decimal(candidate)
        if value is not None:
            out.append(value)
    if not out:
        out = [Decimal(p) for p in re.findall(r"\d+(?:\.\d+)?", token.translate(_GROUPING))]
    return out


def numbers_in(text: str) -> set[Decimal]:
    """Every number the text states, as Decimals (so 500 == 500.00)."""
    out: set[Decimal] = set()
    for m in _NUMBER_TOKEN_RE.finditer(text or ""):
        out.update(_readings(m.group(0)))
    return out


def gives_instructions(text: str) -> bool:
    """True when the SMS addresses instructions to a model (prompt injection)."""
    return any(rx.search(text or "") for rx in _INSTRUCTION_RES)


def _mask_grounded(mask: str, text: str) -> bool:
    """Each digit group of a mask ("XX1234", "000***000000") occurs in the text."""
    return all(group in text for group in _DIGITS_RE.findall(mask))


def problem(result: SmsResult, text: str) -> str | None:
    """The failure reason (``"ungrounded: amount"``, ...) of ``result`` against
    its SMS ``text``, or None when every stored value is in the text.  Only
    results with transactions can fail: a kind alone stores no value."""
    if not result.transactions:
        return None
    if gives_instructions(text):
        return PREFIX + "instructions in text"
    numbers = numbers_in(text)
    for txn in result.transactions:
        if txn.amount not in numbers:
            return PREFIX + "amount"
        if txn.balance is not None and txn.balance not in numbers:
            return PREFIX + "balance"
        for name in ("account_mask", "card_mask"):
            mask = getattr(txn, name)
            if mask and not _mask_grounded(mask, text):
                return PREFIX + name
    return None


def ground(answer: Any, sms: list[Sms]) -> Any:
    """``answer`` (an :class:`smsd.llm.LlmAnswer`) with every ungrounded result
    moved from ``results`` to ``failed``, so the caller treats it as any
    invalid item.  Returns the same object when nothing failed."""
    texts = {m.key: m.text for m in sms}
    bad = {}
    for key, result in answer.results.items():
        if key in texts:
            reason = problem(result, texts[key])
            if reason:
                bad[key] = reason
    if not bad:
        return answer
    results = {k: r for k, r in answer.results.items() if k not in bad}
    return dataclasses.replace(answer, results=results, failed={**answer.failed, **bad})
