"""Gathered flushes (smsd.flush_policy): kill -9 inside a flush that holds many answers.

A backfilling pipeline lets its journaled answers gather into page-sized
flushes.  These tests kill ``smsd once`` at the flush windows of DESIGN.md while
answers are gathered, restart it, and check every invariant and that nothing
was asked twice.  The policy's own rules are checked on a fake clock.
"""
from __future__ import annotations

import signal
import sqlite3
from pathlib import Path

import pytest

from smsd.flush_policy import FlushPolicy
from smsd.lab.invariants import verify

from ..harness import run_smsd, seed, write_config

N_SMS = 120
GATHER = 40


def _unflushed(state_dir: Path) -> tuple[int, int]:
    """(answered calls, their SMS) the journal holds unflushed (read-only, as the kill left it)."""
    calls = sms = 0
    for path in (state_dir / "journal").glob("*.sqlite"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            calls += conn.execute("SELECT count(*) FROM calls WHERE state = 'answered' AND flushed = 0"
                                  ).fetchone()[0]
            sms += conn.execute("SELECT count(*) FROM results r JOIN calls c ON c.call_id = r.call_id"
                                " WHERE c.state = 'answered' AND c.flushed = 0").fetchone()[0]
        finally:
            conn.close()
    return calls, sms


# (failpoint, visit, flush settings).  "page": the wait bound is raised so that only the
# page bound (GATHER SMS) or the run's end starts a flush, which makes what the killed
# flush holds certain; "defaults": the shipped settings, whatever the timing made of them.
CASES = [
    ("after_commit", 3, "page"),    # three answers journaled, none flushed yet
    ("mid_flush", 1, "page"),       # a gathered flush's transactions written, isprocessed not yet
    ("after_flush", 1, "page"),     # a gathered flush written, its journal rows not yet marked
    ("after_flush", 1, "defaults"),
]


@pytest.mark.parametrize("point,visit,flush", CASES, ids=[f"{p}@{v}-{f}" for p, v, f in CASES])
def test_kill_inside_a_gathered_flush_then_resume_asks_nothing_twice(point, visit, flush, tmp_path, db,
                                                                     mongo_server, mongo_db_name, llm_server):
    expected = seed(db, "g1", N_SMS)
    pipeline = {"flush_gather_sms": GATHER, "flush_max_wait_ms": 60_000} if flush == "page" else {}
    # One call in flight: a kill after its commit has nothing unanswered to repeat.
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"concurrency": 1, "batch_size": 10}, pipeline=pipeline)

    crashed = run_smsd(config, "once", "--user-id", "g1", SMSD_FAILPOINT=f"{point}@{visit}")
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    processed = db.sms_fin_rawdata.count_documents({"user_id": "g1", "isprocessed": True})
    calls, unflushed = _unflushed(tmp_path / "state")
    if flush == "page":
        if point == "after_commit":
            # Answers gather: three calls journaled, and MongoDB has seen none of them yet.
            assert processed == 0 and db.financial_transactions.count_documents({"user_id": "g1"}) == 0
            assert calls == 3
        elif point == "mid_flush":
            assert processed == 0 and unflushed >= GATHER
            assert db.financial_transactions.count_documents({"user_id": "g1"}) > 0
        else:
            # One flush wrote a whole gathered page (several calls' answers) at once.
            assert GATHER <= processed < N_SMS and unflushed >= GATHER and calls > 1

    resumed = run_smsd(config, "once", "--user-id", "g1", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    billed = llm_server.stats()["billed"]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=billed)
    assert report.ok, report.to_dict()
    assert report.sms_processed == N_SMS and report.tx_found == report.tx_expected
    assert _unflushed(tmp_path / "state") == (0, 0)
    # The killed run completed.  When the killed flush was the run's last (the shipped
    # settings gather all 120 SMS into one), it completed the checkpoint itself, and the
    # restart, finding nothing pending, opens an empty run as any --resume after a
    # completed run does.
    runs = list(db.processing_checkpoints.find({"user_id": "g1"}))
    assert all(cp["status"] == "completed" for cp in runs)
    assert [cp["processed_sms"] for cp in runs if cp["total_sms"]] == [N_SMS]
    assert all(cp["total_sms"] == cp["processed_sms"] for cp in runs)
    repeated = {k for k, n in billed.items() if n > 1}
    assert repeated == set(), f"{point}: answers bought twice: {sorted(repeated)[:5]}"


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_policy_flushes_at_a_page_or_when_the_oldest_answer_has_waited():
    clock = _Clock()
    policy = FlushPolicy(gather_sms=200, max_wait_ms=500, clock=clock)
    assert not policy.due(0) and policy.wait_s(0.5) == 0.5
    assert not policy.due(25)                  # the first answer starts the wait
    clock.now += 0.3
    assert not policy.due(150)
    assert policy.wait_s(0.5) == pytest.approx(0.2)   # the loop wakes when it is due
    assert policy.due(200)                     # a page
    clock.now += 0.2
    assert policy.due(150)                     # the oldest has waited 0.5 s
    policy.flushed()
    assert not policy.due(25) and policy.wait_s(0.5) == 0.5


@pytest.mark.parametrize("gather,wait_ms", [(1, 500), (200, 0)])
def test_policy_with_gathering_off_flushes_every_answer(gather, wait_ms):
    policy = FlushPolicy(gather_sms=gather, max_wait_ms=wait_ms, clock=_Clock())
    assert policy.every_answer and policy.due(5) and policy.wait_s(0.5) == 0.5


def test_policy_copies_the_bill_when_idle_and_at_most_every_few_seconds_while_busy():
    from smsd.flush_policy import COSTS_EVERY_S
    clock = _Clock()
    policy = FlushPolicy(gather_sms=200, max_wait_ms=1000, clock=clock)
    assert policy.costs_due(busy=True)          # the first flush copies it
    clock.now += 1.0
    assert not policy.costs_due(busy=True)      # calls in flight: the journal holds the bill
    assert policy.costs_due(busy=False)         # nothing in flight: copied now
    clock.now += COSTS_EVERY_S
    assert policy.costs_due(busy=True)
    every = FlushPolicy(gather_sms=1, max_wait_ms=1000, clock=clock)
    assert every.costs_due(busy=True) and every.costs_due(busy=True)
