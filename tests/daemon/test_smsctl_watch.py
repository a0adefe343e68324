"""``smsctl status --watch``: refreshed blocks with SMS/s and an ETA; in place on a terminal; Ctrl-C exits 0."""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

from smsd.ctl_watch import CLEAR_HOME, Rate

from ..harness import REPO, Daemon, seed, wait_for, write_config


def test_rate_is_the_growth_over_the_last_minute_and_eta_follows_it():
    rate = Rate(window=60)
    assert rate.per_second() is None and rate.eta_s(10) is None
    rate.add(0.0, 0)
    rate.add(10.0, 50)
    assert rate.per_second() == 5.0 and rate.eta_s(100) == 20.0
    rate.add(70.0, 50)            # no progress for a minute: the old samples fall out
    rate.add(80.0, 50)
    assert rate.per_second() == 0.0 and rate.eta_s(100) is None
    assert rate.eta_s(0) == 0.0
    rate.add(90.0, 10)            # the count went down (a new daemon): start afresh
    assert rate.per_second() is None


def _smsctl(sock, *args: str, **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSD_")}
    return subprocess.Popen([sys.executable, "-m", "smsd.ctl", "--socket", str(sock), *args],
                            env=env, cwd=str(REPO), **kw)


def test_watch_shows_progress_and_eta_and_ctrl_c_exits_zero(tmp_path, db, mongo_server, mongo_db_name,
                                                            make_llm_server):
    server = make_llm_server(latency_ms=150)
    seed(db, "wes", 80)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                          llm={"concurrency": 1, "batch_size": 2})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) >= 4, what="progress")
        proc = _smsctl(d.sock, "status", "--watch", "0.4", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
        time.sleep(4.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert CLEAR_HOME not in out            # not a terminal: plain blocks, one after another
        blocks = out.count("USERS (")
        assert blocks >= 5, out
        rates = [float(x) for x in re.findall(r"rate ([\d.]+) SMS/s \(last 60 s\)", out)]
        assert rates and max(rates) > 0, out
        etas = re.findall(r"pending (\d+)  ETA (\S+)", out)
        assert any(int(p) > 0 and eta != "-" for p, eta in etas), etas

        # On a terminal: the screen is cleared and redrawn in place.
        master, slave = pty.openpty()
        proc = _smsctl(d.sock, "status", "--watch", "0.3", stdout=slave, stderr=subprocess.PIPE)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 20
        while seen.count(CLEAR_HOME.encode()) < 3 and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                seen += os.read(master, 65536)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        os.close(master)
        assert seen.count(CLEAR_HOME.encode()) >= 3
    finally:
        d.stop()


def test_watch_needs_a_positive_interval_and_a_daemon(tmp_path):
    proc = _smsctl(tmp_path / "none.sock", "status", "--watch", "0", stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 2 and "positive" in err
