"""The combined commands of a group turn's flush (:mod:`smsd.group_writes` decides when).

Each function takes the waiting members' calls of one kind -- tuples whose
first element is the member's :class:`smsd.group_writes.GroupedStore` -- and
returns one outcome per call, in order: what the member's own
:class:`smsd.fencing.FencedStore` method would have returned, or the exception
it would have raised.  A batch of one call runs that member's own method.
Each member's part of a combined command carries that member's own epoch
filter.  Where the combined result cannot tell every member's outcome exactly
(fewer matched than asked, a write error), the members are settled by their
own per-user methods, which are idempotent: re-running a write that already
landed changes nothing, and the per-user method's own checks raise StaleEpoch
for exactly the members whose lease moved.  StoreUnavailable (MongoDB away) is
raised out of these functions and reaches every member of the batch.
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

from pymongo import UpdateMany, UpdateOne
from pymongo.errors import BulkWriteError, OperationFailure

from . import store_stats
from .failpoints import failpoint
from .fencing import KEEP_NEWER, FencedStore
from .lease import LEASES_COLLECTION
from .store import ID_CHUNK
from .store_errors import bulk_created
from .store_docs import BATCH_FIELD, QUARANTINE_FIELD, TRANSACTIONS_COLLECTION
from .store_stats import BASE_FIELD

log = logging.getLogger("smsd.group_writes")

#: Killed here: a combined command is acknowledged, its members have not had their results.
MID_WRITE = "group_mid_write"

_clock = threading.Lock()
_last_now: datetime | None = None


def utcnow() -> datetime:
    """Now (UTC, BSON's millisecond precision), never twice the same in this process.

    ``processed_at`` of a combined ``isprocessed`` update is this value, which is
    how its documents are told from those marked by any earlier write.
    """
    global _last_now
    now = datetime.now(timezone.utc)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)
    with _clock:
        if _last_now is not None and now <= _last_now:
            now = _last_now + timedelta(milliseconds=1)
        _last_now = now
    return now


def _own(fn: Callable[[], Any]) -> Any:
    """``fn()``'s result, or the exception it raised (an outcome for one member)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - handed to the member's thread, raised there
        return exc


def _chunks(ids: list) -> list[list]:
    return [ids[i:i + ID_CHUNK] for i in range(0, len(ids), ID_CHUNK)]


def _update_unprocessed(what: str, parts: list[tuple[Any, str, list, dict]], more: dict, count: str) -> int:
    """One ``update`` of ``UpdateMany`` statements, one per member (and ``_id`` chunk), each
    on its user's unprocessed SMS at its epoch filter: ``$set`` its fields (and ``more``).

    Returns the result's ``count`` (``matched_count`` / ``modified_count``) over all
    statements, or -1 after a write error (then nobody's outcome is known from it).
    """
    lead = parts[0][0]
    ops = [UpdateMany({"_id": {"$in": chunk}, "user_id": user, "isprocessed": {"$ne": True}, **store.fence_filter},
                      {"$set": fields, **more}) for store, user, ids, fields in parts for chunk in _chunks(ids)]
    total = -1
    try:
        with lead.errors(what):
            total = int(getattr(lead.raw.bulk_write(ops, ordered=False), count))
    except OperationFailure:     # BulkWriteError included; StoreUnavailable reaches every member
        log.info("group %s: a write error; each member is settled alone", what)
    failpoint(MID_WRITE)
    return total


# ---------------------------------------------------------------------- claim
def claim(calls: list[tuple[Any, list]]) -> list[Any]:
    """The flush's first write for every member: one ``update`` of ``UpdateMany`` statements.

    All matched: every member's items are its own (nothing processed, nothing of a
    newer epoch).  Otherwise each member's own claim tells what it gets.
    """
    if len(calls) == 1:
        store, items = calls[0]
        return [_own(lambda: FencedStore.claim(store, items))]
    parts = [(store, items[0].user_id, list(dict.fromkeys(item.raw_id for item in items)), store.fence_fields)
             for store, items in calls]
    matched = _update_unprocessed("claim", parts, {}, "matched_count")
    if matched == sum(len(ids) for _, _, ids, _ in parts):
        return [items for _, items in calls]
    return [_own(lambda s=store, i=items: FencedStore.claim(s, i)) for store, items in calls]


# ---------------------------------------------------------------- transactions
def transactions(calls: list[tuple[Any, str, list[dict]]]) -> list[Any]:
    """Every member's transaction documents in one lease-gated ``$merge``, then one read.

    ``aggregate`` on ``smsd_leases``: the members' leases, each ``$match``ed at
    its member's epoch; each lease keeps the documents of its own user
    (``$filter`` on ``user_id``), ``$merge`` as :meth:`FencedStore._gated_merge`
    does.  One ``find`` of the members' leases then shows, per member, that its
    lease is still at its epoch (so all its documents are stored), else its
    documents at its epoch are counted (fewer: StaleEpoch, as its own write says).
    """
    total = sum(len(docs) for _, _, docs in calls)
    if len(calls) == 1 or total > ID_CHUNK:
        return [_own(lambda s=store, u=user, d=docs: FencedStore._write_transactions(s, u, d))
                for store, user, docs in calls]
    lead = calls[0][0]
    every = [doc for _, _, docs in calls for doc in docs]
    merge = {"into": TRANSACTIONS_COLLECTION, "on": "_id", "whenMatched": KEEP_NEWER, "whenNotMatched": "insert"}
    users = [user for _, user, _ in calls]
    try:
        with lead.errors("gated write"):
            lead.collection(LEASES_COLLECTION).aggregate([
                {"$match": {"_id": {"$in": users}}},     # the index first, then each lease's epoch
                {"$match": {"$or": [{"_id": user, "epoch": store.epoch} for store, user, _ in calls]}},
                {"$project": {"doc": {"$filter": {"input": {"$literal": every},
                                                  "cond": {"$eq": ["$$this.user_id", "$_id"]}}}}},
                {"$unwind": "$doc"},
                {"$replaceWith": "$doc"},
                {"$merge": merge},
            ])
    except OperationFailure:
        # A duplicate key (another writer inserted one of these _ids): each member's own
        # gated write tells whose, idempotently.
        log.info("group transaction write refused; each member writes alone")
        return [_own(lambda s=store, u=user, d=docs: FencedStore._write_transactions(s, u, d))
                for store, user, docs in calls]
    failpoint(MID_WRITE)
    with lead.errors("gated write"):
        epochs = {doc["_id"]: doc.get("epoch") for doc in lead.collection(LEASES_COLLECTION).find(
            {"_id": {"$in": users}}, {"epoch": 1})}

    def settle(store: Any, user: str, docs: list[dict]) -> None:
        # A lease still at the member's epoch: its $match matched and nothing newer exists
        # (FencedStore.lease_at_our_epoch); otherwise its stored documents are counted.
        if epochs.get(user) != store.epoch:
            with store.errors("gated write"):
                store.check_written(user, store.count_at_our_epoch(TRANSACTIONS_COLLECTION, docs), len(docs))
    return [_own(lambda s=store, u=user, d=docs: settle(s, u, d)) for store, user, docs in calls]


# ----------------------------------------------------------------- isprocessed
def mark(calls: list[tuple[Any, str, list, str]]) -> list[Any]:
    """``isprocessed`` for every member in one ``update``; each member's newly marked count.

    When everything asked changed, each member marked all its SMS.  Otherwise one
    count of the documents this very command marked (``processed_at`` is unique to
    it), grouped by user, gives each member its count, and its own fencing check
    raises StaleEpoch where a newer epoch holds what it could not mark.
    """
    if len(calls) == 1:
        store, user, ids, batch_id = calls[0]
        return [_own(lambda: FencedStore.mark_processed(store, user, ids, batch_id))]
    lead = calls[0][0]
    now = utcnow()
    parts = [(store, user, ids, {"isprocessed": True, "processed_at": now, BATCH_FIELD: batch_id})
             for store, user, ids, batch_id in calls]
    changed = _update_unprocessed("mark_processed", parts, {"$unset": {QUARANTINE_FIELD: ""}}, "modified_count")
    if changed == sum(len(set(ids)) for _, _, ids, _ in calls):
        return [len(set(ids)) for _, _, ids, _ in calls]
    every = [i for _, _, ids, _ in calls for i in ids]
    with lead.errors("mark_processed"):
        counts = {row["_id"]: int(row["n"]) for chunk in _chunks(every) for row in lead.raw.aggregate([
            {"$match": {"_id": {"$in": chunk}, "processed_at": now}},
            {"$group": {"_id": "$user_id", "n": {"$sum": 1}}}])}
    return [_own(lambda s=store, u=user, i=ids: s.check_marked(u, i, counts.get(u, 0)))
            for store, user, ids, _ in calls]


# ------------------------------------------------------------------ checkpoint
def checkpoint(calls: list[tuple[Any, str, str, dict, dict, dict | None]]) -> list[Any]:
    """Every member's checkpoint update in one ``update``, one ``find`` of the results
    (of those whose member does not know it: :meth:`GroupedStore._after`), one write of
    the users' counters (:func:`smsd.store_stats.progress_op`)."""
    if len(calls) == 1:
        store, user, batch_id, _, kw, _ = calls[0]
        return [_own(lambda: FencedStore.checkpoint_progress(store, user, batch_id, **kw))]
    lead = calls[0][0]
    ops = [UpdateOne({"_id": batch_id, "user_id": user, **store.fence_filter}, [{"$set": fields}], upsert=True)
           for store, user, batch_id, fields, _, _ in calls]
    alone: set[int] = set()
    created: set[int] = set()
    try:
        with lead.errors("checkpoint_progress"):
            created = set(lead.checkpoints.bulk_write(ops, ordered=False).upserted_ids or {})
    except BulkWriteError as exc:
        # A newer epoch's checkpoint under one of these _ids (or another error): those
        # members' own update raises what it should; the others' statements are done.
        alone = {int(e["index"]) for e in exc.details.get("writeErrors", [])}
        created = {int(u["index"]) for u in exc.details.get("upserted", [])}
    failpoint(MID_WRITE)
    mine = [i for i in range(len(calls)) if i not in alone]
    # A member's known state stands for the read, unless its update created the document
    # (it was gone: the read shows it without its counters' base, and the member's own path sets it).
    docs = {calls[i][2]: calls[i][5] for i in mine if calls[i][5] is not None and i not in created}
    unknown = [calls[i][2] for i in mine if calls[i][2] not in docs]
    projection = {"user_id": 1, "batch_id": 1, "processed_sms": 1, "status": 1, BASE_FIELD: 1}
    if unknown:
        with lead.errors("checkpoint_progress"):
            docs.update((d["_id"], d) for d in lead.checkpoints.find({"_id": {"$in": unknown}}, projection))
    now = utcnow()
    progress = []
    for i in mine:
        store, user, batch_id, _, _, _ = calls[i]
        doc = docs.get(batch_id)
        if doc is None or doc.get("user_id") != user or doc.get(BASE_FIELD) is None:
            alone.add(i)     # gone, or a run older than the counters: the member's own path
        else:
            progress.append(store_stats.progress_op(lead.stats, doc, now))
    if progress:
        with lead.errors("checkpoint_progress"):
            bulk_created(lead.stats, progress)
        store_stats.counted(lead.stats, [calls[i][1] for i in mine if i not in alone])
    return [_own(lambda c=call: FencedStore.checkpoint_progress(c[0], c[1], c[2], **c[4]))
            if i in alone else None for i, call in enumerate(calls)]


# ------------------------------------------------------------ cache and costs
def bulk(calls: list[tuple[Any, str, list, str, Any]]) -> list[Any]:
    """Every member's writes into one collection (answer cache inserts, cost upserts) in one command;
    each member gets what :meth:`smsd.store.Store.bulk_upsert` returns for its own ops
    (the ops that created their document), by its own op index."""
    if len(calls) == 1:
        store, name, ops, what, wc = calls[0]
        return [_own(lambda: FencedStore.bulk_upsert(store, name, ops, what=what, write_concern=wc))]
    lead, name, _, what, wc = calls[0]
    every = [op for _, _, ops, _, _ in calls for op in ops]
    try:
        upserted = FencedStore.bulk_upsert(lead, name, every, what=what, write_concern=wc)
    except OperationFailure:     # BulkWriteError included; StoreUnavailable reaches every member
        log.info("group write to %s: a write error; each member writes alone", name)
        return [_own(lambda c=call: FencedStore.bulk_upsert(c[0], c[1], c[2], what=c[3], write_concern=c[4]))
                for call in calls]
    failpoint(MID_WRITE)
    out, start = [], 0
    for _, _, ops, _, _ in calls:
        out.append({i - start: v for i, v in upserted.items() if start <= i < start + len(ops)})
        start += len(ops)
    return out
