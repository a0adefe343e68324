"""Which MongoDB errors mean "not now": :class:`StoreUnavailable` and its classifier.

pymongo raises many kinds of errors; the pipeline must tell "MongoDB is away
or slow, keep journaling and retry" from "this write is wrong".  The server
codes and labels that mean the first, and the one exception type the
pipeline catches for them, are kept here apart from :class:`smsd.store.Store`
so that the policy sits in one short place.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pymongo.errors import (
    PyMongoError,
    BulkWriteError,
    ConnectionFailure,
    OperationFailure,
    WriteConcernError,
)

# Server error codes that mean "not now, try again" rather than "wrong".
_TRANSIENT_CODES = frozenset({
    6,      # HostUnreachable
    7,      # HostNotFound
    50,     # MaxTimeMSExpired
    64,     # WriteConcernFailed (wtimeout)
    89,     # NetworkTimeout
    91,     # ShutdownInProgress
    100,    # UnsatisfiableWriteConcern (not enough members right now)
    189,    # PrimarySteppedDown
    262,    # ExceededTimeLimit
    9001,   # SocketException
    10107,  # NotWritablePrimary
    11600,  # InterruptedAtShutdown
    11602,  # InterruptedDueToReplStateChange
    13435,  # NotPrimaryNoSecondaryOk
    13436,  # NotPrimaryOrSecondary
})


class StoreUnavailable(Exception):
    """MongoDB cannot be reached or did not acknowledge in time.

    Wraps pymongo's connection / timeout errors (``ServerSelectionTimeoutError``,
    ``AutoReconnect``, ``NetworkTimeout``, ``ConnectionFailure``, write-concern
    timeouts, primary step-downs).  Every write of :class:`Store` is idempotent,
    so the caller simply retries later.
    """


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionFailure, WriteConcernError)):
        return True
    if isinstance(exc, BulkWriteError):
        details = exc.details or {}
        write_errors = details.get("writeErrors") or []
        if not write_errors:
            return bool(details.get("writeConcernErrors"))
        return all(e.get("code") in _TRANSIENT_CODES for e in write_errors)
    if isinstance(exc, OperationFailure):
        if exc.code in _TRANSIENT_CODES:
            return True
        return exc.has_error_label("RetryableWriteError") or exc.has_error_label("TransientTransactionError")
    return False


@contextmanager
def guarded(what: str) -> Iterator[None]:
    """Run a MongoDB operation: pymongo's transient errors come out as :class:`StoreUnavailable`."""
    try:
        yield
    except StoreUnavailable:
        raise
    except PyMongoError as exc:
        if _is_transient(exc):
            raise StoreUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise


#: MongoDB's error code of a duplicate ``_id`` (or other unique key).
DUPLICATE_KEY = 11000
#: ``BadValue``: among others, a ``hint`` naming an index that does not exist.
BAD_VALUE = 2


class InsertElse:
    """A write of a document expected to be new: an insert of ``doc``, and only where its
    ``_id`` exists already, ``otherwise`` (an upsert that gives an existing document the
    same values).  :func:`bulk_created` runs it.

    Why: on the MongoDB-wire server smsd is measured on, an inserted document costs a
    fraction of an update statement (docs/BENCHMARKS.md, issue 12), and a user's first
    counters and its first bill of a day are new documents.  Either way the stored
    document is the one the upsert alone would leave, so a kill between the two writes
    and a replay change nothing.
    """

    __slots__ = ("doc", "otherwise")

    def __init__(self, doc: dict, otherwise: Any) -> None:
        self.doc = doc
        self.otherwise = otherwise

    @classmethod
    def of_upsert(cls, flt: dict, update: dict) -> "InsertElse":
        """For the upsert ``update_one(flt, update, upsert=True)``: the document it would
        create (``flt``'s equalities, then ``$setOnInsert``, ``$set``, ``$max``, ``$min``)."""
        from pymongo import UpdateOne
        unknown = set(update) - {"$setOnInsert", "$set", "$max", "$min"}
        if unknown or any(k.startswith("$") or isinstance(v, dict) for k, v in flt.items()):
            raise ValueError(f"not an upsert of plain fields: {sorted(unknown) or flt}")
        doc = dict(flt)
        for op in ("$setOnInsert", "$set", "$max", "$min"):
            doc.update(update.get(op, {}))
        return cls(doc, UpdateOne(flt, update, upsert=True))


def bulk_created(coll: Any, ops: list) -> dict:
    """One unordered ``bulk_write`` of ``ops``: ``{op index: True}`` for each op that created
    its document.  An ``InsertOne`` whose ``_id`` exists already (:data:`DUPLICATE_KEY`)
    created nothing and is not an error; an :class:`InsertElse` whose ``_id`` exists runs
    its ``otherwise`` upsert in a second ``bulk_write``; any other write error raises."""
    from pymongo import InsertOne
    from pymongo.errors import BulkWriteError
    first = [InsertOne(op.doc) if isinstance(op, InsertElse) else op for op in ops]
    inserts = {i for i, op in enumerate(first) if isinstance(op, InsertOne)}
    duplicates: set[int] = set()
    try:
        res = coll.bulk_write(first, ordered=False)
        created = set(res.upserted_ids or {}) | inserts
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY or e.get("index") not in inserts for e in errors):
            raise
        duplicates = {e["index"] for e in errors}
        created = {u["index"] for u in exc.details.get("upserted", [])} | (inserts - duplicates)
    again = sorted(i for i in duplicates if isinstance(ops[i], InsertElse))
    if again:
        res = coll.bulk_write([ops[i].otherwise for i in again], ordered=False)
        created |= {again[j] for j in (res.upserted_ids or {})}
    return dict.fromkeys(sorted(created), True)
