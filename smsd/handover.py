"""Paid answers of a host that lost a user, handed to the user's new owner.

A host whose lease moved (it froze, its link was cut) may still hold journaled
answers that MongoDB refused to take from it.  They were paid for, so the host
writes them to the shared collection ``smsd_handover`` when it can reach
MongoDB again (:func:`hand_over`), one document per SMS::

    {_id: sms_key, user_id, raw_id, result: {id, kind, transactions}, from_owner, from_epoch, at}

The new owner looks there before it pays for an SMS (:func:`adopt`, called by
the pipeline's claim for each page of pending SMS): what it finds is journaled
as an answer of model ``handover`` (no tokens, no cost), then deleted from the
collection.  An SMS the new owner had already asked about keeps its own answer,
and its handover document stays until the SMS is next seen pending (never) --
at most the answers in flight on the host when it was cut.

This is not a write of the user's data: the transactions, ``isprocessed`` and
checkpoints are written only by the flush of the lease holder, fenced
(:mod:`smsd.fencing`).  The host that handed over keeps its journal rows
unflushed; when it holds the user's lease again, its replay finds their SMS
processed and marks the rows flushed without writing (no paid call).
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from pymongo import ReplaceOne
from pymongo.database import Database

from .journal import Journal
from .model import SmsResult, sms_key

HANDOVER_COLLECTION = "smsd_handover"

log = logging.getLogger("smsd.handover")


def hand_over(db: Database, journal: Journal, user_id: str, *, owner: str, epoch: int) -> int:
    """Write the journal's unflushed answers of ``user_id`` to ``smsd_handover``; how many SMS."""
    now = datetime.now(timezone.utc)
    ops = []
    for answer in journal.unflushed():
        for raw_id, result in answer.items:
            key = sms_key(raw_id)
            ops.append(ReplaceOne({"_id": key}, {
                "_id": key, "user_id": user_id, "raw_id": raw_id, "result": result.to_json(),
                "from_owner": owner, "from_epoch": epoch, "call_id": answer.call_id, "at": now},
                upsert=True))
    for start in range(0, len(ops), 500):
        db[HANDOVER_COLLECTION].bulk_write(ops[start:start + 500], ordered=False)
    if ops:
        log.info("user %s: handed %d paid answers over to the new owner", user_id, len(ops))
    return len(ops)


def adopt(db: Database, user_id: str, keys: list[str]) -> dict[str, SmsResult]:
    """Handed-over answers for ``keys`` of ``user_id`` (read only; see :func:`forget`)."""
    if not keys:
        return {}
    out: dict[str, SmsResult] = {}
    for start in range(0, len(keys), 500):
        for doc in db[HANDOVER_COLLECTION].find({"_id": {"$in": keys[start:start + 500]},
                                                 "user_id": user_id}):
            try:
                out[doc["_id"]] = SmsResult.from_json(doc["result"])
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("user %s: unreadable handover for %s ignored (%s)", user_id, doc["_id"], exc)
    return out


def forget(db: Database, keys: list[str]) -> None:
    """Delete handover documents once their answers are in our own journal."""
    for start in range(0, len(keys), 500):
        db[HANDOVER_COLLECTION].delete_many({"_id": {"$in": keys[start:start + 500]}})


class Handover:
    """One user's handover box, as the pipeline uses it (``adopt`` then ``forget``)."""

    def __init__(self, db: Database, user_id: str) -> None:
        self.db = db
        self.user_id = user_id

    def adopt(self, keys: list[str]) -> dict[str, SmsResult]:
        """Handed-over answers for ``keys``."""
        return adopt(self.db, self.user_id, keys)

    def forget(self, keys: list[str]) -> None:
        """Drop the handed-over answers for ``keys`` (they are in our journal now)."""
        forget(self.db, keys)
