"""An LLM answer is committed in the thread that received it, whatever MongoDB is doing.

DESIGN.md's crash window "between LLM answer and commit" must be milliseconds
wide.  These tests hold MongoDB still (SIGSTOP: every command hangs, as a very
slow server would) or kill it while answers are on their way, SIGKILL ``smsd
once`` as soon as the LLM server has written the answers to the last byte, then
restart with MongoDB back: the server must be asked nothing a second time.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import time

import pytest
from pymongo import MongoClient

from smsd.journal_schema import journal_path
from smsd.lab.invariants import verify

from ..harness import run_smsd, seed, start_smsd, wait_for, write_config

N_SMS = 30
CALLS_IN_FLIGHT = 2     # concurrency 2 x batch 5 = the first page of 10


@pytest.mark.parametrize("mongo_fault", ["sigstop", "killed"])
def test_answers_that_arrived_while_mongodb_is_stuck_are_not_bought_again(
        mongo_fault, tmp_path, own_mongo, llm_server):
    client = MongoClient(own_mongo.uri)
    db = client["smsd_commit"]
    expected = seed(db, "u1", N_SMS)
    # A flush per answer (flush_gather_sms = 1): this window is the one where the main
    # loop is stuck in a flush while the other call's answer arrives.  With gathered
    # flushes the loop would first send the next page's calls (the page of 10 is not a
    # flush's worth), and those, in flight at the kill, may rightly be asked again
    # (DESIGN.md invariant 5); tests/daemon/test_flush_gather.py kills inside gathered flushes.
    config = write_config(tmp_path, mongo_uri=own_mongo.uri, db="smsd_commit", llm_url=llm_server.url,
                          llm={"concurrency": 2, "batch_size": 5},
                          pipeline={"page_size": 10, "flush_gather_sms": 1})
    # Slow answers with jitter: the two calls come back at different moments, and
    # the first one sends the main loop into a flush that MongoDB never answers.
    llm_server.set_faults(latency_ms=1500, latency_jitter_ms=800)
    proc = start_smsd(config, "once", "--user-id", "u1")
    stopped = False
    try:
        wait_for(lambda: llm_server.stats()["calls"] >= CALLS_IN_FLIGHT, timeout=30,
                 what="the first calls in flight")
        if mongo_fault == "sigstop":
            os.kill(own_mongo.pid, signal.SIGSTOP)
            stopped = True
        else:
            own_mongo.kill()
        # The server records each answer once its last byte is written.
        delivered = wait_for(lambda: (lambda r: len(r) >= CALLS_IN_FLIGHT and r)(
            llm_server.stats()["responses"]), timeout=30, what="answers delivered")
        delivered_at = time.time()
        # A commit takes milliseconds; 300 ms is generous and far shorter than any
        # MongoDB step that would otherwise hold the answer back.
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()[0][-2000:]
        proc.kill()
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        if stopped:
            os.kill(own_mongo.pid, signal.SIGCONT)
    if mongo_fault == "killed":
        own_mongo.restart()
    assert processed(db) == 0, "MongoDB was stuck: nothing can have been flushed"

    # Every delivered answer is in the journal, with its commit time.
    with sqlite3.connect(journal_path(tmp_path / "state", "u1")) as conn:
        rows = dict(conn.execute("SELECT request_id, committed_at FROM calls"
                                 " WHERE state = 'answered'").fetchall())
    written = {r["request_id"]: r["written_at"] for r in delivered}
    assert set(rows) == set(written)
    for request_id, committed_at in rows.items():
        assert committed_at is not None and committed_at <= delivered_at + 0.3
        print(f"answer {request_id}: committed {1000 * (committed_at - written[request_id]):.1f} ms "
              "after its last byte")

    llm_server.set_faults(latency_ms=0, latency_jitter_ms=0)
    resumed = run_smsd(config, "once", "--user-id", "u1", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    stats = llm_server.stats()
    assert stats["asked"] and max(stats["asked"].values()) == 1, \
        f"asked again: {sorted(k for k, n in stats['asked'].items() if n > 1)}"
    report = verify(db, expected, state_dir=tmp_path / "state", billed=stats["billed"])
    assert report.ok, report.to_dict()
    assert processed(db) == N_SMS
    client.close()


def processed(db) -> int:
    return db.sms_fin_rawdata.count_documents({"user_id": "u1", "isprocessed": True})
