"""``smsd run --daemon --pidfile P``: the classic daemon for hosts without systemd."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
from pymongo import MongoClient

from smsd import control_protocol as control

from ..harness import REPO, seed, smsd_env, wait_for, write_config


def test_daemon_mode_detaches_serves_smsctl_refuses_a_second_start_and_stops_on_sigterm(
        tmp_path, mongo_server, mongo_db_name, llm_server):
    db = MongoClient(mongo_server.uri)[mongo_db_name]
    seed(db, "zed", 12)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    pidfile, log = tmp_path / "smsd.pid", tmp_path / "smsd.log"
    argv = [sys.executable, "-m", "smsd.cli", "run", "--daemon", "--pidfile", str(pidfile), "--log-file", str(log)]
    env = smsd_env(config)
    env.pop("INVOCATION_ID", None)
    env.pop("NOTIFY_SOCKET", None)
    first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, cwd=str(REPO))
    assert first.returncode == 0, first.stderr    # the foreground process returns once detached
    pid = wait_for(lambda: pidfile.is_file() and pidfile.read_text().strip() and int(pidfile.read_text()),
                   what="pidfile")
    try:
        proc = psutil.Process(pid)
        assert proc.ppid() == 1 or proc.ppid() != os.getpid()     # detached from us
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 12, what="processed")
        st = control.request(str(tmp_path / "run" / "control.sock"), "status", {}, timeout=5)
        assert st["pid"] == pid
        second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30, cwd=str(REPO))
        assert second.returncode != 0
        assert f"already running with pid {pid}" in (second.stderr + second.stdout)
        assert "supervisor" in log.read_text()        # logging went to the file, kept open
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             timeout=30, what="daemon stopped")
    wait_for(lambda: not pidfile.exists(), timeout=10, what="pidfile removed")
    assert "stopped" in log.read_text()
