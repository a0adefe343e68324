"""`smsd run --daemon` for hosts without systemd: a real double-forked
daemon (python-daemon) with a locked pidfile, run as a subprocess."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from smsd.daemonize import PidFile, PidfileLocked, pid_alive, running_under_systemd

ROOT = Path(__file__).resolve().parents[2]

# Becomes a daemon, logs through a FileHandler (whose stream must survive
# the descriptor cleanup), writes to stdout/stderr (redirected to the log
# file), and runs until STOP exists or SIGTERM arrives.
SCRIPT = textwrap.dedent('''
    import logging, os, sys, time
    from pathlib import Path
    from smsd.daemonize import daemonize
    pidfile, logfile, stop = map(Path, sys.argv[1:4])
    handler = logging.FileHandler(logfile)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    with daemonize(pidfile, logfile, files_preserve=[handler.stream]):
        logging.getLogger("smsd.test").info("daemon up pid=%d ppid=%d sid=%d",
                                            os.getpid(), os.getppid(), os.getsid(0))
        print("stdout reaches the log", flush=True)
        sys.stderr.write("stderr reaches the log\\n")
        sys.stderr.flush()
        while not stop.exists():
            time.sleep(0.05)
        logging.getLogger("smsd.test").info("daemon exiting")
''')


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("INVOCATION_ID", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def _wait(predicate, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Daemons:
    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.script = tmp_path / "daemon_script.py"
        self.script.write_text(SCRIPT)
        self.pidfile = tmp_path / "run" / "smsd.pid"
        self.log = tmp_path / "smsd.log"
        self.stop_flag = tmp_path / "stop"
        self.pids: list[int] = []

    def launch(self, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(self.script), str(self.pidfile), str(self.log), str(self.stop_flag)],
            capture_output=True, text=True, timeout=30, env=env or _env(),
        )

    def start(self) -> int:
        r = self.launch()
        assert r.returncode == 0, r.stderr
        pid = _wait(lambda: PidFile(self.pidfile).read_pid(), what="the pidfile")
        self.pids.append(pid)
        _wait(lambda: "daemon up" in self.log_text(), what="the daemon's log line")
        return pid

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def cleanup(self) -> None:
        self.stop_flag.touch()
        for pid in self.pids:
            try:
                _wait(lambda: not pid_alive(pid), timeout=5, what="exit")
            except AssertionError:
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemons(tmp_path):
    d = Daemons(tmp_path)
    yield d
    d.cleanup()


def test_daemon_detaches_writes_pidfile_and_logs(daemons):
    pid = daemons.start()
    assert pid_alive(pid)
    assert os.getsid(pid) != os.getsid(0)  # its own session, no terminal
    assert PidFile(daemons.pidfile).is_locked()
    assert (daemons.pidfile.stat().st_mode & 0o777) == 0o644
    log = daemons.log_text()
    assert f"daemon up pid={pid}" in log
    assert "stdout reaches the log" in log
    assert "stderr reaches the log" in log
    daemons.stop_flag.touch()
    _wait(lambda: not pid_alive(pid), what="the daemon to exit")
    assert not daemons.pidfile.exists()
    assert "daemon exiting" in daemons.log_text()


def test_second_start_is_refused_while_the_first_runs(daemons):
    pid = daemons.start()
    r = daemons.launch()
    assert r.returncode == 1
    assert f"smsd already running with pid {pid}" in r.stderr
    assert pid_alive(pid)
    assert PidFile(daemons.pidfile).read_pid() == pid
    assert daemons.log_text().count("daemon up") == 1


def test_live_process_in_an_unlocked_pidfile_is_refused(daemons, tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        daemons.pidfile.parent.mkdir(parents=True, exist_ok=True)
        daemons.pidfile.write_text(f"{other.pid}\n")
        r = daemons.launch()
        assert r.returncode == 1
        assert f"smsd already running with pid {other.pid}" in r.stderr
        assert daemons.pidfile.read_text().strip() == str(other.pid)
    finally:
        other.kill()
        other.wait()


def test_stale_pidfile_of_a_dead_process_is_taken_over(daemons):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert not pid_alive(dead.pid)
    daemons.pidfile.parent.mkdir(parents=True, exist_ok=True)
    daemons.pidfile.write_text(f"{dead.pid}\n")
    pid = daemons.start()
    assert pid != dead.pid
    assert PidFile(daemons.pidfile).read_pid() == pid
    assert f"removing stale pidfile {daemons.pidfile} (pid {dead.pid} is not running)" in daemons.log_text()


def test_sigterm_stops_the_daemon_and_removes_the_pidfile(daemons):
    pid = daemons.start()
    os.kill(pid, signal.SIGTERM)
    _wait(lambda: not pid_alive(pid), what="the daemon to exit")
    assert not daemons.pidfile.exists()


def test_under_systemd_daemonize_does_not_fork(daemons):
    script = daemons.tmp / "under_systemd.py"
    script.write_text(textwrap.dedent('''
        import logging, os, sys
        from smsd.daemonize import daemonize
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        before = os.getpid()
        with daemonize(sys.argv[1], sys.argv[2]):
            print("same pid" if os.getpid() == before else "forked", flush=True)
    '''))
    r = subprocess.run(
        [sys.executable, str(script), str(daemons.pidfile), str(daemons.log)],
        capture_output=True, text=True, timeout=30, env=_env(INVOCATION_ID="0123456789abcdef"),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "same pid"
    assert "--daemon ignored: running under systemd" in r.stderr
    assert not daemons.pidfile.exists()
    assert not daemons.log.exists()


def test_running_under_systemd_detection():
    assert running_under_systemd({"INVOCATION_ID": "abc"})
    assert running_under_systemd({"NOTIFY_SOCKET": "/run/systemd/notify"})
    expected = os.getppid() == 1 and os.path.isdir("/run/systemd/system")
    assert running_under_systemd({}) is expected


def test_pidfile_check_refuses_a_locked_pidfile_in_process(tmp_path):
    pf = PidFile(tmp_path / "x.pid")
    pf.acquire()
    try:
        with pytest.raises(PidfileLocked) as err:
            PidFile(tmp_path / "x.pid").check()
        assert err.value.pid == os.getpid()
        assert isinstance(err.value, SystemExit)
    finally:
        pf.release()
    assert not (tmp_path / "x.pid").exists()
