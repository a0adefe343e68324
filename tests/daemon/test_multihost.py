"""Several ``smsd run`` hosts against one MongoDB-wire server: leases, fencing, take-over.

Every host is a separate supervisor process group with its own state and
runtime directories (:class:`smsd.lab.multihost.HostProcess`); the database is
the real SecantusDB server of the ``mongo_server`` fixture, the LLM the local
server over HTTP.  Short TTLs (3 s) keep the tests quick.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pytest
from pymongo import MongoClient

from smsd.lab.invariants import verify
from smsd.lab.multihost import HostProcess, in_flight, tx_writes_after_takeover
from smsd.fencing import FencedStore
from smsd.lease import HOSTS_COLLECTION, LEASES_COLLECTION, Leases

from ..harness import seed, wait_for

TTL = 3.0
# Two users, each a few seconds of work on one host: still busy when b joins and a is cut.
SLOW = {"supervisor": {"max_workers": 2}, "llm": {"batch_size": 2}}


@pytest.fixture
def db(mongo_server, mongo_db_name):
    client = MongoClient(mongo_server.uri, tz_aware=True)
    yield client[mongo_db_name]
    client.close()


@pytest.fixture
def hosts(tmp_path, mongo_server, mongo_db_name):
    started: list[HostProcess] = []

    def make(name: str, llm_url: str, **sections) -> HostProcess:
        sections.setdefault("lease", {"ttl": TTL})
        h = HostProcess(name, tmp_path / name, mongo_uri=mongo_server.uri, db=mongo_db_name,
                        llm_url=llm_url, **sections)
        started.append(h)
        return h.start()

    yield make
    for h in started:
        h.stop(timeout=30)


def leases(db) -> dict[str, dict]:
    return {d["_id"]: d for d in db[LEASES_COLLECTION].find()}


def journal_users(host: HostProcess) -> set[str]:
    """Users this host asked the LLM about (from its journals, read-only)."""
    out = set()
    for path in (host.state_dir / "journal").glob("*.sqlite"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            if conn.execute("SELECT count(*) FROM calls WHERE model != 'handover'").fetchone()[0]:
                out.add(dict(conn.execute("SELECT key, value FROM meta"))["user_id"])
        finally:
            conn.close()
    return out


def all_done(db, expected, hosts_: list[HostProcess]):
    pending = db["sms_fin_rawdata"].count_documents({"_id": {"$in": list(expected)},
                                                     "isprocessed": {"$ne": True}})
    if pending:
        return False
    report = verify(db, expected, state_dir=[h.state_dir for h in hosts_])
    return report if report.ok else False


def both_alive(db) -> bool:
    return db[HOSTS_COLLECTION].count_documents({}) >= 2


def seed_busy(db, host: HostProcess, users: int = 2, n: int = 80) -> dict:
    """Seed ``users`` × ``n`` SMS and wait until ``host`` holds every lease and has processed some."""
    expected = {}
    for i in range(users):
        expected.update(seed(db, f"user-{i}", n, start=i * n))
    wait_for(lambda: len([d for d in leases(db).values() if d["owner"] == host.host_id]) == users,
             timeout=30, what=f"host {host.name} holding every lease")
    wait_for(lambda: db["sms_fin_rawdata"].count_documents({"isprocessed": True}) >= 10,
             timeout=60, what=f"some SMS processed by {host.name}")
    return expected


def check_moved(db, client, db_name: str, old: dict, took: dict, cut: int, report) -> None:
    """After users moved off a host: epochs up by one, what MongoDB applied late, repeats bounded.

    From MongoDB's oplog: no transaction write of the old epoch after each
    take-over (they are gated on the lease by the server, smsd/fencing.py).
    """
    stale = {}
    for user, epoch in old.items():
        assert took[user]["epoch"] == epoch + 1
        for w in tx_writes_after_takeover(client, db_name, user, epoch):
            final = db["financial_transactions"].find_one({"_id": w["id"]}) or {}
            assert final.get("smsd_epoch", epoch + 1) > epoch, (user, w)
            stale[w["id"]] = user
    print(f"in flight when cut: {cut} SMS; re-bought: {report.repeats_other_host}; "
          f"late transaction writes: {len(stale)}")
    assert not stale, stale
    assert report.repeats_other_host <= cut, (report.repeats_other_host, cut)


def test_two_hosts_share_the_users_and_keep_every_invariant(db, hosts, make_llm_server):
    llm = make_llm_server(latency_ms=40)
    # A host counts as alive for max(TTL, 3 discovery rounds) after its last tick: with
    # 3 s, one slow tick of b on a loaded host let a see itself alone and take every user.
    # Nothing here moves a lease from a host, so a long TTL costs no time.
    a = hosts("a", llm.url, supervisor={"max_workers": 3}, lease={"ttl": 15.0})
    b = hosts("b", llm.url, supervisor={"max_workers": 3}, lease={"ttl": 15.0})
    wait_for(lambda: both_alive(db), timeout=20, what="both hosts heartbeating")
    expected = {}
    for i in range(6):
        expected.update(seed(db, f"user-{i}", 12, start=i * 12))
    report = wait_for(lambda: all_done(db, expected, [a, b]), timeout=120, what="all SMS processed")
    assert report.sms_processed == len(expected) and report.repeats_other_host == 0
    assert report.sms_asked_more_than_once == 0
    ua, ub = journal_users(a), journal_users(b)
    assert ua and ub, f"work not spread: a={sorted(ua)} b={sorted(ub)}"
    assert not ua & ub                                  # no user was worked on by both
    assert all(n == 1 for n in llm.stats()["billed"].values())
    st = a.status()
    assert st["host"] == a.host_id and isinstance(st["leases"], list)
    owners = {d["owner"] for d in leases(db).values()}
    assert owners <= {a.host_id, b.host_id}
    # Nobody lost a user with work: an owner changes only where a host's discovery was
    # older than the other host's finish -- it takes the released lease of a user whose
    # SMS are all stored, and asks nothing for it (a raised epoch, no LLM call, no work).
    by_host = {a.host_id: ua, b.host_id: ub}
    for user, d in leases(db).items():
        if d["epoch"] != 1:
            assert d["epoch"] == 2 and user not in by_host[d["owner"]], (user, d, sorted(ua), sorted(ub))


def test_a_frozen_host_is_fenced_by_mongodb(db, hosts, make_llm_server):
    llm = make_llm_server(latency_ms=300)
    a = hosts("a", llm.url, **SLOW)
    expected = seed_busy(db, a)      # a takes both users first; b joins once a is into them
    b = hosts("b", llm.url, **SLOW)
    old = {u: d["epoch"] for u, d in leases(db).items()}
    a.freeze()
    frozen_at = time.monotonic()
    cut = in_flight(a.state_dir)
    wait_for(lambda: all(leases(db)[u]["owner"] == b.host_id for u in old), timeout=TTL + 8,
             what="host b taking the frozen host's users")
    took = leases(db)
    assert all(took[u]["epoch"] == old[u] + 1 for u in old)
    time.sleep(max(0.0, TTL + 3 - (time.monotonic() - frozen_at)))
    a.thaw()
    report = wait_for(lambda: all_done(db, expected, [a, b]), timeout=120, what="all SMS processed")
    log = a.log_text()
    # The refusal itself: the stale host tried to flush and MongoDB matched nothing.
    assert "refused by MongoDB" in log and "StaleEpoch" in log, log[-3000:]
    assert report.sms_processed == len(expected)
    check_moved(db, db.client, db.name, old, took, cut, report)


def _stopped_worker(host: HostProcess) -> bool:
    """True when a process of ``host`` stopped itself (``SMSD_FAILPOINT=after_claim:stop``)."""
    try:
        procs = psutil.Process(host.proc.pid).children(recursive=True)
        return any(p.status() == psutil.STATUS_STOPPED for p in procs)
    except psutil.Error:
        return False


def test_a_host_frozen_between_its_claim_and_its_transaction_writes_inserts_nothing(
        db, hosts, make_llm_server, mongo_server, mongo_db_name):
    """Issue 13's gap, end to end: no transaction document exists yet when the stale host wakes.

    Host a stops itself right after its first flush's claim (the SMS carry its
    epoch), and is frozen whole.  The user moves to a new owner, which stamps
    the user and writes nothing yet.  When a wakes, its transaction writes must
    be refused by MongoDB -- not inserted and replaced later.
    """
    llm = make_llm_server()
    expected = seed(db, "gap", 6)
    a = hosts("a", llm.url, env={"SMSD_FAILPOINT": "after_claim:stop"},
              supervisor={"max_workers": 1, "worker_timeout": 120.0})
    wait_for(lambda: _stopped_worker(a), timeout=60, what="host a's worker stopped after its claim")
    a.freeze()                                        # the whole host, supervisor included
    old = leases(db)["gap"]["epoch"]
    assert db.financial_transactions.count_documents({"user_id": "gap"}) == 0
    newer = Leases(db, "host-new", ttl=60)
    lease = wait_for(lambda: newer.take("gap"), timeout=TTL + 5, what="the new owner taking the lease")
    assert lease.epoch == old + 1
    fenced = FencedStore(mongo_server.uri, mongo_db_name, timeout_ms=3000)
    fenced.set_epoch(lease.epoch)
    assert fenced.stamp_user("gap") == 6               # the new owner's first write
    a.thaw()
    wait_for(lambda: "transaction upsert (0 of" in a.log_text(), timeout=30, what="a's refused flush")
    log = a.log_text()
    assert "refused by MongoDB: a newer epoch than 1 owns the user (StaleEpoch)" in log, log[-3000:]
    assert db.financial_transactions.count_documents({"user_id": "gap"}) == 0   # nothing inserted
    assert tx_writes_after_takeover(db.client, db.name, "gap", old) == []     # MongoDB applied none
    raw = list(db.sms_fin_rawdata.find({"user_id": "gap"}))
    assert all(d.get("isprocessed") is not True and d["smsd_epoch"] == lease.epoch for d in raw)
    a.stop(timeout=30)
    fenced.close()
    # The user goes on with a real host; a comes back without the failpoint and reconciles.
    assert newer.release("gap", lease.epoch)
    b = hosts("b", llm.url)
    wait_for(lambda: db.sms_fin_rawdata.count_documents({"user_id": "gap", "isprocessed": True}) == 6,
             timeout=60, what="b finishing the user")
    a2 = hosts("a", llm.url)
    report = wait_for(lambda: all_done(db, expected, [a2, b]), timeout=60, what="all reconciled")
    assert report.sms_processed == 6 and report.repeats_other_host == 0   # a's answers were handed over
    assert {d["smsd_epoch"] for d in db.financial_transactions.find({"user_id": "gap"})} == {lease.epoch + 1}


def test_a_killed_hosts_users_move_within_ttl(db, hosts, make_llm_server, tmp_path):
    llm = make_llm_server(latency_ms=300)
    a = hosts("a", llm.url, **SLOW)
    expected = seed_busy(db, a)
    b = hosts("b", llm.url, **SLOW)
    wait_for(lambda: both_alive(db), timeout=20, what="b heartbeating")
    old = {u: d["epoch"] for u, d in leases(db).items()}
    a.kill()
    killed_at = time.monotonic()
    cut = in_flight(a.state_dir)
    users = list(leases(db))
    wait_for(lambda: all(leases(db)[u]["owner"] == b.host_id for u in users), timeout=TTL + 5,
             what=f"b working on the killed host's users within TTL + 5 s")
    moved_after = time.monotonic() - killed_at
    took = leases(db)
    assert moved_after <= TTL + 5
    wait_for(lambda: db["sms_fin_rawdata"].count_documents({"isprocessed": {"$ne": True}}) == 0,
             timeout=120, what="b finishing")
    # The killed host comes back: what it had journaled is reconciled, nothing re-bought.
    a2 = hosts("a", llm.url, **SLOW)
    assert a2.host_id == a.host_id                       # the same host id after a restart
    report = wait_for(lambda: all_done(db, expected, [a2, b]), timeout=60, what="all reconciled")
    assert report.sms_processed == len(expected)
    check_moved(db, db.client, db.name, old, took, cut, report)


def test_release_and_drain_hand_leases_back_at_once(db, hosts, make_llm_server):
    # A TTL far above the waits below: only a release can move the users this fast.
    slow = dict(SLOW, lease={"ttl": 60.0})
    llm = make_llm_server(latency_ms=300)
    a = hosts("a", llm.url, **slow)
    expected = seed_busy(db, a)
    b = hosts("b", llm.url, **slow)
    wait_for(lambda: both_alive(db), timeout=20, what="b heartbeating")
    st = a.status()
    assert {row["user_id"] for row in st["leases"]} == {"user-0", "user-1"}
    assert all(row["owner"] == a.host_id and row["epoch"] == 1 and row["expires_at"] for row in st["leases"])
    shown = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(a.socket), "status"],
                           capture_output=True, text=True, timeout=30)
    assert f"LEASES of host {a.host_id} (2)" in shown.stdout, shown.stdout
    released = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(a.socket), "release",
                               "--user-id", "user-0", "--json"], capture_output=True, text=True, timeout=30)
    assert released.returncode == 0 and json.loads(released.stdout)["released"] == ["user-0"]
    wait_for(lambda: leases(db)["user-0"]["owner"] == b.host_id, timeout=20,
             what="b taking the released user")
    assert leases(db)["user-0"]["epoch"] == 2 and leases(db)["user-1"]["owner"] == a.host_id
    a.stop(timeout=30)
    # A drain gives back what is left at once: expired now, 60 s before its TTL would end.
    assert leases(db)["user-1"]["expires_at"] < datetime.now(timezone.utc)
    if db["sms_fin_rawdata"].count_documents({"user_id": "user-1", "isprocessed": {"$ne": True}}):
        wait_for(lambda: leases(db)["user-1"]["owner"] == b.host_id, timeout=20,
                 what="b taking the drained host's user")
    report = wait_for(lambda: all_done(db, expected, [a, b]), timeout=120, what="all SMS processed")
    assert report.sms_processed == len(expected) and report.repeats_other_host == 0
