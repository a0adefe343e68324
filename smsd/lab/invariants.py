"""Checks DESIGN.md's invariants after a run, a crash test or a drill.

Given what was seeded (the expected answer of every SMS), the database and
the journals, :func:`verify` reports SMS lost, transactions missing,
duplicated or wrong, money that is not Decimal128, checkpoints that are not
complete, and every SMS the LLM was asked about again — split into repeats
that a crash or a fault explains and repeats that break invariant 5.
Used by the tests, ``smsd drill`` and ``smsd demo`` alike.
"""
from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from bson.decimal128 import Decimal128

from ..model import sms_key, transaction_id


@dataclass
class Report:
    """The figures of one verification; ``ok`` when ``violations`` is empty."""

    sms_seeded: int = 0
    sms_processed: int = 0
    sms_quarantined: int = 0
    sms_lost: int = 0
    tx_expected: int = 0
    tx_found: int = 0
    tx_duplicated: int = 0
    tx_wrong: int = 0
    tx_missing: int = 0
    money_not_decimal128: int = 0
    journal_calls: int = 0
    sms_asked_more_than_once: int = 0
    repeats_explained: int = 0
    repeats_unexplained: int = 0
    repeats_in_flight: int = 0        # explained by a call cut by a crash ('sent')
    repeats_failed: int = 0           # explained by a call that failed as a whole
    repeats_without_answer: int = 0   # explained by an answer that left the SMS out (fault)
    repeats_other_host: int = 0       # asked by two hosts: the user moved (freeze, cut, kill)
    asked_after_answer: int = 0
    unflushed_left: int = 0
    checkpoints_incomplete: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ok"] = self.ok
        return out


def journal_facts(state_dir: str | Path) -> dict[str, dict]:
    """Per SMS key, from every journal (read-only): calls that asked it, and the answer's place.

    ``calls``: journal calls that included the key; ``after_answer``: calls sent
    after the call that produced its result (each one breaks invariant 5);
    ``unanswered``: calls that gave no result for it (in flight at a crash,
    failed, or partial) — the only legitimate reasons to ask again.  ``unanswered``
    splits into ``in_flight`` (the call is still 'sent': a crash cut it),
    ``failed`` (the call failed as a whole) and ``without_answer`` (the call was
    answered, but not for this SMS: a partial or malformed answer).
    """
    facts: dict[str, dict] = {}
    for path in sorted((Path(state_dir) / "journal").glob("*.sqlite")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            answered = dict(conn.execute(
                "SELECT r.sms_key, c.seq FROM results r JOIN calls c ON c.call_id = r.call_id"))
            for key, seq, state, model in conn.execute(
                    "SELECT cs.sms_key, c.seq, c.state, c.model FROM call_sms cs "
                    "JOIN calls c ON c.call_id = cs.call_id ORDER BY c.seq"):
                f = facts.setdefault(key, _new_fact())
                if model == HANDOVER_MODEL:
                    continue   # another host's paid answer, handed over: not a call
                f["calls"] += 1
                answer_seq = answered.get(key)
                if answer_seq is None or seq < answer_seq:
                    f["unanswered"] += 1
                    f[_UNANSWERED_BY_STATE.get(state, "without_answer")] += 1
                elif seq > answer_seq:
                    f["after_answer"] += 1
            for (key,) in conn.execute(
                    "SELECT r.sms_key FROM results r JOIN calls c ON c.call_id = r.call_id "
                    "WHERE c.flushed = 0"):
                facts.setdefault(key, _new_fact())["unflushed"] += 1
        finally:
            conn.close()
    return facts


_IN_CHUNK = 100
HANDOVER_MODEL = "handover"
_UNANSWERED_BY_STATE = {"sent": "in_flight", "failed": "failed", "answered": "without_answer"}


def _new_fact() -> dict:
    return {"calls": 0, "after_answer": 0, "unanswered": 0, "unflushed": 0,
            "in_flight": 0, "failed": 0, "without_answer": 0}


def journal_calls(state_dir: str | Path) -> list[dict]:
    """Every LLM call of every journal (read-only), in send order per user.

    Each: ``user_id``, ``call_id``, ``seq``, ``state`` ('sent', 'answered',
    'failed'), ``sent_at`` / ``answered_at`` / ``flushed_at`` (epoch seconds or
    None), ``flushed`` and ``n_sms``.  A call still 'sent' after the daemon
    stopped was cut by a crash while in flight.
    """
    out: list[dict] = []
    for path in sorted((Path(state_dir) / "journal").glob("*.sqlite")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            user_id = meta.get("user_id", path.stem)
            for row in conn.execute(
                    "SELECT call_id, seq, state, sent_at, answered_at, flushed, flushed_at, n_sms"
                    " FROM calls ORDER BY seq"):
                out.append({"user_id": user_id, "call_id": row[0], "seq": row[1],
                            "state": row[2], "sent_at": row[3], "answered_at": row[4],
                            "flushed": bool(row[5]), "flushed_at": row[6], "n_sms": row[7]})
        finally:
            conn.close()
    return out


def journal_answers(state_dir: str | Path) -> dict[str, str]:
    """SMS key → the ``call_id`` whose answer the journal holds for it (read-only)."""
    out: dict[str, str] = {}
    for path in sorted((Path(state_dir) / "journal").glob("*.sqlite")):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2.0)
        try:
            out.update(conn.execute("SELECT sms_key, call_id FROM results"))
        finally:
            conn.close()
    return out


def hosts_facts(state_dirs: list) -> dict[str, dict]:
    """:func:`journal_facts` of several hosts' state directories, summed per SMS key.

    ``hosts`` counts the hosts whose journals asked the LLM about the key.
    """
    merged: dict[str, dict] = {}
    for state_dir in state_dirs:
        for key, f in journal_facts(state_dir).items():
            m = merged.setdefault(key, dict(_new_fact(), hosts=0))
            for name, value in f.items():
                m[name] += value
            m["hosts"] += 1 if f["calls"] else 0
    return merged


def verify(db: Any, expected: dict[Any, dict], *, state_dir: str | Path | list,
           billed: dict[str, int] | None = None, extra_repeats_allowed: int = 0,
           expect_complete: bool = True) -> Report:
    """Check every invariant for the SMS in ``expected`` (raw ``_id`` → expected answer).

    ``db`` is a pymongo Database.  ``billed`` is the LLM server's count of paid
    asks per SMS key; a key billed more often than the journal has calls for it
    was asked behind the journal's back.  ``extra_repeats_allowed`` covers HTTP
    retries after a server-side timeout fault (billed, but one journal call).
    ``state_dir`` may be a list (several hosts against one MongoDB): an SMS
    asked once by each of two hosts is a repeat of the user's move
    (``repeats_other_host``), which the caller bounds, not a violation.
    """
    r = Report(sms_seeded=len(expected))
    facts = hosts_facts(list(state_dir)) if isinstance(state_dir, (list, tuple)) \
        else journal_facts(state_dir)
    raw = db["sms_fin_rawdata"]
    # Small $in lists: a server may answer a 10,000-id $in in quadratic time.
    ids = list(expected)
    docs = {d["_id"]: d for i in range(0, len(ids), _IN_CHUNK)
            for d in raw.find({"_id": {"$in": ids[i:i + _IN_CHUNK]}},
                              {"isprocessed": 1, "smsd_quarantine": 1, "user_id": 1})}
    # Transactions of the seeded SMS, fetched per user through the (user_id, sms_id)
    # index: one query per SMS without the user would scan the whole collection.
    by_user: dict[Any, list] = {}
    for raw_id, doc in docs.items():
        by_user.setdefault(doc.get("user_id"), []).append(raw_id)
    tx_by_key: dict[str, list] = {}
    for user_id, ids in by_user.items():
        for i in range(0, len(ids), _IN_CHUNK):
            for d in db["financial_transactions"].find({"user_id": user_id,
                                                        "sms_id": {"$in": ids[i:i + _IN_CHUNK]}}):
                tx_by_key.setdefault(sms_key(d["sms_id"]), []).append(d)
    users = set()
    for raw_id, answer in expected.items():
        doc = docs.get(raw_id)
        key = sms_key(raw_id)
        if doc is None:
            r.violations.append(f"SMS {key} vanished from sms_fin_rawdata")
            continue
        users.add(doc.get("user_id"))
        if doc.get("isprocessed") is True:
            r.sms_processed += 1
        elif doc.get("smsd_quarantine"):
            r.sms_quarantined += 1
        else:
            r.sms_lost += 1
        want = answer.get("transactions") or [] if answer.get("kind") == "transaction" else []
        r.tx_expected += len(want)
        found = tx_by_key.get(key, [])
        r.tx_found += len(found)
        by_id = {d["_id"]: d for d in found}
        if doc.get("isprocessed") is True:
            for i, tx in enumerate(want):
                got = by_id.get(transaction_id(key, i))
                if got is None:
                    r.tx_missing += 1
                    continue
                if not _same(got, tx):
                    r.tx_wrong += 1
            r.tx_duplicated += max(0, len(found) - len(want))
        for d in found:
            for name in ("amount", "balance"):
                if name in d and d[name] is not None and not isinstance(d[name], Decimal128):
                    r.money_not_decimal128 += 1
    billed = billed or {}
    for raw_id in expected:
        key = sms_key(raw_id)
        f = facts.get(key) or _new_fact()
        r.journal_calls += f["calls"]
        r.asked_after_answer += f["after_answer"]
        r.unflushed_left += f["unflushed"]
        asks = max(billed.get(key, 0), f["calls"])
        if asks > 1:
            r.sms_asked_more_than_once += 1
            moved = max(0, f.get("hosts", 1) - 1)
            r.repeats_other_host += min(asks - 1, moved)
            asks -= min(asks - 1, moved)
            explained = f["unanswered"]
            unexplained = max(0, asks - 1 - explained)
            r.repeats_explained += min(asks - 1, explained)
            r.repeats_unexplained += unexplained
            left = min(asks - 1, explained)
            for reason in ("in_flight", "failed", "without_answer"):
                share = min(left, f[reason])
                setattr(r, "repeats_" + reason, getattr(r, "repeats_" + reason) + share)
                left -= share
    r.repeats_unexplained = max(0, r.repeats_unexplained - extra_repeats_allowed)
    if expect_complete:
        for user_id in users:
            cp = db["processing_checkpoints"].find_one({"user_id": user_id},
                                                       sort=[("checkpoint_timestamp", -1)])
            if not cp or cp.get("status") != "completed":
                r.checkpoints_incomplete += 1
                r.violations.append(f"user {user_id}: latest checkpoint is "
                                    f"{cp.get('status') if cp else 'missing'}")
    for name, what in (("sms_lost", "SMS neither processed nor quarantined"),
                       ("tx_missing", "transactions missing"), ("tx_wrong", "transactions wrong"),
                       ("tx_duplicated", "transactions duplicated"),
                       ("money_not_decimal128", "amounts not Decimal128"),
                       ("asked_after_answer", "LLM calls for SMS already answered in the journal"),
                       ("repeats_unexplained", "paid repeats no crash or fault explains"),
                       ("unflushed_left", "journal results never flushed")):
        if getattr(r, name):
            r.violations.append(f"{what}: {getattr(r, name)}")
    return r


def _same(doc: dict, tx: dict) -> bool:
    if doc.get("direction") != tx["direction"] or doc.get("currency") != tx["currency"]:
        return False
    amount = doc.get("amount")
    if not isinstance(amount, Decimal128) or amount.to_decimal() != Decimal(tx["amount"]):
        return False
    return True


def repeat_counts(billed: dict[str, int]) -> Counter:
    """How many SMS were billed n times (for reports)."""
    return Counter(billed.values())
