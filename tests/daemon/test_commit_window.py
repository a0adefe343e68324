"""Issue 12, item 1: an answer is committed the moment it arrives, whatever MongoDB does.

A worker SIGKILLed right after an LLM response arrived (``after_commit``: the
answer's journal commit has returned, nothing of it is in MongoDB) while every
MongoDB command takes 200 ms, or while MongoDB is down: the restarted worker asks
nothing again, and every invariant holds.  MongoDB is slowed or cut by the
wire-protocol proxy (:mod:`smsd.lab.mongoproxy`, a separate process); the kill is
a real SIGKILL at the failpoint.
"""
from __future__ import annotations

import signal
import sqlite3

import pytest

from smsd.lab.invariants import verify
from smsd.lab.mongoproxy import ProxyProcess

from ..harness import run_smsd, seed, start_smsd, wait_for, write_config

SLOW_MS = 200


@pytest.fixture
def proxy(mongo_server, tmp_path):
    p = ProxyProcess(mongo_server.uri, tmp_path / "proxy.log").start()
    yield p
    p.stop()


def answered_calls(state_dir) -> int:
    paths = list((state_dir / "journal").glob("*.sqlite"))
    assert len(paths) == 1
    conn = sqlite3.connect(f"file:{paths[0]}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM calls WHERE state = 'answered'").fetchone()[0]
    finally:
        conn.close()


@pytest.mark.parametrize("mongo", ["slow", "down"])
def test_killed_right_after_an_answer_while_mongodb_is_slow_or_down_asks_nothing_again(
        mongo, tmp_path, db, proxy, mongo_db_name, llm_server):
    expected = seed(db, "u1", 15)
    # One call in flight at a time: the kill cuts no other call, so nothing at all may
    # be asked again.  The LLM answers after 1.5 s, so that MongoDB can go down after
    # the call was sent (a claim needs MongoDB) and before its answer arrives.
    llm_server.set_faults(latency_ms=1500)
    config = write_config(tmp_path, mongo_uri=proxy.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"concurrency": 1}, pipeline={"page_size": 10})
    if mongo == "slow":
        proxy.configure(delay_ms=SLOW_MS)
    proc = start_smsd(config, "once", "--user-id", "u1", SMSD_FAILPOINT="after_commit@1")
    try:
        if mongo == "down":
            wait_for(lambda: llm_server.stats()["calls"] >= 1, timeout=60, what="the first LLM call")
            proxy.configure(down=True)
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    # Killed with the answer journaled and nothing of it in MongoDB.
    assert answered_calls(tmp_path / "state") == 1
    assert db.sms_fin_rawdata.count_documents({"user_id": "u1", "isprocessed": True}) == 0
    if mongo == "down":
        assert proxy.stats()["down"], "MongoDB came back before the kill"
    billed_at_kill = llm_server.stats()["billed"]
    assert len(billed_at_kill) == 5

    proxy.configure(down=False, delay_ms=0)
    llm_server.set_faults(latency_ms=0)
    resumed = run_smsd(config, "once", "--user-id", "u1", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]

    billed = llm_server.stats()["billed"]
    assert {k: n for k, n in billed.items() if n > 1} == {}, "the restarted worker bought an answer twice"
    assert set(billed_at_kill) <= set(billed) and len(billed) == 15
    report = verify(db, expected, state_dir=tmp_path / "state", billed=billed)
    assert report.ok, report.to_dict()
    assert report.sms_processed == 15 and report.tx_found == report.tx_expected
