"""``discovery`` benchmark: the supervisor's discovery tick and a status call at 10,000 users.

The shape is the steady state of issue 12: many users, each with SMS smsd has
already processed, a few with new ones.  The documents are seeded directly:
``discovery_users`` users with ``discovery_processed_each`` processed SMS each,
50 of them with 2 pending SMS, every user's counters in ``smsd_user_stats`` as
the flush writes them (last updated an hour ago, three a minute ago), and one
journal file per user (a copy of a real journal with its ``user_id``
rewritten, because creating 10,000 journals with their fsyncs takes minutes).

Measured, in this process against the bench's MongoDB-wire server:

* the **steady tick** -- :func:`smsd.discovery.discover` as the supervisor
  calls it between full looks: pending users through the index, counters
  changed in the last five minutes, journals of the users that had a worker
  (none here: every file is listed, none opened);
* the **first tick** -- every counter and every journal (at start-up and
  every 10 minutes);
* the **tick as it was before** -- ``pending_users`` + ``user_summaries`` over
  the users found + ``journal_scan.scan`` of every journal, which is what
  ``discover`` did before issue 12 (one run, last, given 120 s: it is slow).

And against a real ``smsd run`` on the same data, every user paused so the
numbers hold still: the time of a ``status`` control call for a page of 50
users (what ``smsctl status`` asks) and for every user.
"""
from __future__ import annotations

import json
import shutil
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from .harness import Bench, BenchResult, Figure, _fmt, median

BUSY_USERS = 50
PENDING_EACH = 2
STATUS_CALLS = 20
#: How long the old tick may take before the bench reports it as not finished.
OLD_TICK_TIMEOUT_S = 120.0


def _seed(bench: Bench, db_name: str, users: list[str], processed_each: int) -> None:
    from ...store import Store
    Store(bench.mongo_uri, db_name).ensure_indexes()
    db = bench.client[db_name]
    now = datetime.now(timezone.utc)
    raw, stats = [], []
    for uid in users:
        raw.extend({"_id": f"{uid}-{i}", "user_id": uid, "body": "INR 1.00 debited", "isprocessed": True,
                    "smsd_batch_id": "seed", "processed_at": now} for i in range(processed_each))
        stats.append({"_id": uid, "user_id": uid, "processed_sms": processed_each, "quarantined_sms": 0,
                      "status": "completed", "batch_id": "seed", "last_flush_at": now - timedelta(hours=1),
                      "updated_at": now - timedelta(hours=1)})
    for uid in users[::max(1, len(users) // BUSY_USERS)][:BUSY_USERS]:
        raw.extend({"_id": f"{uid}-new-{i}", "user_id": uid, "body": "INR 2.00 credited", "isprocessed": False}
                   for i in range(PENDING_EACH))
    for i in range(0, len(raw), 5000):
        db["sms_fin_rawdata"].insert_many(raw[i:i + 5000], ordered=False)
    for i in range(0, len(stats), 5000):
        db["smsd_user_stats"].insert_many(stats[i:i + 5000], ordered=False)
    db["smsd_user_stats"].update_many({"_id": {"$in": users[1:4]}},
                                      {"$set": {"updated_at": now - timedelta(minutes=1)}})


def _journals(state_dir: Path, users: list[str]) -> None:
    """One journal per user: a real one, copied, its ``meta.user_id`` rewritten."""
    from ...journal import Journal
    from ...journal_schema import journal_path
    template_dir = state_dir.parent / "template"
    with Journal.open(template_dir, "template") as j:
        template = j.path
    (state_dir / "journal").mkdir(parents=True, mode=0o700)
    for uid in users:
        path = journal_path(state_dir, uid)
        shutil.copyfile(template, path)
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'user_id'", (uid,))
        finally:
            conn.close()


def _old_tick(settings, uri: str) -> int:
    """What ``discover`` did before issue 12: every journal opened, every SMS of the found users
    summed (with a longer socket timeout than smsd's 30 s, which it outlasts at 10,000 users)."""
    from ...journal_scan import scan
    from ...store import Store
    import pymongo
    journals = scan(settings.state_dir)
    store = Store(uri, settings.mongo.db, timeout_ms=settings.mongo.timeout_ms,
                  socket_timeout_ms=int(OLD_TICK_TIMEOUT_S * 1000))
    try:
        # The driver's timeout also sends maxTimeMS: the server gives up too, instead of
        # going on with an aggregation nobody waits for (and the database's drop behind it).
        with pymongo.timeout(OLD_TICK_TIMEOUT_S):
            pending = store.pending_users()
            return len(store.user_summaries(list(set(pending) | set(journals))))
    finally:
        store.close()


def _timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    value = fn()
    return time.perf_counter() - t0, value


def bench_discovery(bench: Bench) -> BenchResult:
    """Tick and status-call times at ``discovery_users`` users (see the module docstring)."""
    from ... import control_protocol as control
    from ...config import load_settings
    from ...discovery import discover
    p = bench.params
    res = BenchResult("discovery")
    n_users, each = p.discovery_users, p.discovery_processed_each
    users = [f"user{i:05d}" for i in range(n_users)]
    db_name, directory = bench.fresh("discovery")
    state_dir = directory / "state"
    t_seed = time.perf_counter()
    _seed(bench, db_name, users, each)
    _journals(state_dir, users)
    bench.say(f"  seeded {n_users} users, {n_users * each} processed SMS, journals, in "
              f"{time.perf_counter() - t_seed:.0f} s")
    settings = load_settings(None, env={"SMSD_CONFIG": "/dev/null", "SMSD_MONGO_URI": bench.mongo_uri,
                                        "SMSD_MONGO_DB": db_name, "SMSD_STATE_DIR": str(state_dir)})
    first, steady, seen = [], [], {}
    for _ in range(p.runs):
        took, answer = _timed(lambda: discover(settings, bench.mongo_uri))
        first.append(took)
        assert len(answer["counters"]) == n_users and len(answer["journals"]) == n_users, "first tick"
        seen = answer["journal_seen"]
    since = datetime.now(timezone.utc) - timedelta(minutes=5)
    for _ in range(max(5, p.runs)):
        took, answer = _timed(lambda: discover(settings, bench.mongo_uri, journals_seen=seen,
                                               journals_check=set(), stats_since=since))
        steady.append(took)
        assert len(answer["pending"]) == BUSY_USERS and not answer["journals"], "steady tick"

    # A real supervisor on the same data, every user paused: the status call.
    (state_dir / "paused.json").write_text(json.dumps(users))
    config = bench.write_config(directory, db_name, supervisor={"max_workers": 4})
    proc = bench.smsd(config, "run")
    sock = str(directory / "run" / "control.sock")
    page, full = [], []
    try:
        deadline = time.monotonic() + p.run_timeout
        while True:
            try:
                st = control.request(sock, "status", {"limit": 1}, timeout=10)
                if st["totals"]["users"] >= n_users and st["totals"]["pending_sms"]:
                    break
            except control.ControlClientError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("smsd run did not discover every user")
            time.sleep(0.5)
        for _ in range(STATUS_CALLS):
            page.append(_timed(lambda: control.request(sock, "status", {"limit": 50}, timeout=30))[0])
        for _ in range(max(3, p.runs)):
            full.append(_timed(lambda: control.request(sock, "status", {}, timeout=30))[0])
    finally:
        bench.stop_smsd(proc)
    # Last, because on SecantusDB it can outlast any patience and keep the server busy.
    try:
        old: float | None = _timed(lambda: _old_tick(settings, bench.mongo_uri))[0]
    except Exception as exc:  # noqa: BLE001 - the old way failing is a finding, not a bench error
        old = None
        res.notes.append(f"The tick as it was before issue 12 did not finish within {OLD_TICK_TIMEOUT_S:.0f} s "
                         f"({type(exc).__name__}).")
    bench.drop(db_name)

    n = f"{n_users:,} users"
    res.figures += [
        Figure("discovery", f"discovery tick at {n}, steady (changed counters and journals only)",
               median(steady), "s", "< 1 s", median(steady) < 1.0, runs=steady),
        Figure("discovery", f"discovery tick at {n}, first (every counter, every journal)", median(first),
               "s", runs=first),
        Figure("discovery", f"discovery tick at {n} as before issue 12 (every SMS, every journal)"
               + ("" if old is not None else f": not finished in {OLD_TICK_TIMEOUT_S:.0f} s"), old, "s"),
        Figure("discovery", f"status call at {n}, a page of 50", median(page), "s", "< 1 s",
               median(page) < 1.0, runs=page),
        Figure("discovery", f"status call at {n}, every user", median(full), "s", runs=full),
    ]
    res.details.append(
        f"{n_users:,} users with {each} processed SMS each ({n_users * each:,} documents), {BUSY_USERS} "
        f"of them with {PENDING_EACH} pending SMS, every user's counters in `smsd_user_stats` and one "
        f"journal file each. Ticks are `smsd.discovery.discover` in the bench process: first "
        f"{p.runs}×, steady {len(steady)}×, the old tick once. Status: {STATUS_CALLS} calls of "
        f"`{{\"limit\": 50}}` and {len(full)} of every user to a real `smsd run` (every user paused).")
    res.details.append("")
    res.details.append("| tick | median | runs |")
    res.details.append("|---|---|---|")
    for label, values in (("steady", steady), ("first", first), ("before issue 12", [old] if old else [])):
        res.details.append(f"| {label} | {_fmt(median(values), 's')} | "
                           f"{', '.join(_fmt(v, 's') for v in values)} |")
    if old and median(steady):
        res.notes.append(f"The steady tick is {old / median(steady):,.0f}× faster than the tick before "
                         f"issue 12 on the same data ({_fmt(old, 's')} → {_fmt(median(steady), 's')}): it "
                         "touches only the pending SMS, the counters changed since the last tick and "
                         "the journals of users that had a worker.")
    return res
