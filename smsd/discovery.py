"""Questions the supervisor asks MongoDB, answered in a short-lived child.

The supervisor never opens a MongoClient (pymongo is not fork-safe, and the
supervisor forks workers all the time), so each question here runs in a
child process that the supervisor forks, reads a JSON answer from, and reaps.
The functions themselves are plain: they take the settings and return a
JSON-safe dict.
"""
from __future__ import annotations

import time
from collections.abc import Container, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from . import journal_scan
from pymongo.errors import PyMongoError

from .config import Settings
from .lease import Leases
from .store import Store, StoreUnavailable
from .worker import make_store


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def discover(settings: Settings, uri: str | None = None, *,
             journals_seen: Mapping[str, Sequence] | None = None,
             journals_check: Container[str] | None = None,
             stats_since: datetime | None = None, host: str = "", free_slots: int = 0,
             lease_users: Sequence[str] = (), indexes: bool = False) -> dict:
    """Users with pending SMS, changed counters and changed journals: one tick's news.

    Nothing here grows with the number of SMS smsd has processed: pending SMS
    are counted through the ``smsd_pending_discovery`` index (only pending
    documents are touched), the per-user counters are read only for users
    whose counters changed since ``stats_since`` (:mod:`smsd.store_stats`),
    and only journals changed since ``journals_seen`` are opened (of those
    not yet seen and those in ``journals_check``, when given:
    :func:`smsd.journal_scan.scan_changed`).  The caller keeps what earlier
    ticks returned and merges this answer into it.

    Journals are scanned first: a user with unflushed answers is worked on
    even while MongoDB is down (its worker waits, then flushes).

    With ``indexes`` it first creates smsd's indexes (:meth:`smsd.store.Store.ensure_indexes`,
    idempotent): ``"indexes": {"ok": true}``, or ``{"ok": false, "error": ...}`` where
    the server refused them (no ``createIndex`` right, an index of the same name and
    other keys); the tick goes on either way, as every later one would without them.

    With a ``host`` id it also says this host is alive (``smsd_hosts``, with
    its ``free_slots``) and reads the leases (:mod:`smsd.lease`) of the users
    with pending SMS and of ``lease_users`` (those with unflushed answers):
    ``"leases": {"by_user": {user_id: lease}, "hosts": live hosts, "held":
    [this host's unexpired leases]}``.

    Returns ``{"pending": {user_id: n} (every user with pending SMS),
    "counters": {user_id: {...}} (changed since ``stats_since``),
    "stats_through": ISO time the counters are complete up to, "counters_all":
    true when every user's counters were read, "journals",
    "journal_seen", "journal_gone" (see ``scan_changed``), "mongo": {ok, error},
    "took_s"}``; without MongoDB, ``pending``, ``counters`` and
    ``stats_through`` are absent.
    """
    started = time.time()
    answer: dict[str, Any] = {}
    changed = journal_scan.scan_changed(settings.state_dir, journals_seen or {}, journals_check)
    answer.update(journals=changed["journals"], journal_seen=changed["seen"], journal_gone=changed["gone"])
    mongo = {"ok": True, "error": None}
    leases: dict = {}
    store = make_store(settings, uri)
    try:
        if indexes:
            answer["indexes"] = _ensure_indexes(store)
        through = datetime.now(timezone.utc)
        counters = store.changed_stats(stats_since)
        answer.update(pending=store.pending_users(), counters=counters, stats_through=through,
                      counters_all=stats_since is None)
        if host:
            answer["leases"] = _leases(store, settings, host, free_slots,
                                       sorted(set(answer["pending"]) | set(lease_users)))
    except (StoreUnavailable, PyMongoError) as exc:
        mongo = {"ok": False, "error": f"MongoDB unavailable: {type(exc.__cause__ or exc).__name__}"}
    finally:
        store.close()
    answer.update(mongo=mongo, took_s=time.time() - started)
    return _jsonable(answer)


def _ensure_indexes(store: Store) -> dict:
    """Create smsd's indexes: ``{"ok": True}``, or the server's refusal (MongoDB being away
    is raised, as for the tick's reads: the next tick tries again)."""
    try:
        store.ensure_indexes()
    except PyMongoError as exc:   # not transient (guarded raised those as StoreUnavailable)
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {"ok": True}


def _leases(store: Store, settings: Settings, host: str, free_slots: int, user_ids: list[str]) -> dict:
    leases = Leases(store._database(), host, settings.lease.ttl)
    # A host counts as alive for a few discovery rounds (and at least a lease's TTL).
    alive_ms = int(max(settings.lease.ttl, 3 * settings.supervisor.discovery_interval) * 1000)
    hosts = leases.heartbeat(free_slots, alive_ms)
    by_user = leases.read(user_ids)
    held = [row for row in leases.read_owned() if not row.pop("free")]
    return {"by_user": by_user, "hosts": hosts, "held": held, "asked": user_ids}


def admin(settings: Settings, cmd: str, args: dict, uri: str | None = None) -> dict:
    """Operator commands that read or write MongoDB (quarantine, retry, checkpoint) or ask
    the LLM server (batch_cancel)."""
    if cmd == "batch_cancel":
        return _cancel_batch(settings, str(args.get("batch_id") or ""))
    store: Store = make_store(settings, uri)
    try:
        user_id = args.get("user_id")
        if cmd == "quarantine":
            return _jsonable({"quarantined": store.list_quarantined(user_id)})
        if cmd == "retry":
            n = store.unquarantine(user_id)
            return {"requeued": n, "user_id": user_id}
        if cmd == "release":
            from .lease import host_id
            released = Leases(store._database(), host_id(settings.state_dir),
                              settings.lease.ttl).release(user_id)
            return {"released": [user_id] if released else [], "user_id": user_id}
        if cmd == "checkpoint":
            return _jsonable({"checkpoint": store.latest_checkpoint(user_id),
                              "summary": store.user_summary(user_id)})
        raise ValueError(f"unknown admin command {cmd}")
    except StoreUnavailable as exc:
        return {"error": f"MongoDB unavailable: {type(exc.__cause__ or exc).__name__}"}
    finally:
        store.close()


def _cancel_batch(settings: Settings, batch_id: str) -> dict:
    """``smsctl batches cancel ID``: the server cancels; the owning worker collects what it answered."""
    from . import batch
    from .extractor import build_extractor
    from .llm import LlmClient

    client = build_extractor(settings)
    if not isinstance(client, LlmClient) or not batch_id:
        return {"error": "batch cancel needs an LLM extractor and a batch id"}
    try:
        return {"batch_id": batch_id, "status": batch.cancel(client, batch_id)}
    except (ValueError, OSError) as exc:
        return {"error": str(exc)}
    except Exception as exc:  # openai.APIError: no key or text in it, only its type
        return {"error": f"cancel of {batch_id} failed: {type(exc).__name__}"}
    finally:
        client.close()
