"""``smsctl status`` paging against a real ``smsd run``: busiest first, totals for all,
counts from the per-user counters the flush writes."""
from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timezone

import pytest
from pymongo import MongoClient

from smsd import control_protocol as control

from ..harness import REPO, Daemon, seed, wait_for, write_config

PENDING = {"cy": 8, "ann": 5, "bob": 2, "dee": 1, "eve": 0}
PROCESSED = {"cy": 1, "ann": 4, "bob": 3, "dee": 0, "eve": 7}


@pytest.fixture
def daemon(tmp_path, mongo_server, mongo_db_name, llm_server):
    client = MongoClient(mongo_server.uri)
    db = client[mongo_db_name]
    now = datetime.now(timezone.utc)
    start = 0
    for user, n in PENDING.items():
        if n:
            seed(db, user, n, start=start)
            start += n
        done = [{"_id": f"{user}-old-{i}", "user_id": user, "body": "x", "isprocessed": True}
                for i in range(PROCESSED[user])]
        if done:
            db.sms_fin_rawdata.insert_many(done)
        # the counters as earlier flushes wrote them
        db.smsd_user_stats.insert_one({"_id": user, "user_id": user, "processed_sms": PROCESSED[user],
                                       "quarantined_sms": 0, "status": "completed",
                                       "last_flush_at": now, "updated_at": now})
    state = tmp_path / "state"
    state.mkdir()
    (state / "paused.json").write_text(json.dumps(sorted(PENDING)))   # nobody works until resumed
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    d = Daemon(config, tmp_path)
    d.db = db
    wait_for(lambda: (d.status().get("totals") or {}).get("pending_sms") == 16, what="first discovery")
    yield d
    d.stop()
    client.close()


def smsctl(d, *args):
    return subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(d.sock), *args],
                          capture_output=True, text=True, timeout=20, cwd=str(REPO))


def test_pages_are_busiest_first_and_totals_cover_every_user(daemon):
    pages = [daemon.status(limit=2, offset=k) for k in (0, 2, 4)]
    assert [[u["user_id"] for u in p["users"]] for p in pages] == [["cy", "ann"], ["bob", "dee"], ["eve"]]
    assert [p["paging"]["next_offset"] for p in pages] == [2, 4, None]
    for p in pages:
        assert p["totals"] == {"users": 5, "total_sms": 16 + 15, "processed_sms": 15, "pending_sms": 16,
                               "quarantined_sms": 0, "ungrounded_sms": 0, "unflushed": 0}
    cy = pages[0]["users"][0]
    assert (cy["total_sms"], cy["processed_sms"], cy["pending_sms"], cy["status"]) == (9, 1, 8, "paused")
    # no limit: every user (what the contract's readers of `users` get)
    assert len(daemon.status()["users"]) == 5
    assert daemon.status(limit=0)["users"] == [] and daemon.status(limit=0)["totals"]["users"] == 5
    with pytest.raises(control.ControlError, match="limit"):
        daemon.status(limit=-3)
    with pytest.raises(control.ControlError, match="offset"):
        daemon.status(limit=2, offset="x")


def test_smsctl_status_shows_one_page_with_totals(daemon):
    out = smsctl(daemon, "status", "--limit", "2")
    assert out.returncode == 0, out.stderr
    assert "users 5  SMS pending 16  processed 15  quarantined 0" in out.stdout
    assert "USERS (1-2 of 5, busiest first)" in out.stdout
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.startswith(("cy ", "ann ", "bob ", "dee "))]
    assert rows == ["cy", "ann"]
    assert "smsctl status --offset 2 --limit 2" in out.stdout
    st = json.loads(smsctl(daemon, "status", "--json", "--limit", "1", "--offset", "4").stdout)
    assert [u["user_id"] for u in st["users"]] == ["eve"] and st["totals"]["users"] == 5
    for key in ("pid", "workers", "journal", "llm"):
        assert key in st


def test_a_flush_moves_the_counters_status_shows(daemon):
    assert daemon.cmd("resume", user_id="bob")["resumed"] == ["bob"]
    wait_for(lambda: daemon.db.sms_fin_rawdata.count_documents({"user_id": "bob", "isprocessed": True}) == 5,
             what="bob processed")
    bob = wait_for(lambda: (lambda u: u if u["status"] == "completed" else None)(
        daemon.status(user_id="bob")["users"][0]), what="bob completed")
    assert (bob["processed_sms"], bob["pending_sms"], bob["total_sms"]) == (5, 0, 5)
    assert daemon.db.smsd_user_stats.find_one({"_id": "bob"})["processed_sms"] == 5
    assert daemon.status(limit=10)["totals"]["pending_sms"] == 14
