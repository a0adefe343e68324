"""Per-user counters (smsd.store_stats) and a discovery tick whose MongoDB work
does not grow with the number of SMS, against a real MongoDB-wire server."""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone

import pymongo
import pytest
from pymongo import monitoring

from smsd import discovery
from smsd.config import load_settings
from smsd.model import Quarantine, sms_key
from smsd.store import Store
from smsd.store_docs import IDX_DISCOVERY, IDX_PENDING
from smsd import store_stats
from smsd.store_errors import InsertElse, bulk_created
from smsd.store_stats import BASE_FIELD, IDX_STATS_UPDATED, STATS_COLLECTION
from tests.fixtures_mongo import seed_sms

from .test_store import _winning


def _stats(store: Store, user_id: str) -> dict:
    return store.stats.find_one({"_id": user_id}) or {}


def _run(store: Store, user_id: str, raw_ids: list, *, complete: bool = True) -> str:
    """What the pipeline's flushes write for one run over ``raw_ids``."""
    cp = store.checkpoint_start(user_id, len(raw_ids))
    store.mark_processed(user_id, raw_ids, cp["batch_id"])
    store.checkpoint_progress(user_id, cp["batch_id"], processed_sms=len(raw_ids), total_sms=len(raw_ids),
                              last_processed_id=raw_ids[-1],
                              status="completed" if complete else "in_progress")
    return cp["batch_id"]


# --------------------------------------------------------------------------- counters
def test_counters_add_up_over_runs_and_a_replay_never_lowers_them(store: Store):
    ids = seed_sms(store, "u1", 10)
    b1 = _run(store, "u1", ids[:4])
    assert (_stats(store, "u1")["processed_sms"], _stats(store, "u1")["status"]) == (4, "completed")
    _run(store, "u1", ids[4:10])
    assert _stats(store, "u1")["processed_sms"] == 10
    assert store.checkpoints.find_one({"_id": b1})[BASE_FIELD] == 0
    # a late replay of the first run's flush: $max keeps the total
    store.checkpoint_progress("u1", b1, processed_sms=2, total_sms=4, last_processed_id=ids[1],
                              status="in_progress")
    doc = _stats(store, "u1")
    assert doc["processed_sms"] == 10 and doc["last_flush_at"] is not None
    assert store.user_summary("u1") == {"total_sms": 10, "processed_sms": 10, "pending_sms": 0,
                                        "quarantined_sms": 0, "ungrounded_sms": 0, "status": "completed",
                                        "last_flush_at": doc["last_flush_at"]}
    assert store.user_summaries(["u1"])["u1"]["processed_sms"] == 10   # the scan agrees


def test_an_abandoned_run_counts_what_it_marked(store: Store):
    ids = seed_sms(store, "u1", 6)
    cp = store.checkpoint_start("u1", 6)
    store.mark_processed("u1", ids[:3], cp["batch_id"])    # killed before its checkpoint update
    store._latest_seen.clear()
    _run(store, "u1", ids[3:])                             # `smsd once` without --resume
    assert _stats(store, "u1")["processed_sms"] == 6


def test_quarantine_and_retry_set_a_fresh_count(store: Store):
    ids = seed_sms(store, "u1", 5)
    q = [Quarantine(raw_id=i, key=sms_key(i), user_id="u1", reason="unparsed") for i in ids[:2]]
    q.append(Quarantine(raw_id=ids[2], key=sms_key(ids[2]), user_id="u1", reason="ungrounded: amount"))
    store.quarantine(q)
    store.quarantine(q[:1])     # a replay recounts the same
    assert (_stats(store, "u1")["quarantined_sms"], _stats(store, "u1")["ungrounded_sms"]) == (3, 1)
    assert store.unquarantine("u1", ids[:2]) == 2
    assert (_stats(store, "u1")["quarantined_sms"], _stats(store, "u1")["ungrounded_sms"]) == (1, 1)
    assert store.user_summary("u1")["pending_sms"] == 4


def test_a_run_started_before_the_counters_gets_its_base_once(store: Store):
    ids = seed_sms(store, "u1", 8)
    old = "oldrun"
    store.raw.update_many({"_id": {"$in": ids[:5]}}, {"$set": {"isprocessed": True, "smsd_batch_id": "older"}})
    store.checkpoints.insert_one({"_id": old, "user_id": "u1", "batch_id": old, "total_sms": 3,
                                  "processed_sms": 0, "last_processed_id": None,
                                  "checkpoint_timestamp": datetime.now(timezone.utc), "status": "in_progress"})
    store.mark_processed("u1", ids[5:], old)
    store.checkpoint_progress("u1", old, processed_sms=3, total_sms=3, last_processed_id=ids[-1],
                              status="completed")
    assert store.checkpoints.find_one({"_id": old})[BASE_FIELD] == 5
    assert _stats(store, "u1")["processed_sms"] == 8


class _Writes(monitoring.CommandListener):
    """The write commands sent (name, collection), by any client created after it registered."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.command_name in ("insert", "update"):
            self.seen.append((event.command_name, event.command.get(event.command_name)))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def test_a_new_users_counters_are_inserted_and_an_existing_document_still_gets_the_upsert(
        mongo_server, mongo_db_name):
    writes = _Writes()
    monitoring.register(writes)
    store = Store(mongo_server.uri, mongo_db_name, timeout_ms=3000)
    try:
        store.ensure_indexes()
        ids = seed_sms(store, "fresh-u1", 6)
        b1 = _run(store, "fresh-u1", ids[:3], complete=False)
        assert ("insert", STATS_COLLECTION) in writes.seen and ("update", STATS_COLLECTION) not in writes.seen
        writes.seen.clear()
        store.checkpoint_progress("fresh-u1", b1, processed_sms=5, total_sms=6, last_processed_id=ids[4],
                                  status="in_progress")
        assert ("update", STATS_COLLECTION) in writes.seen and ("insert", STATS_COLLECTION) not in writes.seen
        assert _stats(store, "fresh-u1")["processed_sms"] == 5
        # Another process (a restart) has not written this user's counters: its insert finds the
        # document, and the upsert it falls back to keeps the larger total ($max) as always.
        store_stats._COUNTED.clear()
        writes.seen.clear()
        store.checkpoint_progress("fresh-u1", b1, processed_sms=4, total_sms=6, last_processed_id=ids[3],
                                  status="in_progress")
        assert writes.seen.count(("insert", STATS_COLLECTION)) == 1
        assert writes.seen.count(("update", STATS_COLLECTION)) == 1
        doc = _stats(store, "fresh-u1")
        assert (doc["processed_sms"], doc["user_id"], doc["batch_id"]) == (5, "fresh-u1", b1)
    finally:
        store.close()
        monitoring._LISTENERS.command_listeners.remove(writes)


def test_insert_else_stores_what_the_upsert_alone_would(store: Store):
    from pymongo import UpdateOne
    coll = store.collection("insert_else_probe")
    update = {"$setOnInsert": {"kind": "k"}, "$max": {"n": 3}, "$set": {"at": 1}}
    assert bulk_created(coll, [InsertElse.of_upsert({"_id": "a"}, update)]) == {0: True}
    coll.update_one({"_id": "b"}, {"$set": {"n": 9, "other": True}}, upsert=True)
    created = bulk_created(coll, [InsertElse.of_upsert({"_id": "b"}, update),
                                  InsertElse.of_upsert({"_id": "c"}, update),
                                  UpdateOne({"_id": "d"}, update, upsert=True)])
    assert created == {1: True, 2: True}
    twin = store.collection("insert_else_twin")
    for _id in "abcd":
        if _id == "b":
            twin.insert_one({"_id": "b", "n": 9, "other": True})
        twin.update_one({"_id": _id}, update, upsert=True)
    assert list(coll.find(sort=[("_id", 1)])) == list(twin.find(sort=[("_id", 1)]))
    with pytest.raises(ValueError):
        InsertElse.of_upsert({"_id": {"$in": ["a"]}}, update)
    with pytest.raises(ValueError):
        InsertElse.of_upsert({"_id": "a"}, {"$inc": {"n": 1}})


def test_counter_reads_are_index_served(store: Store):
    seed_sms(store, "u1", 5)
    _run(store, "u1", [0, 1])
    store.quarantine([Quarantine(raw_id=3, key=sms_key(3), user_id="u1", reason="x")])
    since = datetime.now(timezone.utc) - timedelta(seconds=60)
    plan = _winning(store.stats.find({"updated_at": {"$gte": since}}).explain())
    assert ("IXSCAN", IDX_STATS_UPDATED) in plan, plan
    seed_sms(store, "u2", 50, start=100)
    # each count looks at exactly the documents it counts (2 processed, 1 quarantined)
    for flt, n in (({"user_id": "u1", "smsd_quarantine": None, "isprocessed": True}, 2),
                   ({"user_id": "u1", "smsd_quarantine": {"$gte": {}}}, 1)):
        ex = store.raw.find(flt).explain()
        plan = _winning(ex)
        assert any(s == "IXSCAN" and i in (IDX_PENDING, IDX_DISCOVERY) for s, i in plan), (flt, plan)
        assert ex["executionStats"]["totalKeysExamined"] <= n + 1, (flt, ex["executionStats"])
    plan = _winning(store.raw.find(store.pending_filter()).explain())
    assert ("IXSCAN", IDX_DISCOVERY) in plan, plan


def _history(store: Store, user_id: str, runs: int) -> None:
    """``runs`` completed runs of ``user_id`` in the past, as a 24/7 user piles them up."""
    t0 = datetime.now(timezone.utc) - timedelta(days=30)
    store.checkpoints.insert_many([{"_id": f"{user_id}-old-{r}", "user_id": user_id, "batch_id": f"{user_id}-old-{r}",
                                    "total_sms": 1, "processed_sms": 1, "last_processed_id": None,
                                    "checkpoint_timestamp": t0 + timedelta(minutes=r), "status": "completed",
                                    BASE_FIELD: r} for r in range(runs)])


def test_a_users_latest_run_is_read_from_the_runs_since_its_journals_note_not_from_all(
        store: Store, tmp_path):
    from smsd import journal_runs
    from smsd.group_reads import latest_checkpoints
    from smsd.journal import Journal
    seed_sms(store, "u1", 4)
    _history(store, "u1", 300)
    _history(store, "u2", 3)
    with Journal.open(tmp_path, "u1") as journal:
        assert journal_runs.latest_run_at(journal) is None
        journal_runs.note_run(journal, store.latest_checkpoint("u1"))   # the last turn's run
        since = journal_runs.latest_run_at(journal)
    opened = store.checkpoint_start("u1", 2)        # a run opened since, never progressed
    store._latest_seen.clear()
    COMMANDS.db = store.db_name
    COMMANDS.seen.clear()
    try:
        latest = store.latest_checkpoint("u1", since=since)
        group = latest_checkpoints(store, ["u1", "u2", "u3"], {"u1": since})
    finally:
        COMMANDS.db = None
    assert latest["_id"] == opened["batch_id"] and latest["status"] == "in_progress"
    assert group["u1"]["_id"] == opened["batch_id"] and group["u2"]["_id"] == "u2-old-2" and group["u3"] is None
    db = store._database()
    looked = [_examined(db, c) for c in COMMANDS.seen if c.get("find", c.get("aggregate")) == "processing_checkpoints"]
    assert len(looked) == 2 + 1 and all(n <= 12 for _, n in looked), looked   # not the 300 runs before
    # The runs since the note are gone (removed by hand): every run is read again.
    store.checkpoints.delete_many({"user_id": "u1", "checkpoint_timestamp": {"$gte": since}})
    assert store.latest_checkpoint("u1", since=since)["_id"] == "u1-old-298"


def test_a_turn_notes_its_run_in_the_journal_for_the_next_turns_read(store: Store, tmp_path):
    from smsd import journal_runs
    from smsd.journal import Journal
    cp = store.checkpoint_start("u1", 0)
    with Journal.open(tmp_path, "u1") as journal:
        journal_runs.note_run(journal, cp)
        noted = journal_runs.latest_run_at(journal)
    with Journal.open(tmp_path, "u1") as journal:   # the note is on disk, read again at open
        assert journal_runs.latest_run_at(journal) == noted
        assert journal.query("SELECT value FROM meta WHERE key = ?", [journal_runs.KEY]) == [(noted.isoformat(),)]
    stored = store.checkpoints.find_one({"_id": cp["batch_id"]})["checkpoint_timestamp"]
    # Milliseconds, as stored: the bound finds the run it came from.
    assert noted == stored.replace(tzinfo=noted.tzinfo)
    assert store.latest_checkpoint("u1", since=noted)["_id"] == cp["batch_id"]


# --------------------------------------------------------------------------- the tick at 10,000 users
class _Commands(monitoring.CommandListener):
    """pymongo's command monitoring (its public API): the read commands sent to one database."""

    def __init__(self) -> None:
        self.db: str | None = None
        self.seen: list[dict] = []
        self.lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if event.database_name == self.db and event.command_name in ("find", "aggregate", "count", "distinct"):
            with self.lock:
                self.seen.append(dict(event.command))

    def succeeded(self, event) -> None:
        pass

    def failed(self, event) -> None:
        pass


COMMANDS = _Commands()
monitoring.register(COMMANDS)


def _examined(db, command: dict) -> tuple[str, int]:
    """``(collection, keys + documents examined)`` of a read command, from explain()."""
    name = next(iter(command))
    keep = {"find": ("filter", "projection", "sort", "limit"), "aggregate": ("pipeline",),
            "count": ("query",), "distinct": ("key", "query")}[name]
    cmd = {name: command[name], **{k: command[k] for k in keep if k in command}}
    if name == "aggregate":
        cmd["cursor"] = {}
    ex = db.command("explain", cmd, verbosity="executionStats")
    stats = ex["stages"][0]["$cursor"]["executionStats"] if "stages" in ex else ex["executionStats"]
    return command[name], int(stats["totalKeysExamined"]) + int(stats["totalDocsExamined"])


def test_a_discovery_tick_at_10000_users_touches_only_pending_sms_and_changed_counters(
        store: Store, mongo_db_name, mongo_server, tmp_path):
    users, processed_each, busy, pending_each = 10_000, 3, 20, 2
    now = datetime.now(timezone.utc)
    raw, stats = [], []
    for u in range(users):
        uid = f"user{u:05d}"
        for i in range(processed_each):
            raw.append({"_id": f"{uid}-{i}", "user_id": uid, "body": "INR 1.00 debited", "isprocessed": True,
                        "smsd_batch_id": "b", "processed_at": now})
        # the counters as the flush writes them, last updated an hour ago
        stats.append({"_id": uid, "user_id": uid, "processed_sms": processed_each, "quarantined_sms": 0,
                      "status": "completed", "batch_id": "b", "last_flush_at": now - timedelta(hours=1),
                      "updated_at": now - timedelta(hours=1)})
    for u in range(busy):
        uid = f"user{u * 7:05d}"
        for i in range(pending_each):
            raw.append({"_id": f"{uid}-new-{i}", "user_id": uid, "body": "INR 2.00 credited", "isprocessed": False})
    for start in range(0, len(raw), 5000):
        store.raw.insert_many(raw[start:start + 5000], ordered=False)
    store.stats.insert_many(stats, ordered=False)
    recent = [f"user{u:05d}" for u in (1, 2, 3)]      # three users flushed a minute ago
    store.stats.update_many({"_id": {"$in": recent}}, {"$set": {"updated_at": now - timedelta(minutes=1)}})

    settings = load_settings(None, env={"SMSD_CONFIG": "/dev/null", "SMSD_MONGO_URI": mongo_server.uri,
                                        "SMSD_MONGO_DB": mongo_db_name,
                                        "SMSD_STATE_DIR": str(tmp_path / "state")})
    db = store.raw.database
    timings = {}
    for tick, since in (("first", None), ("steady", now - timedelta(minutes=5))):
        COMMANDS.db, COMMANDS.seen = mongo_db_name, []
        t0 = time.perf_counter()
        answer = discovery.discover(settings, mongo_server.uri, stats_since=since)
        timings[tick] = time.perf_counter() - t0
        COMMANDS.db = None
        assert answer["mongo"]["ok"], answer
        assert len(answer["pending"]) == busy and set(answer["pending"].values()) == {pending_each}
        examined: dict[str, int] = {}
        for command in COMMANDS.seen:
            coll, n = _examined(db, command)
            examined[coll] = examined.get(coll, 0) + n
        # The raw collection holds 30,040 SMS; the tick looks at the 40 pending ones
        # (their index keys and documents), never a processed one.
        assert examined["sms_fin_rawdata"] <= 2 * busy * pending_each, examined
        assert len(COMMANDS.seen) <= 3, [next(iter(c)) for c in COMMANDS.seen]
        if tick == "first":
            assert len(answer["counters"]) == users
            assert examined[STATS_COLLECTION] <= users + 1
        else:
            # only the counters that changed since: three users, through the updated_at index
            assert set(answer["counters"]) == set(recent)
            assert examined[STATS_COLLECTION] <= 2 * len(recent), examined
    print(f"\n10,000-user discovery tick: first (all counters) {timings['first']:.3f} s, "
          f"steady (changed counters only) {timings['steady']:.3f} s")
