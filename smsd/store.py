"""MongoDB side of smsd: the three seed collections, their indexes, idempotent writes.

The collections, their fields and the documents smsd writes are described in
:mod:`smsd.store_docs`; which errors mean "MongoDB is away" in :mod:`smsd.store_errors`.

Every write uses ``j: true`` (and ``w: "majority"`` on a replica set) and is
idempotent, so a flush may be replayed any number of times (DESIGN.md
invariants 2, 3, 7).  Every connection or timeout error of pymongo surfaces
as :class:`StoreUnavailable`, the one type the pipeline catches to keep
journaling while MongoDB is away.

The pending set
---------------
An SMS of user ``U`` is pending when ``user_id == U``, ``isprocessed`` is not
true (``false`` or missing) and it carries no ``smsd_quarantine``.  The query
is written ``{user_id: U, smsd_quarantine: null, isprocessed: {$in: [false,
null]}}`` (``null`` matches a missing field; a quarantine is always a
sub-document, never ``null``), sorted by ``_id``.  That shape -- equalities
plus exactly one ``$in`` -- is what SecantusDB's planner serves from the
compound index ``smsd_pending_by_user (user_id, smsd_quarantine, isprocessed,
_id)``: ``explain()`` shows ``IXSCAN smsd_pending_by_user`` under a blocking
in-memory ``SORT`` on ``_id`` (it examines exactly the user's pending
documents).  The form ``smsd_quarantine: {$exists: false}`` plans as a
``COLLSCAN`` there, because SecantusDB only plans "equalities + one range/$in
field".  On mongod the same index serves both the filter and, by exploding the
``$in`` into point intervals merged in ``_id`` order, the sort.

No client exists at import time: pymongo is not fork-safe and the supervisor
forks its workers before any of them creates a :class:`Store`.
"""
from __future__ import annotations

import copy
import logging
import os
import threading
import time
import uuid
from collections.abc import Collection as AbcCollection
from datetime import datetime, timezone
from typing import Any

import pymongo
from pymongo import ReplaceOne, ReturnDocument, UpdateOne, WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import PyMongoError

from smsd.model import FlushItem, Malformed, Quarantine, Sms, sms_key
# Names callers import from smsd.store (collections, indexes, malformed reasons,
# StoreUnavailable) stay importable from here.
from smsd.store_docs import (
    BATCH_FIELD, CHECKPOINT_STATUSES, CHECKPOINTS_COLLECTION, IDX_DISCOVERY,
    IDX_LATEST_CHECKPOINT, IDX_PENDING, IDX_TX_BY_SMS, MALFORMED_TEXT_EMPTY, MALFORMED_TEXT_MISSING,
    MALFORMED_TEXT_NOT_STRING, MALFORMED_TEXT_TOO_LONG, MALFORMED_USER_ID, QUARANTINE_FIELD,
    RAW_COLLECTION, RETIRED_INDEXES, STATUS_COMPLETED, STATUS_IN_PROGRESS, TRANSACTIONS_COLLECTION, _get_path,
    checkpoint_fields, delete_stale_transactions, latest_run, transaction_doc,
)
from smsd.store_errors import StoreUnavailable, _is_transient, bulk_created, guarded  # noqa: F401 - re-exported
from smsd import store_stats
from smsd.store_stats import BASE_FIELD, STATS_COLLECTION

log = logging.getLogger("smsd.store")

#: ``_id`` lists longer than this are split over several commands.
ID_CHUNK = 500
#: How long a checkpoint read by latest_checkpoint stands in for checkpoint_start's own read.
LATEST_FRESH_S = 30.0


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_doc(user_id: str, total_sms: int, base: int, extra: dict) -> dict:
    """A new run's checkpoint document: ``_id`` = ``batch_id`` (uuid4 hex), ``in_progress``."""
    batch_id = uuid.uuid4().hex
    return {"_id": batch_id, "user_id": user_id, "batch_id": batch_id, "total_sms": int(total_sms),
            "processed_sms": 0, "last_processed_id": None, "checkpoint_timestamp": _utcnow(),
            "status": STATUS_IN_PROGRESS, BASE_FIELD: base, **extra}


class Store:
    """All of smsd's MongoDB reads and writes.

    The client is created lazily on first use (never at import, never before
    the supervisor forks) and re-created if the process has forked since.
    Datetimes read back are timezone-aware UTC.
    """

    fence_filter: dict[str, Any] = {}   # smsd.fencing.FencedStore: extra filter of a user's writes,
    fence_fields: dict[str, Any] = {}   # and the fields they stamp (none in a plain Store)

    def __init__(
        self,
        uri: str,
        db_name: str,
        *,
        text_field: str = "body",
        sender_field: str = "sender",
        time_field: str = "received_at",
        timeout_ms: int = 5000,
        app_name: str = "smsd",
        max_text_chars: int = 2000,
        socket_timeout_ms: int | None = None,
    ) -> None:
        """Describe the connection; nothing is connected yet.

        Args:
            uri: MongoDB connection string.
            db_name: database holding the three collections.
            text_field / sender_field / time_field: raw SMS field names
                (``config.toml`` settings; dotted paths allowed).
            timeout_ms: server selection, connect and write-concern timeout.
            app_name: ``appName`` shown in the server's logs.
            max_text_chars: longer SMS texts are :class:`Malformed`.
            socket_timeout_ms: per-operation socket timeout (default
                ``max(6 * timeout_ms, 30000)``).
        """
        self.uri = uri
        self.db_name = db_name
        self.text_field = text_field
        self.sender_field = sender_field
        self.time_field = time_field
        self.timeout_ms = int(timeout_ms)
        self.app_name = app_name
        self.max_text_chars = int(max_text_chars)
        self.socket_timeout_ms = int(socket_timeout_ms or max(6 * self.timeout_ms, 30000))
        self._lock = threading.Lock()
        self._client: pymongo.MongoClient | None = None
        self._client_pid: int | None = None
        self._db: Database | None = None
        self._replica_set: bool | None = None
        # The latest checkpoint read per user (and when), so that checkpoint_start right
        # after it need not read it again; dropped by any checkpoint write of the user.
        self._latest_seen: dict[str, tuple[float, dict | None]] = {}

    # ------------------------------------------------------------------ plumbing
    #: ``with store.errors("what"):``: pymongo's transient errors as :class:`StoreUnavailable`.
    _errors = errors = staticmethod(guarded)

    def _database(self) -> Database:
        """The database handle with smsd's write concern; connects on first use."""
        with self._lock:
            if self._db is not None and self._client_pid == os.getpid():
                return self._db
            if self._client is not None and self._client_pid == os.getpid():
                client = self._client
            else:
                # First use, or a forked child holding its parent's client:
                # never reuse pymongo's sockets across fork().
                client = pymongo.MongoClient(
                    self.uri,
                    appname=self.app_name,
                    serverSelectionTimeoutMS=self.timeout_ms,
                    connectTimeoutMS=self.timeout_ms,
                    socketTimeoutMS=self.socket_timeout_ms,
                    retryWrites=True,
                    retryReads=True,
                    tz_aware=True,
                    tzinfo=timezone.utc,
                    connect=False,
                )
                self._client = client
                self._client_pid = os.getpid()
                self._db = None
            with self._errors("hello"):
                hello = client.admin.command("hello")
            self._replica_set = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
            wc = WriteConcern(w="majority" if self._replica_set else 1, j=True, wtimeout=self.timeout_ms)
            self._db = client.get_database(self.db_name, write_concern=wc)
            log.debug("connected db=%s replica_set=%s", self.db_name, self._replica_set)
            return self._db

    @property
    def raw(self) -> Collection:
        """``sms_fin_rawdata`` (with smsd's write concern)."""
        return self._database()[RAW_COLLECTION]

    @property
    def transactions(self) -> Collection:
        """``financial_transactions`` (with smsd's write concern)."""
        return self._database()[TRANSACTIONS_COLLECTION]

    @property
    def checkpoints(self) -> Collection:
        """``processing_checkpoints`` (with smsd's write concern)."""
        return self._database()[CHECKPOINTS_COLLECTION]

    @property
    def stats(self) -> Collection:
        """``smsd_user_stats``: per-user counters (:mod:`smsd.store_stats`)."""
        return self._database()[STATS_COLLECTION]

    @property
    def write_concern(self) -> WriteConcern:
        """The write concern every write uses: ``j: true``, ``w: majority`` on a replica set."""
        return self._database().write_concern

    @property
    def is_replica_set(self) -> bool:
        """True when the server said it is part of a replica set (or is a mongos)."""
        self._database()
        return bool(self._replica_set)

    def close(self) -> None:
        """Close the client (a later call connects again)."""
        with self._lock:
            client, self._client, self._db = self._client, None, None
            pid, self._client_pid = self._client_pid, None
        if client is not None and pid == os.getpid():
            client.close()

    def sibling(self) -> "Store":
        """A copy sharing this connected store's client (closing it closes nothing); with
        MongoDB away, a copy that will connect (and close) a client of its own."""
        try:
            self._database()
        except StoreUnavailable:
            return copy.copy(self)
        twin = copy.copy(self)
        twin.close = lambda: None   # type: ignore[method-assign] - the client is the original's
        return twin

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ping(self) -> bool:
        """True when the server answers a ``ping`` within the timeout."""
        try:
            db = self._database()
            with self._errors("ping"):
                db.client.admin.command("ping")
            return True
        except (StoreUnavailable, PyMongoError):
            return False

    def ensure_indexes(self) -> None:
        """Create smsd's indexes, drop those it no longer keeps (idempotent; on every start).

        * ``sms_fin_rawdata``: ``smsd_pending_by_user (user_id, smsd_quarantine,
          isprocessed, _id)``: one user's pending and quarantined SMS;
          ``smsd_pending_discovery (smsd_quarantine, isprocessed, user_id)``: "which
          users have pending SMS".  No more: every ``isprocessed`` update writes each
          index (``RETIRED_INDEXES``).
        * ``financial_transactions``: ``smsd_tx_by_sms (user_id, sms_id)``.
        * ``processing_checkpoints``: ``smsd_latest_checkpoint (user_id,
          checkpoint_timestamp desc)``.
        * ``smsd_user_stats``: ``smsd_stats_by_update (updated_at)``.
        """
        with self._errors("ensure_indexes"):
            self.raw.create_indexes([
                pymongo.IndexModel([("user_id", 1), (QUARANTINE_FIELD, 1), ("isprocessed", 1), ("_id", 1)],
                                   name=IDX_PENDING),
                pymongo.IndexModel([(QUARANTINE_FIELD, 1), ("isprocessed", 1), ("user_id", 1)],
                                   name=IDX_DISCOVERY),
            ])
            for collection, names in RETIRED_INDEXES.items():
                for name in set(names) & set(self._database()[collection].index_information()):
                    self._database()[collection].drop_index(name)
            self.transactions.create_indexes([pymongo.IndexModel([("user_id", 1), ("sms_id", 1)],
                                                                 name=IDX_TX_BY_SMS)])
            self.checkpoints.create_indexes([
                pymongo.IndexModel([("user_id", 1), ("checkpoint_timestamp", -1)], name=IDX_LATEST_CHECKPOINT),
            ])
            self.stats.create_indexes(store_stats.STATS_INDEXES)

    # ------------------------------------------------------------------ reads
    @staticmethod
    def pending_filter(user_id: Any | None = None) -> dict:
        """The pending-set filter (of one user, or of all users when ``None``).

        Field order matters for SecantusDB's planner only in that the filter
        must be "equalities + one ``$in``"; see the module docstring.
        """
        flt: dict[str, Any] = {}
        if user_id is not None:
            flt["user_id"] = user_id
        flt[QUARANTINE_FIELD] = None
        flt["isprocessed"] = {"$in": [False, None]}
        return flt

    def count_pending(self, user_id: str) -> int:
        """Number of pending SMS of ``user_id`` (index-served count)."""
        with self._errors("count_pending"):
            return int(self.raw.count_documents(self.pending_filter(user_id)))

    def pending_users(self) -> dict[str, int]:
        """``{user_id: pending count}`` of every user with pending SMS (one aggregation).

        Documents whose ``user_id`` is not a string cannot be claimed by a
        worker; they are left out and logged.
        """
        pipeline = [
            {"$match": self.pending_filter()},
            {"$group": {"_id": "$user_id", "n": {"$sum": 1}}},
        ]
        out: dict[str, int] = {}
        odd = 0
        with self._errors("pending_users"):
            for row in self.raw.aggregate(pipeline):
                if isinstance(row["_id"], str):
                    out[row["_id"]] = int(row["n"])
                else:
                    odd += int(row["n"])
        if odd:
            log.warning("pending_users: %d pending documents have a user_id that is not a string", odd)
        return out

    def fetch_pending(
        self,
        user_id: str,
        *,
        limit: int,
        exclude_keys: AbcCollection[str] = (),
    ) -> tuple[list[Sms], list[Malformed]]:
        """The oldest pending SMS of ``user_id`` (by ``_id``), at most ``limit`` in all.

        Documents whose key (:func:`smsd.model.sms_key`) is in ``exclude_keys``
        (already answered in the caller's journal) are skipped.  The query asks
        for ``limit + len(exclude_keys)`` documents -- each excluded key can hide
        at most one -- and the cursor is closed as soon as ``limit`` usable ones
        are read, so up to ``limit`` documents come back whenever they exist.

        Returns ``(sms, malformed)``: well-formed SMS ready for the LLM, and
        documents that cannot be sent (text missing / not a string / blank /
        longer than ``max_text_chars``; ``user_id`` not a string), with a reason
        from the ``MALFORMED_*`` constants.  ``limit`` bounds both lists together.
        A ``received_at`` that is not a datetime, or a ``sender`` that is not a
        string, becomes ``None``.
        """
        if limit <= 0:
            return [], []
        excluded = exclude_keys if isinstance(exclude_keys, (set, frozenset)) else set(exclude_keys)
        query_limit = limit + len(excluded)
        with self._errors("fetch_pending"):
            cursor = self.raw.find(self.pending_filter(user_id), self.sms_projection, sort=[("_id", 1)],
                                   limit=query_limit, batch_size=min(query_limit, 1000))
            try:
                return self.page_of(cursor, limit, excluded)
            finally:
                cursor.close()

    @property
    def sms_projection(self) -> dict:
        """The fields of a raw SMS that a page reads."""
        return {"_id": 1, "user_id": 1, self.text_field: 1, self.sender_field: 1, self.time_field: 1}

    def page_of(self, docs: Any, limit: int, excluded: AbcCollection[str] = ()) -> tuple[list[Sms], list[Malformed]]:
        """A page from raw documents sorted by ``_id`` (:meth:`fetch_pending`'s rules): keys in
        ``excluded`` skipped, the rest classified, at most ``limit`` in all."""
        sms: list[Sms] = []
        bad: list[Malformed] = []
        for doc in docs:
            key = sms_key(doc["_id"])
            if key in excluded:
                continue
            item = self._classify(doc, key)
            (sms if isinstance(item, Sms) else bad).append(item)
            if len(sms) + len(bad) >= limit:
                break
        return sms, bad

    def fetch_by_ids(self, user_id: str, raw_ids: list) -> list[Sms]:
        """The well-formed SMS among ``raw_ids`` of ``user_id`` (a batch job rebuilt from its journal)."""
        with self._errors("fetch_by_ids"):
            docs = list(self.raw.find({"_id": {"$in": list(raw_ids)}, "user_id": user_id}, self.sms_projection))
        items = (self._classify(doc, sms_key(doc["_id"])) for doc in docs)
        return [i for i in items if isinstance(i, Sms)]

    def _classify(self, doc: dict, key: str) -> Sms | Malformed:
        raw_id = doc["_id"]
        uid = doc.get("user_id")
        if not isinstance(uid, str):
            return Malformed(raw_id=raw_id, key=key, user_id=str(uid), reason=MALFORMED_USER_ID)
        present, text = _get_path(doc, self.text_field)
        reason = None
        if not present or text is None:
            reason = MALFORMED_TEXT_MISSING
        elif not isinstance(text, str):
            reason = MALFORMED_TEXT_NOT_STRING
        elif not text.strip():
            reason = MALFORMED_TEXT_EMPTY
        elif len(text) > self.max_text_chars:
            reason = MALFORMED_TEXT_TOO_LONG
        if reason is not None:
            return Malformed(raw_id=raw_id, key=key, user_id=uid, reason=reason)
        _, sender = _get_path(doc, self.sender_field)
        _, received = _get_path(doc, self.time_field)
        return Sms(
            raw_id=raw_id,
            key=key,
            user_id=uid,
            text=text,
            sender=sender if isinstance(sender, str) else None,
            received_at=received if isinstance(received, datetime) else None,
        )

    # ------------------------------------------------------------------ writes
    def upsert_transactions(self, items: list[FlushItem], *,
                            replace_stale: bool | AbcCollection[str] = False) -> None:
        """Write the transaction documents of ``items`` (idempotent upserts).

        One unordered ``bulk_write`` of ``ReplaceOne({_id: transaction_id(key, i)},
        doc, upsert=True)``: replaying the same items leaves the same documents
        (only ``created_at``, the time of the last write, moves).  Items whose
        result has no transactions (``kind`` other than ``transaction``) write
        nothing here; the pipeline still marks them processed.

        With ``replace_stale=True`` the SMS's transaction documents that the new
        answer does not have (a position beyond its count, e.g. after an SMS was
        asked again and answered with fewer transactions) are deleted, after the
        upserts.  Off by default: a plain replay of one journal row never needs it.
        ``replace_stale`` may also be a collection of SMS keys: only those items are
        checked (one ``find`` for all of them; none when it is empty).
        """
        if not items:
            return
        now = _utcnow()
        docs: list[dict] = []
        for item in items:
            key = sms_key(item.raw_id)
            if item.result.key != key:
                log.warning("flush item key %s does not match its raw id key %s; using the raw id",
                            item.result.key, key)
            for index, tx in enumerate(item.result.transactions):
                docs.append({**transaction_doc(item, index, tx, now), **self.fence_fields})
        new_ids = {doc["_id"] for doc in docs}
        with self._errors("upsert_transactions"):
            if docs:
                self._write_transactions(items[0].user_id, docs)
            if replace_stale is True:
                self._delete_stale(items, new_ids)
            elif replace_stale:
                self._delete_stale([i for i in items if i.result.key in replace_stale], new_ids)

    def _write_transactions(self, user_id: str, docs: list[dict]) -> None:
        """Upsert whole transaction documents by ``_id`` (one unordered bulk write)."""
        self.transactions.bulk_write([ReplaceOne({"_id": doc["_id"], **self.fence_filter}, doc, upsert=True)
                                      for doc in docs], ordered=False)

    def _delete_stale(self, items: list[FlushItem], new_ids: set[str]) -> None:
        n = delete_stale_transactions(self.transactions, items, new_ids, self.fence_filter, ID_CHUNK)
        if n:
            log.info("deleted %d stale transaction documents", n)

    def mark_processed(self, user_id: str, raw_ids: list, batch_id: str) -> int:
        """Set ``isprocessed: true`` (+ ``processed_at``, ``smsd_batch_id``) on the given SMS.

        Only documents of ``user_id`` not yet processed change, so a replay is a
        no-op; any quarantine mark is removed at the same time.  Returns the
        number of documents NEWLY marked.  Call it only after their transactions
        are stored (invariant 3).
        """
        if not raw_ids:
            return 0
        now = _utcnow()
        changed = 0
        with self._errors("mark_processed"):
            for start in range(0, len(raw_ids), ID_CHUNK):
                chunk = list(raw_ids[start:start + ID_CHUNK])
                # `_id` first: SecantusDB serves the clause it can look up first.
                result = self.raw.update_many(
                    {"_id": {"$in": chunk}, "user_id": user_id, "isprocessed": {"$ne": True}, **self.fence_filter},
                    {"$set": {"isprocessed": True, "processed_at": now, BATCH_FIELD: batch_id},
                     "$unset": {QUARANTINE_FIELD: ""}},
                )
                changed += int(result.modified_count)
        return changed

    def quarantine(self, items: list[Quarantine]) -> None:
        """Take SMS out of the pending set: ``$set smsd_quarantine: {reason, attempts, at}``.

        Processed SMS are left alone.  Idempotent (a repeat only refreshes the
        mark).  ``Quarantine.extra`` is stored under ``smsd_quarantine.extra``
        when not empty -- never put SMS text there.
        """
        if not items:
            return
        now = _utcnow()
        ops = []
        for q in items:
            mark: dict[str, Any] = {"reason": q.reason, "attempts": int(q.attempts), "at": now}
            if q.extra:
                mark["extra"] = q.extra
            flt = {"_id": q.raw_id, "user_id": q.user_id, "isprocessed": {"$ne": True}, **self.fence_filter}
            ops.append(UpdateOne(flt, {"$set": {QUARANTINE_FIELD: mark}}))
        with self._errors("quarantine"):
            self.raw.bulk_write(ops, ordered=False)
            store_stats.record_quarantined(self.raw, self.stats, {q.user_id for q in items}, now)

    def unquarantine(self, user_id: str, raw_ids: list | None = None) -> int:
        """Put ``user_id``'s quarantined SMS (or only ``raw_ids``) back in the pending set.

        Returns the number of documents changed (``smsctl retry``).
        """
        flt: dict[str, Any] = {"user_id": user_id, QUARANTINE_FIELD: {"$exists": True}}
        if raw_ids is not None:
            if not raw_ids:
                return 0
            flt = {"_id": {"$in": list(raw_ids)}, **flt}
        with self._errors("unquarantine"):
            changed = int(self.raw.update_many(flt, {"$unset": {QUARANTINE_FIELD: ""}}).modified_count)
            store_stats.record_quarantined(self.raw, self.stats, {user_id}, _utcnow())
            return changed

    def list_quarantined(self, user_id: str | None = None, limit: int = 1000) -> list[dict]:
        """Quarantined, unprocessed SMS: ``{user_id, sms_id, reason, attempts, at}``.

        ``sms_id`` is the key string (:func:`smsd.model.sms_key`).  The SMS text
        is never read.  Oldest first.
        """
        # `$gte: {}` matches exactly the documents whose mark is a sub-document
        # (type bracketing) and, unlike `$exists`, rides the indexes.
        flt: dict[str, Any] = {}
        if user_id is not None:
            flt["user_id"] = user_id
        flt[QUARANTINE_FIELD] = {"$gte": {}}
        out: list[dict] = []
        with self._errors("list_quarantined"):
            cursor = self.raw.find(flt, {"_id": 1, "user_id": 1, "isprocessed": 1, QUARANTINE_FIELD: 1},
                                   sort=[("_id", 1)])
            try:
                for doc in cursor:
                    if doc.get("isprocessed") is True:
                        continue
                    mark = doc.get(QUARANTINE_FIELD) or {}
                    out.append({
                        "user_id": doc.get("user_id"),
                        "sms_id": sms_key(doc["_id"]),
                        "reason": mark.get("reason"),
                        "attempts": mark.get("attempts", 0),
                        "at": mark.get("at"),
                    })
                    if len(out) >= limit:
                        break
            finally:
                cursor.close()
        return out

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_start(self, user_id: str, total_sms: int) -> dict:
        """Open a new run of ``user_id``: a new checkpoint document, returned.

        ``_id`` = ``batch_id`` (uuid4 hex), ``status: in_progress``,
        ``processed_sms: 0`` -- the seed guide's schema, plus ``smsd_processed_before``
        (:mod:`smsd.store_stats`).
        """
        seen = self._latest_seen.get(user_id)
        previous = seen[1] if seen and time.monotonic() - seen[0] < LATEST_FRESH_S \
            else self.latest_checkpoint(user_id)
        self._latest_seen.pop(user_id, None)   # this run is the user's latest now
        with self._errors("checkpoint_start"):
            base = store_stats.base_for_new_run(self.raw, user_id, previous)
        doc = new_run_doc(user_id, total_sms, base, self.fence_fields)
        with self._errors("checkpoint_start"):
            self._insert_checkpoint(dict(doc))
        return doc

    def _insert_checkpoint(self, doc: dict) -> None:
        self.checkpoints.insert_one(doc)

    def latest_checkpoint(self, user_id: str, since: datetime | None = None) -> dict | None:
        """The checkpoint of ``user_id`` with the newest ``checkpoint_timestamp``, or ``None``;
        ``since``: a run's timestamp, which bounds the read (:func:`smsd.store_docs.latest_run`)."""
        with self._errors("latest_checkpoint"):
            doc = latest_run(self.checkpoints, user_id, since)
        self._latest_seen[user_id] = (time.monotonic(), doc)
        return doc

    def checkpoint_progress(
        self,
        user_id: str,
        batch_id: str,
        *,
        processed_sms: int,
        total_sms: int | None,
        last_processed_id: Any,
        status: str,
    ) -> None:
        """Move run ``batch_id`` forward; never backward (idempotent, replay-safe).

        ``processed_sms``, ``total_sms``, ``checkpoint_timestamp`` and
        ``last_processed_id`` (the raw ``_id``; SMS are taken oldest ``_id``
        first) move with ``$max``.  ``status`` is set, except that a
        ``completed`` run never goes back to ``in_progress``.  One pipeline
        update; upserts the document if the run's start was never written.
        The user's counters (:mod:`smsd.store_stats`) follow from the updated document.
        """
        if status not in CHECKPOINT_STATUSES:
            raise ValueError(f"status must be one of {CHECKPOINT_STATUSES}, not {status!r}")

        now = _utcnow()
        fields = checkpoint_fields(user_id, batch_id, processed_sms=processed_sms, total_sms=total_sms,
                                   last_processed_id=last_processed_id, status=status, now=now,
                                   extra=self.fence_fields)
        self._latest_seen.pop(user_id, None)
        with self._errors("checkpoint_progress"):
            doc = self.checkpoints.find_one_and_update(
                {"_id": batch_id, "user_id": user_id, **self.fence_filter}, [{"$set": fields}], upsert=True,
                projection={"user_id": 1, "batch_id": 1, "processed_sms": 1, "status": 1, BASE_FIELD: 1},
                return_document=ReturnDocument.AFTER)
            if doc.get(BASE_FIELD) is None:   # a run that started before the counters existed
                base = store_stats.base_for_old_run(self.raw, user_id, batch_id)
                self.checkpoints.update_one({"_id": batch_id, BASE_FIELD: None}, {"$set": {BASE_FIELD: base}})
                doc[BASE_FIELD] = base
            store_stats.record_progress(self.stats, doc, now)

    def count_processed_in_batch(self, user_id: str, batch_id: str) -> int:
        """Number of ``user_id``'s SMS marked processed by run ``batch_id``."""
        with self._errors("count_processed_in_batch"):
            return store_stats.count_processed(self.raw, user_id, batch_id)

    def collection(self, name: str) -> Collection:
        """Another collection of smsd's database (the ledger, the answer cache), same write concern."""
        return self._database()[name]

    def bulk_upsert(self, name: str, ops: list, *, what: str, write_concern: WriteConcern | None = None) -> dict:
        """One unordered ``bulk_write`` of ``ops`` (upserts, or ``InsertOne`` of write-once
        documents) into ``name``: :func:`smsd.store_errors.bulk_created`."""
        coll = self.collection(name).with_options(write_concern=write_concern or self.write_concern)
        with self._errors(what):
            return bulk_created(coll, ops)

    # ------------------------------------------------------------------ status / tests
    def user_summaries(self, user_ids: list[str] | None = None) -> dict[str, dict]:
        """``{user_id: {total_sms, processed_sms, pending_sms, quarantined_sms, ungrounded_sms}}``,
        counted over every SMS of the users (a scan: for tests and tools, never a tick; see
        :func:`smsd.store_stats.summaries`)."""
        with self._errors("user_summaries"):
            return store_stats.summaries(self.raw, user_ids)

    def user_summary(self, user_id: str) -> dict:
        """One user's counters and pending count (index-served): :func:`smsd.store_stats.user_summary`."""
        pending = self.count_pending(user_id)
        with self._errors("user_summary"):
            return store_stats.user_summary(self.stats, user_id, pending)

    def changed_stats(self, since: datetime | None = None) -> dict[str, dict]:
        """Per-user counters updated since ``since`` (all when ``None``): :func:`smsd.store_stats.changed_stats`."""
        with self._errors("changed_stats"):
            return store_stats.changed_stats(self.stats, since)

    def transactions_for(self, user_id: str) -> list[dict]:
        """All transaction documents of ``user_id``, by ``_id`` (tests and drills)."""
        with self._errors("transactions_for"):
            return list(self.transactions.find({"user_id": user_id}, sort=[("_id", 1)]))
