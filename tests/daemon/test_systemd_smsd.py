"""The real ``smsd run`` under a real systemd, with the shipped unit.

A container boots systemd with ``systemd-nspawn`` (tests/nspawn.py); the
MongoDB-wire server and the local LLM server run on the host's loopback,
which the container shares.  The drop-in only adapts paths and user to the
container (ExecStart to the project's venv, the base interpreter bound in,
loopback URLs); every directive under test comes from systemd/smsd.service.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from smsd.lab.invariants import verify
from tests.harness import seed
from tests.nspawn import booted_container, python_binds, service_dropin

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "smsd.service"
SMSD = f"{sys.prefix}/bin/smsd"
SMSCTL = f"{sys.prefix}/bin/smsctl"
DB = "smsd_systemd"


@pytest.fixture(scope="module")
def container(pytestconfig):
    c = booted_container(pytestconfig, python_binds(ROOT))
    try:
        c.add_user("smsd")
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def llm():
    from tests.fixtures_llm import LlmServerProcess
    server = LlmServerProcess(latency_ms=150).start()
    yield server
    server.stop()


@pytest.fixture
def smsd_service(container, mongo_server, llm):
    """Install the unit with the container drop-in and a config; yields the db."""
    c = container
    client = MongoClient(mongo_server.uri)
    client.drop_database(DB)
    config = ('[supervisor]\ndiscovery_interval = 1.0\ndrain_timeout = 20.0\nrestart_backoff = 0.2\n'
              'socket_group = "smsd"\n[llm]\nbatch_size = 5\nconcurrency = 2\nbackoff_base = 0.05\n'
              'backoff_max = 0.5\n')
    c.write_file("/etc/smsd/config.toml", config, mode=0o640, owner="root:smsd")
    env = {"SMSD_MONGO_URI": mongo_server.uri, "SMSD_MONGO_DB": DB, "SMSD_LLM_BASE_URL": llm.url,
           "SMSD_LLM_MODEL": "smsd-test", "SMSD_CONFIG": "/etc/smsd/config.toml"}
    c.install_unit("smsd.service", UNIT.read_text(),
                   {"50-container.conf": service_dropin(exec_start=f"{SMSD} run", environment=env,
                                                         readable_paths=python_binds(ROOT))})
    llm.reset(faults=True)
    yield c, client[DB]
    c.systemctl("stop", "smsd.service", check=False, timeout=90)
    c.run(["rm", "-rf", "/etc/systemd/system/smsd.service.d/90-failpoint.conf", "/var/lib/smsd"],
          check=False)
    c.systemctl("daemon-reload", check=False)
    c.systemctl("reset-failed", "smsd.service", check=False)
    client.close()


def _restarts(c):
    return int(c.show("smsd.service", "NRestarts") or 0)


def _wait_idle(c, users=()):
    """Until no worker has a turn (pre-forked workers may stay up, idle).

    With ``users``: also until the supervisor knows each of them with no unflushed
    journal rows -- a restarted supervisor is idle before its first discovery has
    found the answers a killed worker journaled and stored but did not mark.
    """
    def idle():
        st = json.loads(c.run([SMSCTL, "--socket", "/run/smsd/control.sock", "status", "--json"]).stdout)
        rows = {u["user_id"]: u for u in st.get("users") or []}
        return not st["workers"] and all(u in rows and not rows[u].get("unflushed") for u in users)
    c.wait_for(idle, timeout=60 if users else 30, what="idle")


def _state_dir(c, tmp_path):
    """A host copy of the service's StateDirectory (journals with their WAL files).

    The container's volatile root is reachable from the host only through its
    init's mount namespace, where SQLite cannot open files itself; copied
    while the service is idle, the journals are a consistent snapshot.
    """
    import shutil
    copy = tmp_path / "state-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(f"/proc/{c.init_pid}/root/var/lib/smsd", copy)
    return copy


def test_start_waits_for_ready_and_smsctl_answers(smsd_service):
    c, db = smsd_service
    seed(db, "s1", 10)
    started = time.monotonic()
    c.systemctl("start", "smsd.service")          # returns once READY=1 arrived
    print(f"systemctl start returned after {time.monotonic() - started:.1f} s")
    assert c.show("smsd.service", "ActiveState") == "active"
    assert "workers" in c.show("smsd.service", "StatusText")
    out = c.run([SMSCTL, "--socket", "/run/smsd/control.sock", "status", "--json"])
    status = json.loads(out.stdout)
    assert status["ok"] is True and status["pid"] == int(c.show("smsd.service", "MainPID"))
    c.wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 10, timeout=60,
               what="all processed")


def test_sigkilled_main_pid_is_restarted_and_the_job_completes(smsd_service, llm, tmp_path):
    c, db = smsd_service
    expected = {}
    for user in ("k1", "k2"):
        expected.update(seed(db, user, 40))
    c.systemctl("start", "smsd.service")
    c.wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) >= 10, timeout=60,
               what="progress")
    main = c.show("smsd.service", "MainPID")
    c.run(["kill", "-KILL", main])
    c.wait_for(lambda: _restarts(c) == 1, timeout=30, what="restart by systemd")
    c.wait_prop("smsd.service", "ActiveState", "active", timeout=30)
    c.wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 80, timeout=120,
               what="all processed after the restart")
    _wait_idle(c, users=("k1", "k2"))
    assert _restarts(c) == 1
    report = verify(db, expected, state_dir=_state_dir(c, tmp_path), billed=llm.stats()["billed"])
    assert report.ok, report.to_dict()


def test_watchdog_kills_and_restarts_a_supervisor_that_stops_pinging(smsd_service):
    c, db = smsd_service
    c.write_file("/etc/systemd/system/smsd.service.d/90-failpoint.conf",
                 "[Service]\nEnvironment=SMSD_FAILPOINT=supervisor_no_watchdog\n")
    c.systemctl("daemon-reload")
    c.systemctl("start", "smsd.service")
    # WatchdogSec=30 as shipped: systemd kills the silent supervisor and restarts it.
    c.wait_for(lambda: _restarts(c) >= 1, timeout=75, interval=1.0, what="watchdog restart")
    log = c.journal("smsd.service")
    assert "Watchdog timeout" in log or "watchdog timeout" in log.lower()


def test_systemctl_stop_drains_and_exits_cleanly(smsd_service, llm, tmp_path):
    c, db = smsd_service
    expected = seed(db, "d1", 40)
    llm.set_faults(latency_ms=1200)
    c.systemctl("start", "smsd.service")
    c.wait_for(lambda: llm.stats()["calls"] >= 1, timeout=30, what="a call in flight")
    c.systemctl("stop", "smsd.service", timeout=90)
    assert c.show("smsd.service", "Result") == "success"
    assert c.show("smsd.service", "ExecMainStatus") == "0"
    assert "draining" in c.journal("smsd.service")
    from smsd import journal as journal_mod
    scanned = journal_mod.scan(_state_dir(c, tmp_path))
    assert scanned and all(s["sent_calls"] == 0 and s["unflushed"] == 0 for s in scanned.values()), scanned
    llm.set_faults(latency_ms=0)
    c.systemctl("start", "smsd.service")
    c.wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 40, timeout=60,
               what="finished after the restart")
    # The last flush sets isprocessed before it marks its journal rows flushed: copy the
    # journals once the turn is over, or the copy can catch that flush half-way.
    _wait_idle(c)
    report = verify(db, expected, state_dir=_state_dir(c, tmp_path), billed=llm.stats()["billed"])
    assert report.ok and report.sms_asked_more_than_once == 0, report.to_dict()
