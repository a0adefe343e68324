"""The bare loop: the least MongoDB work the job needs, in separate processes.

Issue 12 defines it: *read the next page of a user's pending SMS, upsert its
transactions with ``j: true``, mark the page processed; 4 processes
(= ``max_workers``), with an index on ``(user_id, isprocessed, _id)``.*  That is
:func:`_loop`: plain pymongo, one ``find`` per page (sorted by ``_id``, the
contract's pending filter), one unordered ``bulk_write`` of ``ReplaceOne(upsert)``
per page and one ``update_many`` per page.  Nothing else: no journal, no LLM, no
checkpoint, no discovery.

The transaction documents are the ones smsd writes for the same SMS: the answers
the local LLM server gives (the bench corpus) are turned into documents once per
text with :func:`smsd.store.transaction_doc`, and each SMS gets its own ids and
provenance from that template.  ``smsd run`` also stamps each document with its
lease's fencing epoch (:mod:`smsd.fencing`), so the template carries the epoch a
single host writes (:data:`SINGLE_HOST_EPOCH`): the same documents, the same
bytes, without the lease's commands (those are smsd's cost, measured against
this loop).  The users are dealt round-robin to the processes
(every user of one shape has the same number of SMS).

Timing is from the start of the processes (``spawn``, as ``smsd run`` starts an
interpreter) to the last ``processed_at``, like smsd's end-to-end time, and also
after start-up (from the moment every process is connected and told to go).
"""
from __future__ import annotations

import multiprocessing
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .harness import Bench

#: The index the issue gives the bare loop.
BARE_INDEX = [("user_id", 1), ("isprocessed", 1), ("_id", 1)]
#: Raw SMS pending per the contract: ``isprocessed`` false or missing.
PENDING = {"$in": [False, None]}
#: The lease epoch of every user of a single host (smsd.lease: the first owner has
#: epoch 1 and a single host keeps it), stamped by smsd run on what it writes.
SINGLE_HOST_EPOCH = 1


@dataclass
class BareRun:
    """What one bare-loop run measured (wall-clock ``time.time()`` values)."""

    launched: float
    go: float                  # every process connected and told to start
    first_processed: float
    last_processed: float
    sms: int
    pages: int

    @property
    def end_to_end_s(self) -> float:
        """From launching the processes to the last SMS marked processed."""
        return self.last_processed - self.launched

    @property
    def after_startup_s(self) -> float:
        """From the go signal (every process started and connected) to the last SMS processed."""
        return max(1e-6, self.last_processed - self.go)


def templates(bench: Bench) -> dict[str, list[dict]]:
    """``{text: [transaction document]}`` for every corpus text, built by smsd's own
    :func:`~smsd.store.transaction_doc` from the answers the LLM server gives."""
    from bson import ObjectId

    from ...fencing import EPOCH_FIELD
    from ...model import FlushItem, Provenance, sms_key
    from ...store_docs import transaction_doc
    prov = Provenance(call_id="bare", model="bare", request_id=None,
                      answered_at=datetime.now(timezone.utc))
    now = datetime.now(timezone.utc)
    out: dict[str, list[dict]] = {}
    for text, _, _ in bench.corpus.items:
        raw = ObjectId()
        result = bench.corpus.result(sms_key(raw), text)
        item = FlushItem(raw_id=raw, user_id="", result=result, provenance=prov)
        out[text] = [dict(transaction_doc(item, i, tx, now), **{EPOCH_FIELD: SINGLE_HOST_EPOCH})
                     for i, tx in enumerate(result.transactions)]
    return out


def _loop(uri: str, db_name: str, users: list[str], page_size: int, tmpl: dict[str, list[dict]],
          ready: Any, go: Any, done: Any) -> None:
    """One bare-loop process: connect, wait for ``go``, then every user's pages."""
    import pymongo
    from pymongo import ReplaceOne, WriteConcern

    from ...model import sms_key, transaction_id
    client = pymongo.MongoClient(uri, tz_aware=True)
    db = client.get_database(db_name, write_concern=WriteConcern(j=True))
    raw, txs = db["sms_fin_rawdata"], db["financial_transactions"]
    client.admin.command("ping")
    ready.release()
    go.wait()
    pages = sms = 0
    for user in users:
        while True:
            page = list(raw.find({"user_id": user, "isprocessed": PENDING}, {"_id": 1, "body": 1},
                                 sort=[("_id", 1)], limit=page_size, batch_size=page_size))
            if not page:
                break
            now = datetime.now(timezone.utc)
            ops = []
            for doc in page:
                key = sms_key(doc["_id"])
                for i, t in enumerate(tmpl.get(doc["body"], ())):
                    tx = dict(t, _id=transaction_id(key, i), user_id=user, sms_id=doc["_id"],
                              sms_key=key, created_at=now)
                    tx["source"] = dict(t["source"], answered_at=now)
                    ops.append(ReplaceOne({"_id": tx["_id"]}, tx, upsert=True))
            if ops:
                txs.bulk_write(ops, ordered=False)
            raw.update_many({"_id": {"$in": [d["_id"] for d in page]}},
                            {"$set": {"isprocessed": True, "processed_at": datetime.now(timezone.utc)}})
            pages += 1
            sms += len(page)
            if len(page) < page_size:
                break
    client.close()
    done.put((sms, pages))


def run_bare(bench: Bench, db_name: str, users: list[str], total: int, processes: int = 4,
             page_size: int = 200, tmpl: dict[str, list[dict]] | None = None,
             uri: str | None = None) -> BareRun:
    """Run the bare loop over ``users`` (already seeded in ``db_name``) and time it;
    its processes connect to ``uri`` (default: the bench's server)."""
    bench.client[db_name]["sms_fin_rawdata"].create_index(BARE_INDEX, name="bare_pending")
    tmpl = tmpl if tmpl is not None else templates(bench)
    ctx = multiprocessing.get_context("spawn")
    ready, go, done = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    shares = [users[i::processes] for i in range(processes)]
    launched = time.time()
    procs = [ctx.Process(target=_loop, args=(uri or bench.mongo_uri, db_name, share, page_size, tmpl,
                                             ready, go, done), daemon=True)
             for share in shares if share]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=60):
                raise RuntimeError("a bare-loop process did not start")
        go_at = time.time()
        go.set()
        results = [done.get(timeout=bench.params.run_timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    sms = sum(r[0] for r in results)
    if sms != total:
        raise RuntimeError(f"bare loop processed {sms} of {total} SMS")
    raw = bench.client[db_name]["sms_fin_rawdata"]
    first = raw.find_one({"isprocessed": True}, {"processed_at": 1}, sort=[("processed_at", 1)])
    last = raw.find_one({"isprocessed": True}, {"processed_at": 1}, sort=[("processed_at", -1)])
    return BareRun(launched=launched, go=go_at, first_processed=first["processed_at"].timestamp(),
                   last_processed=last["processed_at"].timestamp(), sms=sms,
                   pages=sum(r[1] for r in results))
