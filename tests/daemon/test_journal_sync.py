"""The journal's WAL fsync off the committing thread (``journal.background_sync``).

Commits return at SQLite's ``synchronous = NORMAL`` (a kill cannot lose them: see
test_journal's SIGKILL test, run in both modes); :class:`smsd.journal_sync.WalSyncer`
fsyncs the WAL at once, and what the flush reads waits for that fsync.  Real files,
real fsyncs; the one test that needs a slow disk slows the syncer's own fsync.
"""
from __future__ import annotations

import threading
import time

import pytest

from smsd import journal as journal_mod
from smsd.journal import Journal
from smsd.journal_sync import WalSyncer
from smsd.model import Quarantine, Usage, sms_key

from .test_journal import USER, begin, result

SLOW_S = 0.4


def pragma_synchronous(j: Journal) -> int:
    return j.db.execute("PRAGMA synchronous").fetchone()[0]


def test_commits_return_at_normal_and_the_syncer_fsyncs_every_one(tmp_path):
    with Journal.open(tmp_path, USER, background_sync=True) as j:
        assert pragma_synchronous(j) == 1            # NORMAL: the fsync is not in the commit
        for n in range(5):
            call = begin(j, [n])
            j.record_answer(call, [(n, result(n))], failed={}, request_id=f"r{n}", usage=Usage(1, 1))
        syncer = j._syncer
        syncer.wait()                                # every commit so far is on disk
        assert 1 <= syncer.syncs <= syncer.mark()    # commits arriving together share an fsync
    with Journal.open(tmp_path, USER) as j:
        assert pragma_synchronous(j) == 2            # FULL: the fsync in the commit
        assert j._syncer is None
        assert len(j.unflushed()) == 5


def test_normal_has_no_syncer(tmp_path):
    with Journal.open(tmp_path, USER, synchronous="NORMAL", background_sync=True) as j:
        assert j._syncer is None and pragma_synchronous(j) == 1


class SlowSyncer(WalSyncer):
    """A disk whose fsync takes SLOW_S (the real fsync runs after the pause)."""

    def _sync(self) -> None:
        time.sleep(SLOW_S)
        super()._sync()


@pytest.fixture
def slow_disk(monkeypatch):
    monkeypatch.setattr(journal_mod, "WalSyncer", SlowSyncer)


def test_what_goes_to_mongodb_is_returned_only_once_fsynced(tmp_path, slow_disk):
    j = Journal.open(tmp_path, USER, background_sync=True)
    try:
        call = begin(j, ["a"])
        t0 = time.monotonic()
        j.record_answer(call, [("a", result("a"))], failed={}, request_id="r", usage=Usage(1, 1))
        committed = time.monotonic() - t0
        mark = j._syncer.mark()
        t0 = time.monotonic()
        [answer] = j.unflushed()                     # a flush's read
        waited = time.monotonic() - t0
        assert answer.call_id == call
        assert j._syncer._synced >= mark             # its commit is fsynced
        # The LLM thread's commit did not wait for the slow disk; the flush's read did.
        assert committed < SLOW_S / 2 <= waited
        j.add_quarantine([Quarantine(raw_id="b", key=sms_key("b"), user_id=USER, reason="x")])
        mark = j._syncer.mark()
        assert [q.key for q in j.unflushed_quarantine()] == [sms_key("b")]
        assert j._syncer._synced >= mark
        assert j.unsynced_ledger() and j._syncer._synced >= j._syncer.mark()
    finally:
        j.close()


def test_the_answer_commit_does_not_wait_for_an_fsync_in_progress(tmp_path, slow_disk):
    # A main-loop write's fsync (here: begin_call's) is in progress when the answer
    # arrives; the answer's commit returns without waiting for it.
    j = Journal.open(tmp_path, USER, background_sync=True)
    try:
        call = begin(j, ["a"])                       # its fsync now runs for SLOW_S
        done = threading.Event()
        t0 = time.monotonic()
        threading.Thread(target=lambda: (j.record_answer(call, [("a", result("a"))], failed={},
                                                         request_id="r", usage=Usage(1, 1)),
                                         done.set())).start()
        assert done.wait(SLOW_S / 2), "the answer's commit waited for the disk"
        assert time.monotonic() - t0 < SLOW_S / 2
    finally:
        j.close()
    with Journal.open(tmp_path, USER) as again:
        assert again.answered_keys([sms_key("a")]) == {sms_key("a")}


def test_close_fsyncs_what_is_left(tmp_path, slow_disk):
    j = Journal.open(tmp_path, USER, background_sync=True)
    call = begin(j, ["a"])
    j.record_answer(call, [("a", result("a"))], failed={}, request_id="r", usage=Usage(1, 1))
    syncer = j._syncer
    j.close()
    assert syncer._synced == syncer.mark() and not syncer._thread.is_alive()
