"""The journal: durability across SIGKILL, the per-user lock, first answer wins,
flush bookkeeping, quarantine, read-only scan, file modes and refusal of bad files.

Real files in tmp_path, real child processes where a crash or a second process
is the point.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
from bson import Int64, ObjectId

from smsd.journal import AlreadyAnswered, Journal, JournalError, JournalLocked
from smsd.journal_scan import scan, scan_changed
from smsd.journal_schema import SCHEMA_VERSION, journal_path
from smsd.model import Quarantine, SmsResult, Transaction, Usage, sms_key

USER = "user-1"


def result(raw_id, amount="12345.00", balance=None, kind="transaction") -> SmsResult:
    tx = Transaction(direction="debit", amount=Decimal(amount), currency="INR", channel="upi",
                     balance=Decimal(balance) if balance is not None else None)
    return SmsResult(key=sms_key(raw_id), kind=kind, transactions=(tx,))


def begin(j: Journal, raw_ids) -> str:
    return j.begin_call([(sms_key(r), r) for r in raw_ids], owner="host-a", epoch=0, model="m1")


def answer(j: Journal, call_id: str, raw_ids, **kw) -> None:
    j.record_answer(call_id, [(r, result(r)) for r in raw_ids], failed=kw.pop("failed", {}),
                    request_id=kw.pop("request_id", "req-1"), usage=kw.pop("usage", Usage(100, 20)),
                    **kw)


def call_row(j: Journal, call_id: str) -> dict:
    return next(j.db.query("SELECT * FROM calls WHERE call_id = ?", [call_id]))


CHILD_PRELUDE = """
import os, signal, sys, time
from decimal import Decimal
from pathlib import Path
from smsd.journal import Journal
from smsd.model import SmsResult, Transaction, Usage, sms_key
state_dir, user = sys.argv[1], sys.argv[2]
def result(raw_id):  # the same as result() below
    tx = Transaction(direction="debit", amount=Decimal("12345.00"), currency="INR", channel="upi")
    return SmsResult(key=sms_key(raw_id), kind="transaction", transactions=(tx,))
"""


def child(code: str, state_dir, user: str = USER) -> subprocess.Popen:
    """Start ``python -c`` with the prelude above; stdout is a pipe."""
    src = CHILD_PRELUDE + textwrap.dedent(code)
    return subprocess.Popen([sys.executable, "-c", src, str(state_dir), user],
                            stdout=subprocess.PIPE, text=True)


def run_child(code: str, state_dir, user: str = USER) -> tuple[int, str]:
    proc = child(code, state_dir, user)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out


@pytest.fixture
def journal(tmp_path):
    with Journal.open(tmp_path, USER) as j:
        yield j


# -- results ---------------------------------------------------------------------

def test_results_round_trip_with_exact_decimals_and_any_bson_raw_id(journal):
    raw_ids = ["sms-1", 42, Int64(2**40), ObjectId(), {"bank": "x", "n": 7}, True]
    call_id = begin(journal, raw_ids)
    items = [(r, result(r, amount="12345.00", balance="0.10")) for r in raw_ids]
    journal.record_answer(call_id, items, failed={}, request_id="req-9", usage=Usage(7, 3))

    [ans] = journal.unflushed()
    assert ans.call_id == call_id
    assert [r for r, _ in ans.items] == raw_ids
    assert [type(r) for r, _ in ans.items] == [type(r) for r in raw_ids]
    for (_, got), (_, sent) in zip(ans.items, items):
        assert got == sent
        assert str(got.transactions[0].amount) == "12345.00"
        assert str(got.transactions[0].balance) == "0.10"
    stored = next(journal.db.query("SELECT transactions FROM results LIMIT 1"))["transactions"]
    assert json.loads(stored)[0]["amount"] == "12345.00"  # a string, never a float


def test_answer_provenance_names_call_model_request_owner_and_epoch(tmp_path):
    with Journal.open(tmp_path, USER) as j:
        call_id = j.begin_call([(sms_key("a"), "a")], owner="host-b", epoch=3, model="m1")
        answer(j, call_id, ["a"], request_id="req-x", model="m1-2024")
        before = time.time()
        prov = j.unflushed()[0].provenance()
    assert (prov.call_id, prov.model, prov.request_id, prov.owner, prov.epoch) == \
        (call_id, "m1-2024", "req-x", "host-b", 3)
    assert prov.answered_at.tzinfo is not None and prov.answered_at.utcoffset().total_seconds() == 0
    assert abs(prov.answered_at.timestamp() - before) < 5


def test_first_answer_wins(journal):
    first = begin(journal, ["a"])
    second = begin(journal, ["a", "b"])  # e.g. asked again before the first answer came
    journal.record_answer(first, [("a", result("a", amount="1.00"))], failed={},
                          request_id=None, usage=Usage())
    journal.record_answer(second, [("a", result("a", amount="999.00")), ("b", result("b"))],
                          failed={}, request_id=None, usage=Usage())
    answers = {a.call_id: a for a in journal.unflushed()}
    assert answers[first].items == [("a", result("a", amount="1.00"))]
    assert [r for r, _ in answers[second].items] == ["b"]
    assert journal.unflushed_count() == 2


def test_call_whose_results_all_exist_already_is_flushed_at_once(journal):
    first = begin(journal, ["a"])
    second = begin(journal, ["a"])
    answer(journal, first, ["a"])
    answer(journal, second, ["a"])
    assert [a.call_id for a in journal.unflushed()] == [first]
    assert call_row(journal, second)["flushed"] == 1


def test_begin_call_refuses_sms_that_already_have_a_result(journal):
    answer(journal, begin(journal, ["a"]), ["a"])
    with pytest.raises(AlreadyAnswered) as e:
        begin(journal, ["b", "a"])
    assert e.value.keys == [sms_key("a")]
    assert journal.stats()["calls"] == 1  # nothing was recorded for the refused call


def test_begin_call_refuses_a_key_that_does_not_match_its_raw_id(journal):
    with pytest.raises(ValueError):
        journal.begin_call([(sms_key("5"), 5)], owner="h", epoch=0, model="m")


def test_answered_keys_finds_results_among_thousands_of_keys(journal):
    raw_ids = [f"sms-{i}" for i in range(1500)]
    call_id = begin(journal, raw_ids)
    answer(journal, call_id, raw_ids[::2])
    asked = [sms_key(r) for r in raw_ids] + [sms_key(i) for i in range(1500)]
    t0 = time.perf_counter()
    found = journal.answered_keys(asked)
    assert time.perf_counter() - t0 < 0.5
    assert found == {sms_key(r) for r in raw_ids[::2]}


# -- crashes -------------------------------------------------------------------

def test_begin_call_is_durable_before_the_answer_and_a_reask_counts_as_repeated(tmp_path):
    rc, out = run_child("""
        with Journal.open(state_dir, user) as j:
            call_id = j.begin_call([(sms_key(r), r) for r in ("a", "b")],
                                   owner="h", epoch=0, model="m")
            print(call_id, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)   # the request is in flight
    """, tmp_path)
    assert rc == -signal.SIGKILL
    call_id = out.strip()
    with Journal.open(tmp_path, USER) as j:
        row = call_row(j, call_id)
        assert row["state"] == "sent" and row["answered_at"] is None
        assert j.answered_keys([sms_key("a"), sms_key("b")]) == set()
        assert j.unflushed() == []
        assert j.stats()["repeated_calls"] == 0
        retry = begin(j, ["a", "b", "c"])  # after the restart the batch is bought again
        answer(j, retry, ["a", "b", "c"])
        stats = j.stats()
    assert stats["calls"] == 2
    assert stats["repeated_calls"] == 1
    assert stats["repeated_sms"] == 2
    assert stats["sent_calls"] == 1


@pytest.mark.parametrize("background_sync", [False, True], ids=["fsync-in-commit", "fsync-in-thread"])
def test_result_survives_sigkill_right_after_record_answer(tmp_path, background_sync):
    # With background_sync the commit returns before the WAL fsync: the kill below may
    # strike before the syncer's fsync, and the answer must survive it all the same.
    rc, out = run_child(f"""
        j = Journal.open(state_dir, user, background_sync={background_sync})
        call_id = j.begin_call([(sms_key(r), r) for r in ("a", 7)], owner="h", epoch=0, model="m")
        j.record_answer(call_id, [("a", result("a")), (7, result(7))], failed={{}},
                        request_id="req-1", usage=Usage(11, 4))
        print(call_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """, tmp_path)
    assert rc == -signal.SIGKILL
    call_id = out.strip()
    # The supervisor sees it before anyone reopens (read-only WAL recovery) ...
    assert scan(tmp_path)[USER]["unflushed"] == 2
    # ... and the next worker replays it.
    with Journal.open(tmp_path, USER) as j:
        [ans] = j.unflushed()
        assert ans.call_id == call_id and ans.request_id == "req-1"
        assert ans.items == [("a", result("a")), (7, result(7))]
        assert str(ans.items[0][1].transactions[0].amount) == "12345.00"
        assert j.answered_keys([sms_key("a"), sms_key(7)]) == {sms_key("a"), sms_key(7)}
        assert j.stats()["prompt_tokens"] == 11


# -- the lock ----------------------------------------------------------------------

def start_holder(tmp_path, extra: str = "") -> subprocess.Popen:
    proc = child(f"""
        j = Journal.open(state_dir, user)
        {extra}
        print("ready", flush=True)
        time.sleep(60)
    """, tmp_path)
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(extra: str = "") -> subprocess.Popen:
        procs.append(start_holder(tmp_path, extra))
        return procs[-1]

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_process_gets_journal_locked_naming_the_holder(tmp_path, holder):
    proc = holder()
    with pytest.raises(JournalLocked) as e:
        Journal.open(tmp_path, USER)
    assert e.value.holder_pid == proc.pid
    assert str(proc.pid) in str(e.value)


def test_waiting_opener_gives_up_after_wait_seconds(tmp_path, holder):
    holder()
    t0 = time.monotonic()
    with pytest.raises(JournalLocked):
        Journal.open(tmp_path, USER, wait=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2


def test_waiting_opener_gets_the_lock_once_the_holder_is_sigkilled(tmp_path, holder):
    proc = holder()
    threading.Timer(0.3, os.kill, (proc.pid, signal.SIGKILL)).start()
    t0 = time.monotonic()
    with Journal.open(tmp_path, USER, wait=10) as j:  # the kernel released the flock
        assert 0.25 <= time.monotonic() - t0 < 5
        assert j.stats()["calls"] == 0


def test_the_lock_is_exclusive_within_one_process_too_and_close_releases_it(tmp_path):
    j = Journal.open(tmp_path, USER)
    with pytest.raises(JournalLocked) as e:
        Journal.open(tmp_path, USER)
    assert e.value.holder_pid == os.getpid()
    with Journal.open(tmp_path, "another-user"):
        pass  # other users are not affected
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalError):
        j.stats()
    Journal.open(tmp_path, USER).close()


# -- flush bookkeeping -------------------------------------------------------------

def test_unflushed_is_oldest_first_and_mark_flushed_removes_calls(journal):
    c1, c2, c3 = (begin(journal, [f"{n}-a", f"{n}-b"]) for n in (1, 2, 3))
    answer(journal, c3, ["3-a", "3-b"])
    answer(journal, c1, ["1-a"], failed={sms_key("1-b"): "missing"})
    answer(journal, c2, ["2-a", "2-b"])
    assert [a.call_id for a in journal.unflushed()] == [c1, c2, c3]  # by send order
    assert [a.call_id for a in journal.unflushed(limit=2)] == [c1, c2]
    assert journal.unflushed_count() == 5
    journal.mark_flushed([c1, c3])
    assert [a.call_id for a in journal.unflushed()] == [c2]
    assert journal.unflushed_count() == 2
    assert journal.stats()["unflushed"] == 2
    assert call_row(journal, c1)["flushed_at"] is not None
    journal.mark_flushed([c2])
    assert journal.unflushed() == [] and journal.unflushed_count() == 0
    assert journal.stats()["answered_sms"] == 5


def test_failed_keys_and_failed_calls_count_attempts(journal):
    k = sms_key("x")
    c1 = begin(journal, ["x", "y"])
    journal.record_answer(c1, [], failed={k: "missing", sms_key("y"): "invalid amount"},
                          request_id="r", usage=Usage(5, 1))
    assert call_row(journal, c1)["state"] == "answered"
    assert call_row(journal, c1)["flushed"] == 1  # nothing to flush
    c2 = begin(journal, ["x"])
    journal.record_failure(c2, "HTTP 500 after retries")
    assert call_row(journal, c2)["state"] == "failed"
    assert journal.attempts([k, sms_key("y"), sms_key("never")]) == \
        {k: 2, sms_key("y"): 1, sms_key("never"): 0}
    row = next(journal.db.query("SELECT * FROM failures WHERE sms_key = ?", [k]))
    assert row["last_error"] == "HTTP 500 after retries"
    with pytest.raises(JournalError):  # an answer cannot follow a failure
        answer(journal, c2, ["x"])
    stats = journal.stats()
    assert (stats["calls"], stats["failed_calls"], stats["repeated_calls"]) == (2, 1, 1)
    assert journal.unflushed() == []


def test_record_answer_for_an_unknown_call_is_refused_and_changes_nothing(journal):
    with pytest.raises(JournalError):
        answer(journal, "no-such-call", ["a"])
    assert journal.answered_keys([sms_key("a")]) == set()


def test_commit_timings_record_each_answer(journal):
    for n in range(3):
        answer(journal, begin(journal, [n]), [n])
    timings = journal.commit_timings()
    assert len(timings) == 3 and all(0 < t < 5 for t in timings)


def test_an_answer_commits_while_another_thread_is_inside_a_read(journal):
    # The LLM thread's commit must not wait for the main loop's journal reads (a flush
    # parsing answers, the status counts): reads take no lock, each thread has its own
    # connection.  The reader below stays inside its read until the answer is committed.
    call = begin(journal, ["a"])
    inside, committed = threading.Event(), threading.Event()

    def main_loop_reads():
        with journal._use() as db:
            db.execute("SELECT COUNT(*) FROM results").fetchone()
            inside.set()
            committed.wait(10)

    reader = threading.Thread(target=main_loop_reads)
    reader.start()
    assert inside.wait(10)
    llm_thread = threading.Thread(target=lambda: (answer(journal, call, ["a"]), committed.set()))
    llm_thread.start()
    llm_thread.join(10)
    reader.join(10)
    assert committed.is_set(), "the answer's commit waited for a read in another thread"
    assert journal.answered_keys([sms_key("a")]) == {sms_key("a")}   # seen by the reading thread's own view
    with journal._use() as db:
        assert db.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1


def test_committed_at_becomes_the_time_the_commit_returned(journal, tmp_path):
    # record_answer stamps committed_at right before COMMIT (a transaction cannot record
    # its end); the next write of another kind replaces it with the time COMMIT returned.
    call = begin(journal, ["a"])
    t0 = time.time()
    answer(journal, call, ["a"])
    t1 = time.time()
    before = call_row(journal, call)["committed_at"]
    assert t0 <= before <= t1
    journal.mark_flushed([])
    after = call_row(journal, call)["committed_at"]
    assert before < after <= t1
    # close() writes the stamps no other write has taken yet.
    call2 = begin(journal, ["b"])
    answer(journal, call2, ["b"])
    t2 = time.time()
    pre = call_row(journal, call2)["committed_at"]
    journal.close()
    reopened = Journal.open(tmp_path, USER)
    try:
        assert pre < call_row(reopened, call2)["committed_at"] <= t2
    finally:
        reopened.close()


def test_a_committing_thread_opens_its_connection_ahead_and_runs_no_checkpoint(journal):
    # An LLM thread prepares its connection as it starts (the pool's initializer): the
    # first answer does not pay for opening it, and no commit of that thread runs an
    # automatic checkpoint (two fsyncs) inside an answer's commit.
    call = begin(journal, ["a"])
    got = {}

    def llm_thread():
        journal.prepare_committer()
        got["opened"] = journal._conns.count()
        got["autocheckpoint"] = journal.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
        answer(journal, call, ["a"])

    t = threading.Thread(target=llm_thread)
    t.start()
    t.join(10)
    assert got == {"opened": 2, "autocheckpoint": 0}
    assert journal.db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000   # the opener's
    assert journal.answered_keys([sms_key("a")]) == {sms_key("a")}


def test_threads_get_their_own_connection_and_ended_ones_are_closed(journal):
    def use():
        journal.answered_keys([sms_key("x")])

    for _ in range(3):
        t = threading.Thread(target=use)
        t.start()
        t.join()
    use()   # the opening thread's connection is the first one
    t = threading.Thread(target=use)
    t.start()
    t.join()
    # The ended threads' connections are closed as new ones are made: the opening
    # thread's and the last thread's are left, not one per thread ever seen.
    assert journal._conns.count() == 2


def test_a_connection_its_thread_let_go_of_is_taken_by_the_next_thread_not_made_anew(journal):
    # A group turn opens a journal in an opener thread and runs it in a member thread.
    conns = journal._conns
    opener_db = journal.db
    journal.release_connection()
    assert conns.count() == 1
    seen = {}

    def committer():   # an LLM thread's connection runs no checkpoint: never the spare
        journal.prepare_committer()
        seen["committer"] = journal.db

    def member():
        seen["member"] = journal.db
        answer(journal, begin(journal, ["a"]), ["a"])

    for target in (committer, member):
        t = threading.Thread(target=target)
        t.start()
        t.join(10)
    assert seen["member"] is opener_db and seen["committer"] is not opener_db
    assert journal.db is not opener_db     # the opener's thread, after letting go, gets its own
    assert journal.answered_keys([sms_key("a")]) == {sms_key("a")}


def test_reopening_a_journal_takes_no_write_transaction(tmp_path):
    import sqlite3
    Journal.open(tmp_path, USER).close()
    path = journal_path(tmp_path, USER)
    # Another connection holds SQLite's write lock: an open that began a write
    # transaction would wait for it (busy_timeout) and fail.
    other = sqlite3.connect(path, isolation_level=None, timeout=0)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with Journal.open(tmp_path, USER) as j:
            assert j.meta("user_id") == USER and j.stats()["calls"] == 0
        assert time.monotonic() - started < 2.0
    finally:
        other.execute("ROLLBACK")
        other.close()


# -- quarantine and retry ------------------------------------------------------------

def test_quarantine_round_trip_flush_and_retry(journal):
    oid = ObjectId()
    items = [Quarantine(raw_id=oid, key=sms_key(oid), user_id=USER, reason="unparseable",
                        attempts=3, extra={"last_error": "missing"}),
             Quarantine(raw_id=9, key=sms_key(9), user_id=USER, reason="too long")]
    c = begin(journal, [oid])
    journal.record_failure(c, "bad", [sms_key(oid)])
    journal.add_quarantine(items)
    assert journal.unflushed_quarantine() == items
    journal.add_quarantine([Quarantine(raw_id=9, key=sms_key(9), user_id=USER,
                                       reason="still too long")])  # replaces
    assert [q.reason for q in journal.unflushed_quarantine()] == ["unparseable", "still too long"]
    journal.mark_quarantine_flushed([sms_key(oid)])
    assert [q.key for q in journal.unflushed_quarantine()] == [sms_key(9)]
    assert journal.stats()["quarantined"] == 2

    journal.clear_failures([sms_key(oid)])  # smsctl retry for one SMS
    assert journal.attempts([sms_key(oid)]) == {sms_key(oid): 0}
    assert journal.stats()["quarantined"] == 1
    journal.clear_failures()  # for all
    assert journal.stats()["quarantined"] == 0


def test_quarantine_of_another_user_is_refused(journal):
    with pytest.raises(ValueError):
        journal.add_quarantine([Quarantine(raw_id=1, key=sms_key(1), user_id="other", reason="x")])


# -- scan ------------------------------------------------------------------------------

def test_scan_reads_journals_while_another_process_holds_the_lock_mid_write(tmp_path, holder):
    with Journal.open(tmp_path, "other") as j:
        answer(j, begin(j, ["o"]), ["o"])
    # The holder commits one answer, then keeps a write transaction open.
    holder("""
        c = j.begin_call([(sms_key("a"), "a")], owner="h", epoch=0, model="m")
        j.record_answer(c, [("a", result("a"))], failed={}, request_id=None, usage=Usage(3, 2))
        j.db.execute("BEGIN IMMEDIATE")
        j.db.execute("UPDATE calls SET prompt_tokens = 999")
    """)
    t0 = time.monotonic()
    found = scan(tmp_path)
    assert time.monotonic() - t0 < 2
    assert found[USER]["unflushed"] == 1
    assert found[USER]["prompt_tokens"] == 3  # committed state only
    assert found["other"]["answered_sms"] == 1
    with pytest.raises(JournalLocked):  # scan took no lock, the holder still has it
        Journal.open(tmp_path, USER)


def test_scan_skips_corrupt_files_with_a_warning(tmp_path, caplog):
    Journal.open(tmp_path, USER).close()
    bad = journal_path(tmp_path, "broken")
    bad.write_bytes(b"this is not a database " * 100)
    with caplog.at_level(logging.WARNING, logger="smsd.journal"):
        found = scan(tmp_path)
    assert list(found) == [USER]
    assert str(bad) in caplog.text
    assert scan(tmp_path / "nothing-here") == {}


def test_scan_changed_opens_only_journals_changed_since_the_last_scan(tmp_path, caplog):
    for user in ("a", "b", "c"):
        with Journal.open(tmp_path, user) as j:
            answer(j, begin(j, [user]), [user])
    first = scan_changed(tmp_path, {})
    assert set(first["journals"]) == {"a", "b", "c"} and first["gone"] == {}
    seen = dict(first["seen"])
    assert scan_changed(tmp_path, seen) == {"journals": {}, "seen": {}, "gone": {}}   # nothing opened
    with Journal.open(tmp_path, "b") as j:      # a worker writes (WAL, then checkpoint at close)
        call = begin(j, ["b2"])
        answer(j, call, ["b2"])
        live = scan_changed(tmp_path, seen)
        assert list(live["journals"]) == ["b"] and live["journals"]["b"]["unflushed"] == 2
        seen.update(live["seen"])
        j.mark_flushed([call])
    after = scan_changed(tmp_path, seen)
    assert list(after["journals"]) == ["b"] and after["journals"]["b"]["unflushed"] == 1
    seen.update(after["seen"])
    bad = journal_path(tmp_path, "broken")
    bad.write_bytes(b"this is not a database " * 100)
    with caplog.at_level(logging.WARNING, logger="smsd.journal"):
        found = scan_changed(tmp_path, seen)
    assert found["journals"] == {} and found["seen"][bad.name][-1] is None   # skipped, remembered
    seen.update(found["seen"])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="smsd.journal"):
        assert scan_changed(tmp_path, seen)["seen"] == {}       # not re-read (nor re-warned) unchanged
    assert caplog.text == ""
    # with `check`, only the named files (and new ones) are looked at
    with Journal.open(tmp_path, "a") as j:
        answer(j, begin(j, ["a2"]), ["a2"])
    Journal.open(tmp_path, "d").close()
    assert set(scan_changed(tmp_path, seen, check=set())["journals"]) == {"d"}
    assert set(scan_changed(tmp_path, seen, check={"a.sqlite"})["journals"]) == {"a", "d"}
    journal_path(tmp_path, "c").unlink()
    assert scan_changed(tmp_path, seen, check=set())["gone"] == {"c.sqlite": "c"}


# -- files ----------------------------------------------------------------------------------

def test_files_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        with Journal.open(tmp_path / "state", USER) as j:
            answer(j, begin(j, ["a"]), ["a"])
            files = [j.path, f"{j.path}-wal", f"{j.path}-shm", f"{j.path}.lock"]
            modes = {str(f): stat.S_IMODE(os.stat(f).st_mode) for f in files}
            dir_mode = stat.S_IMODE(os.stat(j.path.parent).st_mode)
    finally:
        os.umask(old)
    assert modes == {str(f): 0o600 for f in files}
    assert dir_mode == 0o700


def test_journal_path_quotes_user_ids_and_hashes_long_ones(tmp_path):
    assert journal_path(tmp_path, "a/b c").name == "a%2Fb%20c.sqlite"
    long_id = "ü" * 100  # 600 chars once quoted
    path = journal_path(tmp_path, long_id)
    assert path.name.startswith("sha256=") and len(path.name) < 100
    with Journal.open(tmp_path, long_id) as j:
        assert j.path == path
    assert list(scan(tmp_path)) == [long_id]
    with pytest.raises(ValueError):
        journal_path(tmp_path, "")


def test_pragmas_wal_and_synchronous_full_by_default(tmp_path):
    with Journal.open(tmp_path, USER) as j:
        assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert j.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert j.db.execute("PRAGMA busy_timeout").fetchone()[0] > 0
    with Journal.open(tmp_path, USER, synchronous="NORMAL") as j:
        assert j.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    with pytest.raises(ValueError):
        Journal.open(tmp_path, USER, synchronous="OFF")


def _schema_of(db) -> list[tuple]:
    return db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()


def test_a_new_journal_is_what_creating_its_schema_with_sql_makes(tmp_path):
    # A new journal is written from an image (journal_schema.new_journal_image); an
    # empty file, as an older smsd killed right after creating it left one, gets the
    # schema from SCHEMA's statements.  Both must be the same journal.
    empty = journal_path(tmp_path / "b", "bob")
    empty.parent.mkdir(parents=True)
    empty.touch()
    with Journal.open(tmp_path / "a", "alice") as a, Journal.open(tmp_path / "b", "bob") as b:
        assert _schema_of(a.db) == _schema_of(b.db) and len(_schema_of(a.db)) > 10
        for j, user in ((a, "alice"), (b, "bob")):
            assert j.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert j.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert j.meta("user_id") == user and j.meta("schema_version") == str(SCHEMA_VERSION)
            assert j.meta("created_at")
        for j, key in ((a, "a"), (b, "b")):
            answer(j, begin(j, [key]), [key])
    with Journal.open(tmp_path / "a", "alice") as a:   # and it reopens as a journal of alice's
        assert [ans.items[0][0] for ans in a.unflushed()] == ["a"]
    assert list(scan(tmp_path / "a")) == ["alice"]


def test_a_new_journal_left_half_written_by_a_kill_is_written_again_whole(tmp_path):
    path = journal_path(tmp_path, USER)
    path.parent.mkdir(parents=True)
    # The image goes to {path}.new and is renamed into place once fsynced: a kill
    # during the write leaves a partial .new and no journal.
    Path(f"{path}.new").write_bytes(b"SQLite format 3\x00" + b"\x00" * 100)
    with Journal.open(tmp_path, USER) as j:
        answer(j, begin(j, ["a"]), ["a"])
    assert not Path(f"{path}.new").exists()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with Journal.open(tmp_path, USER) as j:
        assert len(j.unflushed()) == 1


def test_journals_being_created_survive_random_sigkills(tmp_path):
    # A child creates journal after journal (each written from the image, renamed into
    # place) and is SIGKILLed at a random moment, five times: every journal it left
    # opens as its user's, and every user whose journal is missing gets a new one.
    import random
    for round_ in range(5):
        proc = child(f"""
            print("ready", flush=True)
            for i in range(100000):
                Journal.open(state_dir, f"k{round_}-{{i}}").close()
        """, tmp_path)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(random.uniform(0.05, 0.4))
        proc.kill()
        proc.wait(10)
    names = [p.name for p in (tmp_path / "journal").glob("*.sqlite")]
    assert len(names) > 5
    for name in names:
        user = name[:-len(".sqlite")]
        with Journal.open(tmp_path, user) as j:
            assert j.meta("user_id") == user
            answer(j, begin(j, ["a"]), ["a"])
    assert sorted(scan(tmp_path)) == sorted(n[:-len(".sqlite")] for n in names)


def test_the_journal_db_example_runs():
    import doctest
    from smsd import journal_schema
    result = doctest.testmod(journal_schema)
    assert result.attempted >= 3 and result.failed == 0


def test_journal_with_a_newer_schema_version_is_refused(tmp_path):
    with Journal.open(tmp_path, USER) as j:
        j.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'",
                     [str(SCHEMA_VERSION + 1)])
    with pytest.raises(JournalError, match="newer"):
        Journal.open(tmp_path, USER)
    with pytest.raises(JournalError):  # the failed open released the lock
        Journal.open(tmp_path, USER)


def test_journal_of_another_user_is_refused(tmp_path):
    Journal.open(tmp_path, "alice").close()
    os.rename(journal_path(tmp_path, "alice"), journal_path(tmp_path, "bob"))
    with pytest.raises(JournalError, match="alice"):
        Journal.open(tmp_path, "bob")


def test_corrupt_file_raises_journal_error_naming_the_path(tmp_path):
    path = journal_path(tmp_path, USER)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage, not sqlite " * 500)
    with pytest.raises(JournalError) as e:
        Journal.open(tmp_path, USER)
    assert str(path) in str(e.value)
    with pytest.raises(JournalError):  # not JournalLocked: the lock was released
        Journal.open(tmp_path, USER)


def test_journal_of_schema_1_is_upgraded_in_place_and_keeps_its_rows(tmp_path):
    with Journal.open(tmp_path, USER) as j:
        call = j.begin_call([(sms_key("a"), "a")], owner="", epoch=0, model="m")
        # Make it a schema-1 file: no committed_at column (v2), no bill (v3), version 1.
        j.db.execute("ALTER TABLE calls DROP COLUMN committed_at")
        for table, column in (("calls", "cached_tokens"), ("calls", "cost_usd"), ("calls", "repeated_usd"),
                              ("call_sms", "wire_id"), ("call_sms", "text_hash")):
            j.db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        j.db.execute("DROP TABLE ledger")
        j.db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with Journal.open(tmp_path, USER) as j:
        assert j.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] \
            == str(SCHEMA_VERSION)
        before = time.time()
        j.record_answer(call, [("a", SmsResult(key=sms_key("a"), kind="other"))], failed={},
                        request_id="req_1", usage=Usage())
        committed = j.db.execute("SELECT committed_at, answered_at FROM calls").fetchone()
        assert before <= committed[1] <= committed[0] <= time.time()
