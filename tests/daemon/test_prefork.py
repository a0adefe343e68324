"""Pre-forked workers: a few long-lived processes serve many users' turns.

Each worker keeps its MongoClient and LLM client and takes one user at a time
from the supervisor; a user whose turn kills the worker is isolated and
restarted with back-off, as when workers were forked per turn.
"""
from __future__ import annotations

import os
import re
import signal
import time
from datetime import datetime, timedelta, timezone

import pytest
from pymongo import MongoClient

from smsd.lab.invariants import verify

from ..harness import Daemon, fixture_lines, seed, wait_for, write_config

MAX_WORKERS = 4


@pytest.fixture
def db(mongo_server, mongo_db_name):
    client = MongoClient(mongo_server.uri)
    yield client[mongo_db_name]
    client.drop_database(mongo_db_name)
    client.close()


def seed_users(db, users: int, sms_each: int) -> dict:
    """``users`` users with ``sms_each`` fixture SMS each, in one insert; raw _id -> expected."""
    lines = fixture_lines()
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs, expected = [], {}
    for u in range(users):
        for i in range(sms_each):
            n = u * sms_each + i
            line = lines[n % len(lines)]
            raw_id = f"u{u:04d}-{i}"
            doc = {"_id": raw_id, "user_id": f"u{u:04d}", "body": line["text"],
                   "received_at": base + timedelta(minutes=n), "isprocessed": False}
            if line.get("sender"):
                doc["sender"] = line["sender"]
            docs.append(doc)
            expected[raw_id] = line["expected"]
    db["sms_fin_rawdata"].insert_many(docs)
    return expected


def processed(db) -> int:
    return db.sms_fin_rawdata.count_documents({"isprocessed": True})


@pytest.mark.slow
@pytest.mark.longest
def test_a_thousand_users_with_two_sms_each_complete_under_smsd_run(tmp_path, db, mongo_server,
                                                                     mongo_db_name, llm_server):
    users, each = 1000, 2
    expected = seed_users(db, users, each)
    log_file = tmp_path / "smsd.log"   # a thousand turns log more than a stdout pipe holds
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          supervisor={"max_workers": MAX_WORKERS, "discovery_interval": 1.0,
                                      "log_file": str(log_file)})
    started = time.monotonic()
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: processed(db) == users * each, timeout=900, what="every SMS processed",
                 interval=0.5)
        elapsed = time.monotonic() - started
        print(f"{users} users x {each} SMS under smsd run: {elapsed:.1f} s")
        # A user's row is refreshed by the next discovery after its last turn.
        st = wait_for(lambda: (lambda s: not s["workers"] and s["journal"]["unflushed"] == 0
                               and len(s["users"]) == users
                               and all(u["status"] == "completed" for u in s["users"]) and s)(
                                   d.status(limit=users)),
                      timeout=120, what="idle with every user completed")
        assert st["llm"]["repeated_calls"] == 0
    finally:
        code, out = d.stop()
    out += log_file.read_text()
    assert code == 0, out[-3000:]
    # A thousand turns, served by at most max_workers processes (none crashed).
    started_workers = set(re.findall(r"worker (\d+) started", out))
    assert 1 <= len(started_workers) <= MAX_WORKERS, len(started_workers)
    # Small users share turns (trickle batching): count the users the turns named.
    taken = [u for names in re.findall(r"took users? (.+?) \(turn", out) for u in names.split(", ")]
    assert len(set(taken)) == users, len(set(taken))
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()


def test_one_worker_serves_users_in_turn_and_a_killed_turn_is_isolated(tmp_path, db, mongo_server,
                                                                       mongo_db_name, llm_server):
    expected = {}
    for user in ("ann", "bob", "cy"):
        expected.update(seed(db, user, 30))
    llm_server.set_faults(latency_ms=100)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          supervisor={"max_workers": 1, "discovery_interval": 1.0,
                                      "restart_backoff": 0.2},
                          pipeline={"worker_max_sms": 10})
    d = Daemon(config, tmp_path)
    try:
        first = wait_for(d.worker_pids, what="a busy worker", interval=0.02)
        (pid, victim_user), = first.items()
        # The same process moves on to other users: turns of 10 SMS, one worker.
        seen = wait_for(lambda: {u for p, u in d.worker_pids().items() if p == pid} - {victim_user},
                        timeout=30, what="the worker on another user", interval=0.02)
        assert seen
        busy = wait_for(d.worker_pids, what="a busy worker", interval=0.02)
        (pid2, user2), = busy.items()
        assert pid2 == pid
        os.kill(pid, signal.SIGKILL)   # the turn of user2 dies with its worker
        wait_for(lambda: any(p != pid for p in d.worker_pids()), timeout=30,
                 what="a fresh worker", interval=0.02)
        wait_for(lambda: processed(db) == 90, timeout=90, what="all processed")
        st = wait_for(lambda: (lambda s: not s["workers"] and all(
            u["status"] == "completed" for u in s["users"]) and s)(d.status()), timeout=30,
                      what="idle, every user completed")
        row = next(u for u in st["users"] if u["user_id"] == user2)
        assert row["restarts"] == 1 and row["status"] == "completed"
        assert all(u["restarts"] == 0 for u in st["users"] if u["user_id"] != user2)
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
