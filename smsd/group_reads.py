"""The reads (and the one write) of a group turn's prologue: one command each for all its users.

Each function is the several-users form of a read a pipeline makes for
itself at the start of its run (:meth:`smsd.pipeline.Pipeline._start_run`,
its first claim, the answer-cache lookup, the handover lookup), with the same
filter and order, so a member that starts from what was read here behaves as if
it had read it itself.  Where one command cannot answer for a user
(a pending set longer than the read could return), the caller leaves that
user to its own reads.
"""
from __future__ import annotations

from datetime import datetime

from bson import ObjectId

from .answer_cache import COLLECTION as CACHE_COLLECTION
from .fencing import EPOCH_FIELD, FencedStore
from .handover import HANDOVER_COLLECTION
from .lease import LEASES_COLLECTION
from .model import SmsResult
from .store import Store
from .store_docs import CHECKPOINTS_COLLECTION, LATEST_ORDER, QUARANTINE_FIELD, latest_run

#: A group turn has a few small users; more ids than this go in several commands.
ID_CHUNK = 500


def latest_checkpoints(store: Store, user_ids: list[str],
                       since: dict[str, datetime] | None = None) -> dict[str, dict | None]:
    """``{user_id: its checkpoint with the newest checkpoint_timestamp (or None)}``, as
    :meth:`smsd.store.Store.latest_checkpoint` orders them (timestamp, then ``_id``, newest first).

    A user with a bound in ``since`` (its journal's note, :mod:`smsd.journal_runs`)
    is read through an index range of its runs since, one ``find`` each: in one
    command the users' ``$in`` and the range would make the server scan every
    checkpoint.  The others (new to this host) share one aggregation.
    """
    since = since or {}
    out: dict[str, dict | None] = dict.fromkeys(user_ids)
    with store.errors("latest_checkpoints"):
        bounded = [u for u in user_ids if since.get(u) is not None]
        for user_id in bounded:
            out[user_id] = latest_run(store.checkpoints, user_id, since[user_id])
        rest = [u for u in user_ids if u not in bounded]
        if rest:
            for row in store.checkpoints.aggregate([
                    {"$match": {"user_id": {"$in": rest}}},
                    {"$sort": {"user_id": 1, **dict(LATEST_ORDER)}},
                    {"$group": {"_id": "$user_id", "doc": {"$first": "$$ROOT"}}}]):
                out[row["_id"]] = row["doc"]
    return out


def pending_pages(store: Store, limits: dict[str, int]) -> tuple[dict[str, list[dict]], set[str]]:
    """The oldest pending raw documents of each user, in two ``find`` commands sorted by ``_id``.

    ``limits[u]`` is what user ``u``'s own read would ask for (its page plus its
    excluded keys).  Returns ``({user_id: docs}, complete)``: the users in
    ``complete`` have every pending document in the answer; for the others the
    answer was cut at the sum of the limits, and a user's documents are its own
    read's answer only when there are at least ``limits[u]`` of them (a prefix of
    its sorted set).

    Why two reads: "``isprocessed`` false or missing" is an ``$in``, and with the
    users' ``$in`` the filter has two, which the MongoDB-wire server's planner
    answers with a collection scan (a group turn's read then grew with every SMS
    ever stored).  ``isprocessed: false`` and ``isprocessed: null`` are each
    "equalities and one ``$in``", served by ``smsd_pending_by_user``.  A user
    with documents in both (a collector that sets the field on some SMS only) has
    them merged by ``_id`` where Python orders its ids as MongoDB does (all
    ObjectIds, all strings or all integers); otherwise it is left to its own read.
    """
    total = sum(limits.values())
    users = list(limits)
    parts: list[dict[str, list[dict]]] = []
    whole: list[bool] = []
    with store.errors("pending_pages"):
        for flt in pending_filters(users):
            got: dict[str, list[dict]] = {u: [] for u in users}
            n = 0
            # One more than the limits: a full answer says nothing was left out.
            for doc in store.raw.find(flt, store.sms_projection, sort=[("_id", 1)], limit=total + 1,
                                      batch_size=min(total + 1, 1000)):
                n += 1
                if doc.get("user_id") in got:
                    got[doc["user_id"]].append(doc)
            parts.append(got)
            whole.append(n <= total)
    out: dict[str, list[dict]] = {}
    complete: set[str] = set()
    (false_whole, null_whole) = whole
    for u in users:
        false_docs, null_docs = parts[0][u], parts[1][u]
        if false_docs and null_docs:
            merged = _merged(false_docs, null_docs) if false_whole and null_whole else None
            out[u] = merged or []
            if merged is not None:
                complete.add(u)
        elif false_whole and null_whole:
            out[u] = false_docs or null_docs
            complete.add(u)
        elif null_whole and not null_docs:
            out[u] = false_docs      # a cut read holds a prefix of each user's documents
        elif false_whole and not false_docs:
            out[u] = null_docs
        else:
            out[u] = []              # its own read tells
    return out, complete


def pending_filters(user_ids: list[str]) -> list[dict]:
    """The filters of :func:`pending_pages`' two reads: the users' SMS with ``isprocessed``
    false, and those without it (each "equalities and one ``$in``", index-served)."""
    return [{"user_id": {"$in": list(user_ids)}, QUARANTINE_FIELD: None, "isprocessed": value}
            for value in (False, None)]


def _merged(a: list[dict], b: list[dict]) -> list[dict] | None:
    """``a + b`` in MongoDB's ``_id`` order, or ``None`` where Python cannot order the ids alike."""
    ids = [d["_id"] for d in a + b]
    for kind in (ObjectId, str, int):
        if all(type(i) is kind for i in ids):
            return sorted(a + b, key=lambda d: d["_id"])
    return None


def processed_counts(store: Store, user_ids: list[str]) -> dict[str, int]:
    """Each user's processed SMS (:func:`smsd.store_stats.count_processed`), one aggregation."""
    out = dict.fromkeys(user_ids, 0)
    if not user_ids:
        return out
    with store.errors("processed_counts"):
        for row in store.raw.aggregate([
                {"$match": {"user_id": {"$in": list(user_ids)}, QUARANTINE_FIELD: None, "isprocessed": True}},
                {"$group": {"_id": "$user_id", "n": {"$sum": 1}}}]):
            out[row["_id"]] = int(row["n"])
    return out


def handovers(store: Store, keys: dict[str, list[str]]) -> dict[str, dict[str, SmsResult]]:
    """Handed-over answers (:func:`smsd.handover.adopt`) for the keys of every user."""
    out: dict[str, dict[str, SmsResult]] = {u: {} for u in keys}
    owner = {k: u for u, ks in keys.items() for k in ks}
    if not owner:
        return out
    ids = list(owner)
    with store.errors("handovers"):
        for start in range(0, len(ids), ID_CHUNK):
            for doc in store.collection(HANDOVER_COLLECTION).find(
                    {"_id": {"$in": ids[start:start + ID_CHUNK]}, "user_id": {"$in": list(keys)}}):
                user = owner.get(doc["_id"])
                if user != doc.get("user_id"):
                    continue
                try:
                    out[user][doc["_id"]] = SmsResult.from_json(doc["result"])
                except (KeyError, TypeError, ValueError):
                    out[user].pop(doc["_id"], None)   # unreadable: the member's own read logs it
    return out


def cache_entries(store: Store, cache_keys: set[str]) -> dict[str, dict | None]:
    """``{cache key: entry or None}`` of the answer cache for every key, one ``find``."""
    out: dict[str, dict | None] = dict.fromkeys(cache_keys)
    ids = sorted(cache_keys)
    with store.errors("answer cache lookup"):
        for start in range(0, len(ids), ID_CHUNK):
            for doc in store.collection(CACHE_COLLECTION).find({"_id": {"$in": ids[start:start + ID_CHUNK]}}):
                out[doc["_id"]] = doc
    return out


def insert_checkpoints(store: FencedStore, docs: list[dict]) -> set[str]:
    """The new runs' checkpoints, each written only while its user's lease is at the
    document's epoch (``smsd_epoch``), in one command: the several-users form of
    :meth:`smsd.fencing.FencedStore._gated_merge`.  Returns the users whose
    checkpoint is stored at its epoch (one read)."""
    if not docs:
        return set()
    db = store._database()
    users = [d["user_id"] for d in docs]
    with store.errors("checkpoint_start"):
        db[LEASES_COLLECTION].aggregate([
            {"$match": {"_id": {"$in": users}}},
            # Each lease keeps its own user's document before the unwind: unwinding every
            # document under every lease first cost (members)² documents of server work.
            {"$project": {"_id": 0, "doc": {"$filter": {"input": {"$literal": docs}, "cond": {"$and": [
                {"$eq": ["$$this.user_id", "$_id"]}, {"$eq": [f"$$this.{EPOCH_FIELD}", "$epoch"]}]}}}}},
            {"$unwind": "$doc"},
            {"$replaceWith": "$doc"},
            {"$merge": {"into": CHECKPOINTS_COLLECTION, "on": "_id", "whenMatched": "keepExisting",
                        "whenNotMatched": "insert"}}])
        wanted = {d["_id"]: (d["user_id"], d[EPOCH_FIELD]) for d in docs}
        stored = db[CHECKPOINTS_COLLECTION].find({"_id": {"$in": list(wanted)}}, {"user_id": 1, EPOCH_FIELD: 1})
        return {d["user_id"] for d in stored
                if (d.get("user_id"), d.get(EPOCH_FIELD)) == wanted.get(d["_id"])}
