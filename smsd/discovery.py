"""Questions the supervisor asks MongoDB, answered in a short-lived child.

The supervisor never opens a MongoClient (pymongo is not fork-safe, and the
supervisor forks workers all the time), so each question here runs in a
child process that the supervisor forks, reads a JSON answer from, and reaps.
The functions themselves are plain: they take the settings and return a
JSON-safe dict.
"""
from __future__ import annotations

import time
from typing import Any

from . import journal as journal_mod
from .config import Settings
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


def discover(settings: Settings, uri: str | None = None) -> dict:
    """Users with pending SMS or unflushed journal rows, and their counts.

    Journals are scanned first: a user with unflushed answers is worked on
    even while MongoDB is down (its worker waits, then flushes).
    """
    started = time.time()
    journals = journal_mod.scan(settings.state_dir)
    users: dict[str, dict] = {}
    for user_id, stats in journals.items():
        users[user_id] = {"journal": stats}
    mongo = {"ok": True, "error": None}
    store = make_store(settings, uri)
    try:
        pending = store.pending_users()
        summaries = store.user_summaries(list(set(pending) | set(users)))
        for user_id, summary in summaries.items():
            users.setdefault(user_id, {}).update(summary)
        for user_id, n in pending.items():
            users.setdefault(user_id, {})["pending_sms"] = n
    except StoreUnavailable as exc:
        mongo = {"ok": False, "error": f"MongoDB unavailable: {type(exc.__cause__ or exc).__name__}"}
    finally:
        store.close()
    return _jsonable({"users": users, "mongo": mongo, "took_s": time.time() - started})


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
        if cmd == "checkpoint":
            return _jsonable({"checkpoint": store.latest_checkpoint(user_id),
                              "summary": store.user_summaries([user_id]).get(user_id)})
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
