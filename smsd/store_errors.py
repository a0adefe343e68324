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


def bulk_created(coll: Any, ops: list) -> dict:
    """One unordered ``bulk_write`` of ``ops``: ``{op index: True}`` for each op that created
    its document.  An ``InsertOne`` whose ``_id`` exists already (:data:`DUPLICATE_KEY`)
    created nothing and is not an error; any other write error raises."""
    from pymongo import InsertOne
    from pymongo.errors import BulkWriteError
    inserts = {i for i, op in enumerate(ops) if isinstance(op, InsertOne)}
    try:
        res = coll.bulk_write(ops, ordered=False)
    except BulkWriteError as exc:
        errors = exc.details.get("writeErrors", [])
        if any(e.get("code") != DUPLICATE_KEY or e.get("index") not in inserts for e in errors):
            raise
        created = {u["index"] for u in exc.details.get("upserted", [])} | (inserts - {e["index"] for e in errors})
        return dict.fromkeys(sorted(created), True)
    return dict.fromkeys(sorted(set(res.upserted_ids or {}) | inserts), True)
