"""Offline, deterministic extractor: bank/wallet SMS → the LLM contract's answer.

Two uses:

* the demo and the tests run with no API key (``extractor = "rules"``);
* with ``extractor = "rules-then-llm"`` an SMS the rules recognise with
  certainty (:func:`extract_certain` returns an answer) is not sent to the LLM.

The rules are a table of SMS *forms* ("<amount> debited from A/c", "Spent
<amount> ... Card", "payment of <amount> received towards your card", ...)
plus small field extractors (masks, reference, balance, date, counterparty,
bank).  Every table is ordered: the first entry that matches wins, so the
specific forms come before the generic ones.  The tables themselves (the
compiled patterns and form definitions) are in :mod:`smsd.rule_tables`; this
module holds the matcher and the extractors that read them.

Labelling follows ``tests/data/README.md``: a card spend is a debit, card
payments received, refunds and reversals are credits, the confirmation legs
of an outward transfer ("your beneficiary has received ...") are debits,
``balance`` is the available balance or available credit limit, never a
total due, and ``occurred_at`` is the SMS's own date in ISO 8601 (no date
with a year → null).

Amounts are strings exactly as written minus separators; no ``float`` is ever
involved.  Only the standard library is used.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from .rule_tables import (
    BANKS, CARD_IF_CARD, FORMS, Form, PARTIES, SENDER_CODES, _ACCOUNT_RES,
    _ANY_AMOUNT_RE, _BALANCE_KIND_RE, _BALANCE_RE, _BILL_RE, _CARD_RE, _CHANNEL_KEYWORDS,
    _DATE_LEAD_RE, _DATE_RES, _DECLINE_RE, _DOUBT_RE, _FUTURE_RE, _I, _ISO_DT_RE, _METHOD_RE,
    _MONTHS, _MOVEMENT_WORD_RE, _NARRATIONS, _NO_MOVEMENT_RE, _OTP_FOR_RE, _OTP_RES, _PROMO_RE,
    _REFUND_WORD_RE, _REF_RES, _SHARE_WARNING_RE, _STRONG_PROMO_RE, _SYMBOLS, _TIME_RE,
    _UNCERTAIN_RE, _VPA,
)

__all__ = ["extract", "extract_certain"]

# ---------------------------------------------------------------------------
# Money
# ---------------------------------------------------------------------------


def _currency(token: str) -> str:
    """ISO code of a currency token as written ("Rs." → INR, "€" → EUR)."""
    token = token.strip(". :").upper()
    return _SYMBOLS.get(token, token)


def _plain_number(num: str) -> str:
    """Drop digit grouping, keep everything else exactly (trailing zeros too)."""
    return num.replace(",", "")


def _money(m: re.Match) -> tuple[str, str, bool] | None:
    """(amount, currency, explicit currency?) from a match of AMT/AMT_OPT."""
    groups = m.groupdict()
    if groups.get("num"):
        return _plain_number(groups["num"]), _currency(groups["cur"]), True
    if groups.get("num2"):
        return _plain_number(groups["num2"]), _currency(groups["cur2"]), True
    if groups.get("bare"):
        return groups["bare"], "INR", False
    return None


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _normalise(text: str) -> str:
    """Collapse runs of spaces within lines, keep line breaks (some forms use them)."""
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _clean(value: str) -> str:
    return re.sub(r"\s+", " ", value).strip(" ,;:")


def _form_matches(text: str, form: Form, blocked: list[tuple[int, int]]):
    """Matches of one form that state a movement: not inside a balance/limit
    phrase, and not a future one ("will be debited with Rs 999")."""
    for m in form.pattern.finditer(text):
        if any(s <= _amount_span(m) < e for s, e in blocked):
            continue
        if _FUTURE_RE.search(text, max(0, m.start() - 20), m.start()):
            continue
        yield m


def _first_form(text: str) -> tuple[Form, re.Match] | None:
    """The first form in table order that matches."""
    blocked = _balance_spans(text)
    for form in FORMS:
        for m in _form_matches(text, form, blocked):
            return form, m
    return None


def _amount_span(m: re.Match) -> int:
    for g in ("num", "num2", "bare"):
        if m.groupdict().get(g):
            return m.start(g)
    return m.start()


def _balance_spans(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in _BALANCE_RE.finditer(text)]


def _all_readings(text: str) -> set[tuple[str, str, str]]:
    """Every (direction, amount, currency) any form reads anywhere in the SMS."""
    blocked = _balance_spans(text)
    out = set()
    for form in FORMS:
        for m in _form_matches(text, form, blocked):
            money = _money(m)
            if money:
                out.add((form.direction, money[0], money[1]))
    return out


def _balance(text: str) -> str | None:
    m = _BALANCE_RE.search(text)
    if not m:
        return None
    money = _money(m)
    return money[0] if money else None


def _reference(text: str) -> str | None:
    for rx in _REF_RES:
        m = rx.search(text)
        if m:
            return m.group("r")
    return None


def _counterparty(text: str, direction: str, bank: str | None) -> tuple[str | None, tuple[int, int] | None]:
    """(counterparty, its span) — the span is excluded when looking for our own account."""
    for party in PARTIES:
        if party.direction and party.direction != direction:
            continue
        m = party.pattern.search(text)
        if not m:
            continue
        values = {k: _clean(v) for k, v in m.groupdict().items() if v is not None}
        if not all(values.values()):
            continue
        value = party.fmt.format(**values)
        for rx, replacement in _NARRATIONS:
            if rx.search(value) and bank:
                value = replacement.format(BANK=bank.upper())
        return value, m.span()
    return None, None


def _account_mask(text: str, skip: tuple[int, int] | None) -> str | None:
    for rx in _ACCOUNT_RES:
        for m in rx.finditer(text):
            if skip and skip[0] <= m.start("m") < skip[1]:
                continue
            # "Credit Card Account 4xxx0000" is a card, not a bank account.
            if re.search(r"card\s*$", text[max(0, m.start() - 12):m.start()], _I):
                continue
            return m.group("m")
    return None


def _card_mask(text: str) -> str | None:
    m = _CARD_RE.search(text)
    return m.group("m") if m else None


def _time_after(text: str, pos: int) -> str | None:
    m = _TIME_RE.match(text, pos)
    if not m:
        return None
    hour, minute = int(m.group("h")), int(m.group("mi"))
    ap = (m.group("ap") or "").lower()
    if ap == "p" and hour < 12:
        hour += 12
    elif ap == "a" and hour == 12:
        hour = 0
    if hour > 23 or minute > 59:
        return None
    out = f"{hour:02d}:{minute:02d}"
    if m.group("s"):
        out += f":{m.group('s')}"
    return out


def _parse_date(m: re.Match) -> str | None:
    g = m.groupdict()
    year = int(g["y"])
    if year < 100:  # two-digit years are 20YY
        year += 2000
    month = _MONTHS[g["mon"][:3].lower()] if g.get("mon") else int(g["m"])
    try:
        return date(year, month, int(g["d"])).isoformat()
    except ValueError:
        return None


def _occurred_at(text: str) -> str | None:
    """The SMS's own date (and time) in ISO 8601; a date after "on"/"date" wins."""
    iso = _ISO_DT_RE.search(text)
    if iso:
        return iso.group(0)
    found: list[tuple[int, int, str]] = []
    for rx in _DATE_RES:
        for m in rx.finditer(text):
            day = _parse_date(m)
            if day is None:
                continue
            time = _time_after(text, m.end())
            value = f"{day}T{time}" if time else day
            lead = bool(_DATE_LEAD_RE.search(text[max(0, m.start() - 12):m.start()]))
            found.append((0 if lead else 1, m.start(), value))
    return min(found)[2] if found else None


def _bank(text: str, sender: str | None) -> str | None:
    if sender:
        code = re.sub(r"^[A-Z0-9]{2}-", "", sender.strip().upper())
        code = re.sub(r"-[A-Z]$", "", code)
        for prefix, slug in SENDER_CODES:
            if code.startswith(prefix):
                return slug
    # A UPI handle such as "x@icici" names the payee's bank, not the sender.
    text = re.sub(_VPA, " ", text)
    best: tuple[int, int, str] | None = None
    for order, (slug, rx) in enumerate(BANKS):
        m = rx.search(text)
        if m and (best is None or (m.start(), order) < best[:2]):
            best = (m.start(), order, slug)
    return best[2] if best else None


def _channel(text: str, form: Form, card_mask: str | None) -> str | None:
    method = _METHOD_RE.search(text)
    if method:
        return method.group(1).lower()
    if form.channel == CARD_IF_CARD:
        if card_mask or re.search(r"\bcard\b", text, _I):
            return "card"
    elif form.channel:
        return form.channel
    if not form.scan:
        return None
    for name, rx in _CHANNEL_KEYWORDS:
        if rx.search(text):
            return name
    if card_mask:
        return "card"
    return None


def _otp(text: str, movement: bool) -> tuple[bool, bool]:
    """(is an OTP SMS, certainly).  "<code> is your OTP" is unmistakable.
    "OTP ... is <code>" in an SMS that also reads as a movement counts only
    for an "OTP for/to" something, and never for certain: "do not share OTP
    for any reason: 1930" in a debit alert must not hide the debit."""
    code_first, otp_is_code, use_code = _OTP_RES
    if code_first.search(text) or use_code.search(text):
        return True, True
    if not otp_is_code.search(text):
        return False, False
    if not movement:
        return True, True
    return _OTP_FOR_RE.search(text) is not None, False


# ---------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------


def _is_refund(text: str, hit: tuple[Form, re.Match] | None) -> bool:
    """A credit that gives back a failed payment ("failed txn ... reversed")."""
    if hit is None:
        return False
    form = hit[0]
    return form.kind == "refund" or (form.direction == "credit" and _REFUND_WORD_RE.search(text) is not None)


@dataclass(frozen=True)
class _Analysis:
    answer: dict
    certain: bool


def _empty(kind: str, certain: bool = False) -> _Analysis:
    return _Analysis({"kind": kind, "transactions": []}, certain)


def _analyse(text: str, sender: str | None) -> _Analysis:
    text = _normalise(text or "")
    hit = _first_form(text)
    is_otp, certain_otp = _otp(text, movement=hit is not None)
    if is_otp:
        return _empty("otp", certain=certain_otp)
    if _NO_MOVEMENT_RE.search(text):
        return _empty("other")

    has_amount = bool(_ANY_AMOUNT_RE.search(text))
    if _DECLINE_RE.search(text) and has_amount and not _is_refund(text, hit):
        return _empty("declined")
    if hit is None:
        strong_promo = bool(_STRONG_PROMO_RE.search(text))
        if strong_promo or _PROMO_RE.search(text):
            # Certain only when nothing hints at money moved or an account:
            # a transaction in a form the rules miss must reach the LLM.
            mask = _card_mask(text) or _account_mask(text, None)
            certain = strong_promo and not mask and not _MOVEMENT_WORD_RE.search(text)
            return _empty("promotion", certain=certain)
        if _BILL_RE.search(text):
            return _empty("bill_due")
        if _BALANCE_RE.search(text) or _BALANCE_KIND_RE.search(text):
            return _empty("balance")
        return _empty("other")

    form, m = hit
    amount, currency, explicit = _money(m)
    bank = _bank(text, sender)
    counterparty, cp_span = _counterparty(text, form.direction, bank)
    card_mask = _card_mask(text)
    account_mask = _account_mask(text, cp_span)
    if card_mask and account_mask == card_mask:
        account_mask = None
    txn = {
        "direction": form.direction,
        "amount": amount,
        "currency": currency,
        "channel": _channel(text, form, card_mask),
        "account_mask": account_mask,
        "card_mask": card_mask,
        "counterparty": counterparty,
        "reference": _reference(text),
        "balance": _balance(text),
        "occurred_at": _occurred_at(text),
        "bank": bank,
    }
    answer = {"kind": "transaction", "transactions": [txn]}
    return _Analysis(answer, _certain_transaction(text, form, explicit, txn))


def _certain_transaction(text: str, form: Form, explicit: bool, txn: dict) -> bool:
    """True when nothing in the SMS could make another reading plausible."""
    if not explicit or form.kind in ("outward", "loose"):
        return False
    if _DOUBT_RE.search(text) or _PROMO_RE.search(text) or _DECLINE_RE.search(text) \
            or _UNCERTAIN_RE.search(_SHARE_WARNING_RE.sub(" ", text)):
        return False
    if not (txn["account_mask"] or txn["card_mask"] or txn["bank"]):
        return False  # not recognisably a bank or wallet alert
    if _is_zero(txn["amount"]):
        return False
    readings = _all_readings(text)
    if readings != {(txn["direction"], txn["amount"], txn["currency"])}:
        return False  # some form reads another direction, amount or currency
    # A second currency outside the balance (e.g. "USD 12.00 | Rs. 1,000.00")
    # leaves open which one the customer paid in.
    blocked = _balance_spans(text)
    currencies = {_money(a)[1] for a in _ANY_AMOUNT_RE.finditer(text)
                  if not any(s <= _amount_span(a) < e for s, e in blocked)}
    return currencies == {txn["currency"]}


def _is_zero(amount: str) -> bool:
    """True when a decimal string is zero (checked on digits; no float)."""
    return not amount.replace(".", "").strip("0")


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def extract(text: str, sender: str | None = None) -> dict:
    """Read one SMS into the contract's answer format (without the ``id``).

    Returns ``{"kind": ..., "transactions": [...]}``; each transaction has
    every optional field of the schema, null when the SMS does not give it.
    Never raises on odd input: an SMS the rules do not know is ``other``.
    """
    return _analyse(text, sender).answer


def extract_certain(text: str, sender: str | None = None) -> dict | None:
    """The answer of :func:`extract` only when the rules are certain of it.

    Certain means: a clear OTP or promotion, or one transaction form whose
    direction, amount and an explicit currency no other form in the SMS
    contradicts, with no wording of doubt (declined, pending, will be
    debited, beneficiary, offers...).  Otherwise ``None``: ask the LLM.
    """
    analysis = _analyse(text, sender)
    return analysis.answer if analysis.certain else None
