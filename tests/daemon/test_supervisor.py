"""``smsd run``: the supervisor, its workers, signals, restarts, sd_notify, the shared rate limit."""
from __future__ import annotations

import os
import signal
import socket
import struct
import time

import psutil

from smsd.lab.invariants import verify

from ..harness import Daemon, seed, wait_for, write_config


def processed(db):
    return db.sms_fin_rawdata.count_documents({"isprocessed": True})


def _config(tmp_path, mongo_server, db_name, llm_server, **sections):
    return write_config(tmp_path, mongo_uri=mongo_server.uri, db=db_name, llm_url=llm_server.url, **sections)


def test_supervisor_runs_every_user_and_status_has_the_contract_keys(tmp_path, db, mongo_server,
                                                                      mongo_db_name, llm_server):
    expected = {}
    for user in ("ann", "ben", "cat"):
        expected.update(seed(db, user, 20))
    # The three users share their texts: with the answer cache, an SMS held back for its
    # twin's call may be asked in a call of its own, so the call count would depend on timing.
    d = Daemon(_config(tmp_path, mongo_server, mongo_db_name, llm_server, llm={"answer_cache": False}),
               tmp_path)
    try:
        wait_for(lambda: processed(db) == 60, what="all processed")
        st = wait_for(lambda: (lambda s: s if all(u["status"] == "completed" for u in s["users"])
                               and len(s["users"]) == 3 else None)(d.status()), what="status completed")
        assert st["ok"] is True and st["protocol"] == 1 and isinstance(st["pid"], int)
        for key in ("pid", "workers", "users", "journal", "llm"):
            assert key in st
        assert set(st["llm"]) >= {"calls", "repeated_calls", "prompt_tokens", "completion_tokens"}
        assert st["llm"]["calls"] == 12 and st["llm"]["repeated_calls"] == 0
        assert {u["user_id"] for u in st["users"]} == {"ann", "ben", "cat"}
        assert all(u["total_sms"] == 20 and u["processed_sms"] == 20 for u in st["users"])
        assert st["journal"]["unflushed"] == 0
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    # SMS bodies are PII: they never reach the log.
    assert not any(line["text"][:30] in out for line in _some_fixture_texts())


def _some_fixture_texts():
    from ..harness import fixture_lines
    return fixture_lines()[:20]


def test_killed_worker_is_replaced_and_its_user_finishes(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    expected = {}
    for user in ("dan", "eve"):
        expected.update(seed(db, user, 60))
    # Slow answers, so that the victim's user still has work when it is killed (answers
    # gather into page flushes: with fast ones a user can be stored whole before the kill).
    llm_server.set_faults(latency_ms=400)
    d = Daemon(_config(tmp_path, mongo_server, mongo_db_name, llm_server), tmp_path)
    try:
        pids = wait_for(d.worker_pids, what="workers")
        wait_for(lambda: processed(db) >= 10, what="some progress")
        victim, user = next(iter(pids.items()))
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(u == user and p != victim for p, u in d.worker_pids().items()),
                 what="replacement worker", interval=0.02)
        replaced_in = time.monotonic() - killed_at
        print(f"worker replaced in {replaced_in:.2f} s")
        wait_for(lambda: processed(db) == 120, timeout=90, what="all processed")
        st = d.status()
        assert next(u for u in st["users"] if u["user_id"] == user)["restarts"] >= 1
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()


def test_killed_supervisor_takes_its_workers_down_and_a_new_one_finishes(tmp_path, db, mongo_server,
                                                                         mongo_db_name, llm_server):
    expected = {}
    for user in ("fin", "gil", "hob"):
        expected.update(seed(db, user, 50))
    # Slow answers, so that the kill lands mid-run (answers gather into page flushes:
    # with fast ones the whole run can be stored within one discovery interval).
    llm_server.set_faults(latency_ms=400)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server)
    d = Daemon(config, tmp_path)
    pids = wait_for(d.worker_pids, what="workers")
    wait_for(lambda: processed(db) >= 10, what="some progress")
    pids.update(d.worker_pids())
    d.proc.send_signal(signal.SIGKILL)
    d.proc.communicate(timeout=10)
    killed_at = time.monotonic()
    wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=5, what="orphans gone", interval=0.05)
    print(f"workers gone {time.monotonic() - killed_at:.2f} s after the supervisor")
    d2 = Daemon(config, tmp_path)

    def finished():
        # Every SMS stored, and the answers the killed workers had journaled but not
        # marked flushed are replayed by the new supervisor's workers.
        report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
        return report if processed(db) == 150 and not report.unflushed_left else None
    try:
        report = wait_for(finished, timeout=90, what="all processed and every journal flushed")
    finally:
        code, out = d2.stop()
    assert code == 0, out[-3000:]
    assert report.ok, report.to_dict()


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_sigterm_drains_calls_in_flight_then_exits_zero(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    expected = {}
    for user in ("ida", "jon"):
        expected.update(seed(db, user, 40))
    llm_server.set_faults(latency_ms=1500)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server)
    d = Daemon(config, tmp_path)
    wait_for(lambda: llm_server.stats()["calls"] >= 2, what="calls in flight")
    started = time.monotonic()
    code, out = d.stop(signal.SIGTERM)
    assert code == 0, out[-3000:]
    assert time.monotonic() - started < 15
    assert "draining" in out
    from smsd import journal as journal_mod
    scanned = journal_mod.scan(tmp_path / "state")
    # Every call in flight at SIGTERM was answered, committed and flushed: nothing left half-done.
    assert all(s["sent_calls"] == 0 and s["unflushed"] == 0 for s in scanned.values()), scanned
    assert processed(db) >= 2 * 5
    llm_server.set_faults(latency_ms=0)
    d2 = Daemon(config, tmp_path)
    try:
        wait_for(lambda: processed(db) == 80, timeout=90, what="all processed")
    finally:
        d2.stop()
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok and report.sms_asked_more_than_once == 0, report.to_dict()


def test_sigterm_while_a_worker_is_being_forked_drains_that_worker_too(tmp_path, db, mongo_server,
                                                                       mongo_db_name, llm_server):
    # The failpoint holds a new worker for a while before it installs its own signal
    # handlers: the drain's SIGTERM lands in that window, where the supervisor's inherited
    # handler would swallow it and the worker would go on to ask the LLM for its user.
    seed(db, "kim", 40)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server)
    d = Daemon(config, tmp_path, SMSD_FAILPOINT="worker_forked:pause=5")
    wait_for(lambda: "kim" in d.worker_pids().values(), what="kim's turn handed to a new worker")
    code, out = d.stop(signal.SIGTERM)
    assert code == 0, out[-3000:]
    assert "draining" in out
    assert llm_server.stats()["calls"] == 0, "the worker ignored the drain"
    assert processed(db) == 0


def test_sighup_reloads_config_and_a_bad_one_is_refused(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server, supervisor={"max_workers": 3})
    d = Daemon(config, tmp_path)
    try:
        assert d.status()["max_workers"] == 3
        text = config.read_text().replace("max_workers = 3", "max_workers = 1")
        config.write_text(text)
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: d.status()["max_workers"] == 1, what="reload")
        config.write_text(text.replace("max_workers = 1", 'max_workers = "many"'))
        d.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert d.status()["max_workers"] == 1      # kept the running settings
    finally:
        code, out = d.stop()
    assert code == 0
    assert "reload refused" in out and "supervisor.max_workers" in out


def test_crash_loop_marks_user_failed_until_resumed(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "kim", 5)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server,
                     supervisor={"crash_loop_count": 3, "restart_backoff": 0.1})
    d = Daemon(config, tmp_path, SMSD_FAILPOINT="before_llm_call")
    try:
        st = wait_for(lambda: (lambda s: s if s["users"] and s["users"][0]["status"] == "failed" else None)(
            d.status()), timeout=40, what="user failed")
        assert st["users"][0]["restarts"] >= 3
        assert d.worker_pids() == {}
        assert d.cmd("resume", user_id="kim")["resumed"] == ["kim"]
        wait_for(lambda: d.status()["users"][0]["status"] != "failed" or d.worker_pids(), what="resumed")
    finally:
        d.stop()


def test_hung_worker_is_killed_and_restarted(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "lea", 5)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server,
                     supervisor={"worker_timeout": 2.0, "restart_backoff": 0.1})
    d = Daemon(config, tmp_path, SMSD_FAILPOINT="before_claim:hang")
    try:
        first = wait_for(d.worker_pids, what="worker")
        wait_for(lambda: not _alive(next(iter(first))), timeout=15, what="hung worker killed")
        st = wait_for(lambda: (lambda s: s if s["users"] and s["users"][0]["restarts"] >= 1 else None)(
            d.status()), what="restart counted")
        assert "hung" in (st["users"][0]["last_exit"] or "")
    finally:
        d.stop(timeout=30)


def test_sd_notify_ready_watchdog_stopping_in_order_from_the_supervisor_only(tmp_path, db, mongo_server,
                                                                             mongo_db_name, llm_server):
    seed(db, "max", 10)
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(0.2)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server)
    d = Daemon(config, tmp_path, NOTIFY_SOCKET=str(path), WATCHDOG_USEC="600000")
    messages = []

    def drain_socket(seconds):
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except socket.timeout:
                continue
            pid = None
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            messages.append((pid, data.decode()))

    try:
        drain_socket(3.0)
        d.proc.send_signal(signal.SIGTERM)
        drain_socket(2.0)
    finally:
        d.stop()
        sock.close()
    texts = [m for _, m in messages]
    ready = next(i for i, m in enumerate(texts) if "READY=1" in m)
    stopping = next(i for i, m in enumerate(texts) if "STOPPING=1" in m)
    assert ready < stopping
    assert sum("WATCHDOG=1" in m for m in texts[ready:stopping]) >= 3   # every 0.3 s
    assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in texts)
    assert {pid for pid, _ in messages} == {d.proc.pid}   # workers never notify


def test_shared_rate_limit_holds_across_workers(tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server(rpm_limit=200)
    for user in ("n1", "n2", "n3", "n4"):
        seed(db, user, 60)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                          llm={"requests_per_minute": 180.0, "batch_size": 2},
                          supervisor={"max_workers": 4})
    d = Daemon(config, tmp_path)
    try:
        time.sleep(8.0)
    finally:
        d.stop()
    stats = server.stats()
    # The limiter's promise is about when requests may go: each request names the slot the
    # host-wide limiter gave it (smsd's lab header) and the server records it with the
    # request's arrival, on the host's one monotonic clock.  Arrival times themselves are
    # those slots plus the client's and the server's scheduling delays, which a loaded host
    # stretches and squeezes (a late request and an on-time one arrive together), so they
    # cannot show a 1-second spacing; the slots can, and the arrivals show no request went early.
    slots = sorted(s["slot"] for s in stats["slots"])
    assert len(slots) == stats["calls"] >= 10
    assert all(s["arrived"] >= s["slot"] for s in stats["slots"]), "a request went before its slot"
    # Steady state: no more than 3 calls/s (+1 at a window's edge) in any 1-second window ...
    worst = max(sum(1 for t in slots if start <= t < start + 1.0) for start in slots)
    rate = (len(slots) - 1) / (slots[-1] - slots[0])
    arrivals = sorted(s["arrived"] for s in stats["slots"])
    squeezed = max(sum(1 for t in arrivals if start <= t < start + 1.0) for start in arrivals)
    delays = [s["arrived"] - s["slot"] for s in stats["slots"]]
    print(f"4 workers under a 3/s limit: {rate:.2f} calls/s, worst 1-s window {worst} "
          f"(of arrivals: {squeezed}; slot to arrival {min(delays):.3f}..{max(delays):.3f} s)")
    assert worst <= 4
    assert rate <= 3.3
    # ... and the server's own limit (a sliding minute of arrivals) never refused one.
    assert stats["rejected_429"] == 0


def test_a_429_slows_every_worker_not_only_the_one_that_got_it(tmp_path, db, mongo_server, mongo_db_name,
                                                               make_llm_server):
    server = make_llm_server(latency_ms=30, retry_after_s=2)
    for user in ("o1", "o2", "o3"):
        seed(db, user, 80)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                          llm={"requests_per_minute": 6000.0, "batch_size": 2},
                          supervisor={"max_workers": 3})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: server.stats()["calls"] >= 10, what="calls flowing")
        server.script(["429"])
        wait_for(lambda: server.stats()["faults"].get("429"), what="the 429", interval=0.02)
        time.sleep(2.5)
    finally:
        d.stop()
    stats = server.stats()
    times = sorted(stats["call_times"])
    # The 429 is the first call after the script was set; find it as the call followed by the longest gap.
    gaps = [(b - a, a) for a, b in zip(times, times[1:])]
    longest, at = max(gaps)
    print(f"longest pause after the 429: {longest:.2f} s")
    assert longest >= 1.5, "a 429 with Retry-After: 2 must pause every worker on the host"


def test_worker_over_its_rss_limit_is_recycled_and_its_user_still_finishes(tmp_path, db, mongo_server,
                                                                          mongo_db_name, llm_server):
    expected = seed(db, "rex", 30)
    llm_server.set_faults(latency_ms=200)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server,
                     supervisor={"worker_rss_limit_mb": 1})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: processed(db) == 30, timeout=90, what="all processed despite recycling")
        st = d.status()
    finally:
        code, out = d.stop()
    assert "RSS" in out and "recycling" in out
    assert code == 0
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok and report.sms_asked_more_than_once == 0, report.to_dict()
    assert st["users"][0]["restarts"] == 0     # a recycle is not a crash


def test_a_big_user_does_not_starve_a_small_one(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "big", 300)
    llm_server.set_faults(latency_ms=20)
    config = _config(tmp_path, mongo_server, mongo_db_name, llm_server,
                     supervisor={"max_workers": 1}, pipeline={"worker_max_sms": 20})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"user_id": "big", "isprocessed": True}) >= 20,
                 what="big started")
        seed(db, "small", 10)
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"user_id": "small", "isprocessed": True}) == 10,
                 timeout=60, what="small finished")
        big_left = db.sms_fin_rawdata.count_documents({"user_id": "big", "isprocessed": False})
    finally:
        d.stop()
    print(f"small user done while the big one still had {big_left} of 300 pending")
    assert big_left > 150
