"""Per-user counters: the ``smsd_user_stats`` collection, kept where the flush writes.

Discovery and ``smsctl status`` used to aggregate over every SMS of every
user; at 1000+ users with thousands of SMS each that was the MongoDB server's
whole CPU.  Instead, one small document per user carries what status shows,
written by :class:`smsd.store.Store` in the same calls the flush already makes
(``checkpoint_progress``, ``quarantine``, ``unquarantine``):

``{_id: user_id, user_id, processed_sms, quarantined_sms, ungrounded_sms,
status, batch_id, last_flush_at, updated_at}``

Invariant 2 holds: ``processed_sms`` and ``last_flush_at`` move with ``$max``;
``quarantined_sms`` and ``ungrounded_sms`` (quarantined by the grounding
check) are ``$set`` to a fresh count of the user's quarantined SMS (an
index-served read of those only; a replay recounts the same numbers); ``status`` / ``batch_id``
are ``$set`` from the checkpoint document as it is after its own update.
Nothing is ever ``$inc``-ed.

``processed_sms`` is cumulative over a user's runs although a checkpoint
counts only its own run: each checkpoint carries ``smsd_processed_before``,
the user's processed count when the run started (the previous run's
``smsd_processed_before + processed_sms``), so the user's total is
``smsd_processed_before + processed_sms`` of the latest run -- O(1) per flush.
A user whose history predates the field gets it once from an index-served
count of its processed SMS.  SMS that arrive already ``isprocessed: true``
(written so by the collector) are counted only by that one-time count.

Readers (:func:`changed_stats`) ask only for documents updated since a time,
through the ``updated_at`` index, so a discovery tick reads the users that
changed, not all of them.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Iterable

import pymongo
from pymongo.collection import Collection
from pymongo.errors import OperationFailure

from smsd.grounding import PREFIX as UNGROUNDED_PREFIX
from smsd.store_docs import BATCH_FIELD, IDX_PENDING, QUARANTINE_FIELD, STATUS_IN_PROGRESS
from smsd.store_errors import BAD_VALUE, InsertElse, bulk_created

STATS_COLLECTION = "smsd_user_stats"
IDX_STATS_UPDATED = "smsd_stats_by_update"
#: Field of a checkpoint: the user's processed count when that run started.
BASE_FIELD = "smsd_processed_before"

STATS_INDEXES = [pymongo.IndexModel([("updated_at", 1)], name=IDX_STATS_UPDATED)]


def processed_filter(user_id: str, batch_id: str | None = None) -> dict:
    """The user's processed SMS (of one run when ``batch_id`` is given).

    ``mark_processed`` unsets the quarantine mark, so ``smsd_quarantine: null``
    holds for every processed SMS and the filter's index part is "equalities
    only" on ``smsd_pending_by_user``.
    """
    done: dict[str, Any] = {"user_id": user_id, QUARANTINE_FIELD: None, "isprocessed": True}
    if batch_id is not None:
        done[BATCH_FIELD] = batch_id
    return done


def count_processed(raw: Collection, user_id: str, batch_id: str | None = None) -> int:
    """How many SMS :func:`processed_filter` matches, index-served.

    One run's SMS have no index of their own (:meth:`smsd.store.Store.ensure_indexes`):
    they are counted among the user's processed SMS, which is needed only when a
    run is resumed or an abandoned one is counted.  SecantusDB's planner takes no
    index for a filter with a field outside it, so the index is named; without it
    (the server refused smsd's indexes, logged at start) the count scans.
    """
    done = processed_filter(user_id, batch_id)
    if batch_id is None:
        return int(raw.count_documents(done))
    try:
        return int(raw.count_documents(done, hint=IDX_PENDING))
    except OperationFailure as exc:
        if exc.code != BAD_VALUE:
            raise
        return int(raw.count_documents(done))


def count_quarantined(raw: Collection, user_id: str) -> tuple[int, int]:
    """``(quarantined, ungrounded)`` SMS of the user: one read of its quarantined SMS only
    (``$gte: {}`` matches sub-documents and rides the index), reasons counted here."""
    quarantined = ungrounded = 0
    for doc in raw.find({"user_id": user_id, QUARANTINE_FIELD: {"$gte": {}}},
                        {"_id": 0, f"{QUARANTINE_FIELD}.reason": 1}):
        quarantined += 1
        reason = (doc.get(QUARANTINE_FIELD) or {}).get("reason")
        ungrounded += isinstance(reason, str) and reason.startswith(UNGROUNDED_PREFIX)
    return quarantined, ungrounded


def base_for_new_run(raw: Collection, user_id: str, previous: dict | None) -> int:
    """``smsd_processed_before`` of a run that starts after ``previous`` (the latest checkpoint).

    The previous run's own count is exact once it completed; an abandoned
    ``in_progress`` run (``smsd once`` without ``--resume``) may have marked
    SMS whose checkpoint update a crash lost, so its SMS are counted.
    """
    if previous is None or previous.get(BASE_FIELD) is None:
        return count_processed(raw, user_id)
    done = int(previous.get("processed_sms") or 0)
    if previous.get("status") == STATUS_IN_PROGRESS and previous.get("batch_id"):
        done = max(done, count_processed(raw, user_id, previous["batch_id"]))
    return int(previous[BASE_FIELD]) + done


def base_for_old_run(raw: Collection, user_id: str, batch_id: str) -> int:
    """``smsd_processed_before`` of a run that started before smsd kept the field."""
    return max(0, count_processed(raw, user_id) - count_processed(raw, user_id, batch_id))


#: ``(collection, user)`` whose counters this process has written (so their document exists):
#: a hint that picks the cheaper first write, never a fact anything relies on (both writes
#: store the same).
_COUNTED: set[tuple[str, str]] = set()
_COUNTED_MAX = 100_000


def record_progress(stats: Collection, checkpoint: dict, now: datetime) -> None:
    """Carry a checkpoint (as it is after its update) into the user's counters."""
    bulk_created(stats, [progress_op(stats, checkpoint, now)])
    counted(stats, [checkpoint["user_id"]])


def progress_op(stats: Collection, checkpoint: dict, now: datetime) -> Any:
    """The write that carries a checkpoint into its user's counters (:func:`progress_update`).

    A user with nothing processed before this run whose counters this process has not
    written yet most likely has no document: an insert, else the upsert
    (:class:`smsd.store_errors.InsertElse`); everyone else: the upsert.  Run it with
    :func:`smsd.store_errors.bulk_created`, then tell :func:`counted`.
    """
    flt, update = progress_update(checkpoint, now)
    if int(checkpoint.get(BASE_FIELD) or 0) == 0 and (stats.full_name, checkpoint["user_id"]) not in _COUNTED:
        return InsertElse.of_upsert(flt, update)
    return pymongo.UpdateOne(flt, update, upsert=True)


def counted(stats: Collection, user_ids: Iterable[str]) -> None:
    """These users' counters are written in ``stats`` (their next progress is an upsert)."""
    if len(_COUNTED) > _COUNTED_MAX:
        _COUNTED.clear()
    _COUNTED.update((stats.full_name, u) for u in user_ids)


def progress_update(checkpoint: dict, now: datetime) -> tuple[dict, dict]:
    """``(filter, update)`` of the upsert that carries a checkpoint into its user's counters."""
    user_id = checkpoint["user_id"]
    processed = int(checkpoint.get(BASE_FIELD) or 0) + int(checkpoint.get("processed_sms") or 0)
    return ({"_id": user_id},
            {"$max": {"processed_sms": processed, "last_flush_at": now},
             "$set": {"user_id": user_id, "status": checkpoint.get("status"),
                      "batch_id": checkpoint.get("batch_id"), "updated_at": now}})


def record_quarantined(raw: Collection, stats: Collection, user_ids: set[str], now: datetime) -> None:
    """Recount the quarantined SMS of ``user_ids`` and ``$set`` them (idempotent)."""
    for user_id in sorted(user_ids):
        quarantined, ungrounded = count_quarantined(raw, user_id)
        stats.update_one({"_id": user_id},
                         {"$set": {"user_id": user_id, "quarantined_sms": quarantined,
                                   "ungrounded_sms": ungrounded, "updated_at": now}},
                         upsert=True)


def changed_stats(stats: Collection, since: datetime | None) -> dict[str, dict]:
    """``{user_id: counters}`` of the users whose counters changed since ``since`` (all if ``None``)."""
    flt: dict[str, Any] = {} if since is None else {"updated_at": {"$gte": since}}
    out: dict[str, dict] = {}
    for doc in stats.find(flt, {"_id": 1, "processed_sms": 1, "quarantined_sms": 1, "ungrounded_sms": 1,
                                "status": 1, "last_flush_at": 1}):
        out[str(doc["_id"])] = {
            "processed_sms": int(doc.get("processed_sms") or 0),
            "quarantined_sms": int(doc.get("quarantined_sms") or 0),
            "ungrounded_sms": int(doc.get("ungrounded_sms") or 0),
            "run_status": doc.get("status"),
            "last_flush_at": doc.get("last_flush_at"),
        }
    return out


def summaries(raw: Collection, user_ids: list[str] | None = None) -> dict[str, dict]:
    """``{user_id: {total_sms, processed_sms, pending_sms, quarantined_sms, ungrounded_sms}}``
    counted over every SMS of ``user_ids`` (of all users when ``None``) in one
    aggregation (``ungrounded_sms``: quarantined by the grounding check).

    A scan of the users' SMS: for tests, tools and the invariants checker,
    never for a per-tick path (those read :func:`changed_stats`).  Users asked
    for but without documents come back as zeros.
    """
    match: dict[str, Any] = {}
    if user_ids is not None:
        if not user_ids:
            return {}
        match = {"user_id": {"$in": list(user_ids)}}
    is_processed = {"$eq": ["$isprocessed", True]}
    is_quarantined = {"$and": [{"$ne": ["$isprocessed", True]},
                               {"$eq": [{"$type": f"${QUARANTINE_FIELD}"}, "object"]}]}
    reason = {"$ifNull": [f"${QUARANTINE_FIELD}.reason", ""]}
    is_ungrounded = {"$and": [is_quarantined, {"$eq": [
        {"$substrCP": [reason, 0, len(UNGROUNDED_PREFIX)]}, UNGROUNDED_PREFIX]}]}
    pipeline = [
        {"$match": match},
        {"$group": {
            "_id": "$user_id",
            "total_sms": {"$sum": 1},
            "processed_sms": {"$sum": {"$cond": [is_processed, 1, 0]}},
            "quarantined_sms": {"$sum": {"$cond": [is_quarantined, 1, 0]}},
            "ungrounded_sms": {"$sum": {"$cond": [is_ungrounded, 1, 0]}},
        }},
    ]
    out: dict[str, dict] = {}
    for row in raw.aggregate(pipeline):
        total, done, quar = int(row["total_sms"]), int(row["processed_sms"]), int(row["quarantined_sms"])
        out[row["_id"] if isinstance(row["_id"], str) else str(row["_id"])] = {
            "total_sms": total, "processed_sms": done, "pending_sms": total - done - quar,
            "quarantined_sms": quar, "ungrounded_sms": int(row["ungrounded_sms"]),
        }
    for uid in user_ids or ():
        out.setdefault(uid, {"total_sms": 0, "processed_sms": 0, "pending_sms": 0, "quarantined_sms": 0,
                             "ungrounded_sms": 0})
    return out


def user_summary(stats: Collection, user_id: str, pending: int) -> dict:
    """``{total_sms, processed_sms, pending_sms, quarantined_sms}`` of one user from its
    counters and its ``pending`` count (``total`` = processed + quarantined + pending)."""
    doc = stats.find_one({"_id": user_id}) or {}
    processed, quarantined = int(doc.get("processed_sms") or 0), int(doc.get("quarantined_sms") or 0)
    return {"total_sms": processed + quarantined + int(pending), "processed_sms": processed,
            "pending_sms": int(pending), "quarantined_sms": quarantined,
            "ungrounded_sms": int(doc.get("ungrounded_sms") or 0),
            "status": doc.get("status"), "last_flush_at": doc.get("last_flush_at")}
