"""The shape of smsd's MongoDB documents: names, reasons, and the transaction document.

Collection, field and index names (the seed guide's, plus smsd's own), the
checkpoint statuses, the reasons a raw SMS document is :class:`~smsd.model.Malformed`,
and the pure functions that read a raw document (:func:`_get_path`) and
build a ``financial_transactions`` document (:func:`transaction_doc`,
:func:`parse_occurred_at`).  Nothing here talks to a server; it is apart from
:class:`smsd.store.Store` so that the document format can be read, and
tested, without MongoDB.

Collections (the seed guide's names):

* ``sms_fin_rawdata`` -- written by whatever collects the SMS.  smsd reads it
  and sets only its own fields: ``isprocessed`` / ``processed_at`` /
  ``smsd_batch_id`` when an SMS is done, ``smsd_quarantine`` when it is taken
  out of the pending set.
* ``financial_transactions`` -- one document per transaction, deterministic
  ``_id`` (:func:`smsd.model.transaction_id`), written with upserts.
* ``processing_checkpoints`` -- one document per user run (``_id`` = batch id),
  counters moved with ``$max`` only.
"""
from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal
from typing import Any

from bson.decimal128 import Decimal128
from pymongo import DeleteMany

from smsd.model import OPTIONAL_FIELDS, FlushItem, Transaction, sms_key, transaction_id

RAW_COLLECTION = "sms_fin_rawdata"
TRANSACTIONS_COLLECTION = "financial_transactions"
CHECKPOINTS_COLLECTION = "processing_checkpoints"

QUARANTINE_FIELD = "smsd_quarantine"
BATCH_FIELD = "smsd_batch_id"

STATUS_IN_PROGRESS = "in_progress"
STATUS_COMPLETED = "completed"
CHECKPOINT_STATUSES = (STATUS_IN_PROGRESS, STATUS_COMPLETED)

#: Reasons given to :class:`~smsd.model.Malformed` documents.
MALFORMED_USER_ID = "user_id_not_string"
MALFORMED_TEXT_MISSING = "text_missing"
MALFORMED_TEXT_NOT_STRING = "text_not_string"
MALFORMED_TEXT_EMPTY = "text_empty"
MALFORMED_TEXT_TOO_LONG = "text_too_long"

#: Index names (``ensure_indexes``).
IDX_PENDING = "smsd_pending_by_user"
IDX_DISCOVERY = "smsd_pending_discovery"
IDX_TX_BY_SMS = "smsd_tx_by_sms"
IDX_LATEST_CHECKPOINT = "smsd_latest_checkpoint"
#: Indexes earlier versions made and this one drops (``ensure_indexes``), by collection.
#: ``smsd_processed_by_batch (user_id, smsd_batch_id)`` served only the count of a resumed
#: run's SMS, yet every ``isprocessed`` write kept it up: on SecantusDB each index of a
#: collection costs an updated document about as much again as the document itself.
RETIRED_INDEXES = {RAW_COLLECTION: ("smsd_processed_by_batch",)}


def _get_path(doc: dict, path: str) -> tuple[bool, Any]:
    """``(present, value)`` of a possibly dotted field path in ``doc``."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False, None
        cur = cur[part]
    return True, cur


def parse_occurred_at(text: str) -> datetime | None:
    """An ISO 8601 date or date-time string as a datetime, else ``None``.

    A bare date becomes midnight; a time with an offset keeps it (pymongo
    stores it as UTC); a naive time is taken as it is.
    """
    value = text.strip()
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        pass
    try:
        d = date.fromisoformat(value)
    except ValueError:
        return None
    return datetime(d.year, d.month, d.day)


def transaction_doc(item: FlushItem, index: int, tx: Transaction, now: datetime) -> dict:
    """The ``financial_transactions`` document of the ``index``-th transaction of ``item``."""
    key = sms_key(item.raw_id)
    prov = item.provenance
    doc: dict[str, Any] = {
        "_id": transaction_id(key, index),
        "user_id": item.user_id,
        "sms_id": item.raw_id,
        "sms_key": key,
        "position": index,
        "kind": item.result.kind,
        "direction": tx.direction,
        "amount": Decimal128(tx.amount),
        "currency": tx.currency,
    }
    for name in OPTIONAL_FIELDS:
        value = getattr(tx, name)
        if value is None:
            continue
        if name == "balance":
            doc["balance"] = Decimal128(value if isinstance(value, Decimal) else Decimal(str(value)))
        elif name == "occurred_at":
            doc["occurred_at_text"] = value
            parsed = parse_occurred_at(value) if isinstance(value, str) else None
            if parsed is not None:
                doc["occurred_at"] = parsed
        else:
            doc[name] = value
    doc["source"] = {
        "model": prov.model,
        "call_id": prov.call_id,
        "request_id": prov.request_id,
        "answered_at": prov.answered_at,
        "owner": prov.owner,
        "epoch": prov.epoch,
    }
    doc["created_at"] = now
    return doc


def checkpoint_fields(user_id: str, batch_id: str, *, processed_sms: int, total_sms: int | None,
                      last_processed_id: Any, status: str, now: datetime, extra: dict) -> dict:
    """The ``$set`` stage of a checkpoint's progress update (:meth:`smsd.store.Store.checkpoint_progress`).

    Counters, time and ``last_processed_id`` move with ``$max``; a ``completed``
    run stays completed; ``extra`` fields (the fencing epoch) are set as given.
    """
    def lit(value: Any) -> dict:
        return {"$literal": value}

    fields: dict[str, Any] = {
        "user_id": lit(user_id),
        "batch_id": lit(batch_id),
        "processed_sms": {"$max": [{"$ifNull": ["$processed_sms", 0]}, lit(int(processed_sms))]},
        "checkpoint_timestamp": {"$max": ["$checkpoint_timestamp", lit(now)]},
        "status": {"$cond": [{"$eq": ["$status", STATUS_COMPLETED]}, STATUS_COMPLETED, lit(status)]},
        **{k: lit(v) for k, v in extra.items()},
    }
    if total_sms is not None:
        fields["total_sms"] = {"$max": [{"$ifNull": ["$total_sms", 0]}, lit(int(total_sms))]}
    else:
        fields["total_sms"] = {"$ifNull": ["$total_sms", 0]}
    if last_processed_id is not None:
        fields["last_processed_id"] = {"$max": ["$last_processed_id", lit(last_processed_id)]}
    else:
        fields["last_processed_id"] = {"$ifNull": ["$last_processed_id", None]}
    return fields


#: The newest run first: the order of every "latest checkpoint" read.
LATEST_ORDER = [("checkpoint_timestamp", -1), ("_id", -1)]


def latest_run(checkpoints: Any, user_id: str, since: datetime | None) -> dict | None:
    """The user's checkpoint with the newest ``checkpoint_timestamp`` (then ``_id``), or ``None``.

    With ``since`` (some run's timestamp, :mod:`smsd.journal_runs`) only the runs
    since are read, an index range: the newest is among them, as timestamps only
    grow.  Nothing there (the run was removed by hand) reads them all.
    """
    if since is not None:
        doc = checkpoints.find_one({"user_id": user_id, "checkpoint_timestamp": {"$gte": since}},
                                   sort=LATEST_ORDER)
        if doc is not None:
            return doc
    return checkpoints.find_one({"user_id": user_id}, sort=LATEST_ORDER)


def delete_stale_transactions(transactions: Any, items: list[FlushItem], new_ids: set[str],
                              fence_filter: dict, chunk_size: int) -> int:
    """Delete the items' SMS's transaction documents not in ``new_ids`` (an older, longer answer's).

    One ``find`` per user and chunk of SMS ids, then ``DeleteMany`` filtered with
    ``fence_filter`` (a newer epoch's documents stay).  Returns how many were found stale.
    """
    by_user: dict[Any, list[Any]] = {}
    for item in items:
        by_user.setdefault(item.user_id, []).append(item.raw_id)
    stale: list[Any] = []
    for uid, raw_ids in by_user.items():
        for start in range(0, len(raw_ids), chunk_size):
            chunk = raw_ids[start:start + chunk_size]
            for doc in transactions.find({"user_id": uid, "sms_id": {"$in": chunk}}, {"_id": 1}):
                if doc["_id"] not in new_ids:
                    stale.append(doc["_id"])
    if stale:
        transactions.bulk_write([DeleteMany({"_id": {"$in": stale[i:i + chunk_size]}, **fence_filter})
                                 for i in range(0, len(stale), chunk_size)], ordered=False)
    return len(stale)
