"""The control socket and smsctl, end to end: a real ControlServer, the real smsctl."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from smsd import control_protocol as control, ctl
from smsd.control import ControlServer
from smsd.control_protocol import CommandError, Peer, UnknownCommand

SMSCTL = Path(sys.executable).parent / "smsctl"
SMSCTL_CMD = [str(SMSCTL)] if SMSCTL.exists() else [sys.executable, "-m", "smsd.ctl"]

STATUS = {
    "pid": 4242, "version": "0.1.0", "state": "running", "uptime_s": 3725.0,
    "mongo": {"ok": True, "error": None},
    "workers": [{"user_id": "alice", "pid": 4300, "state": "running", "uptime_s": 61.0,
                 "rss_bytes": 52428800, "restarts": 1}],
    "users": [
        {"user_id": "alice", "total_sms": 1443, "processed_sms": 649, "pending_sms": 794,
         "quarantined_sms": 2, "status": "in_progress", "restarts": 1},
        {"user_id": "bob", "total_sms": 10, "processed_sms": 10, "pending_sms": 0,
         "quarantined_sms": 0, "status": "completed", "restarts": 0},
    ],
    "journal": {"unflushed": 7},
    "llm": {"calls": 120, "repeated_calls": 1, "prompt_tokens": 50000, "completion_tokens": 9000},
}
CHECKPOINT = {"user_id": "alice", "batch_id": "B", "total_sms": 1443, "processed_sms": 649,
              "last_processed_id": "X", "checkpoint_timestamp": "T", "status": "in_progress"}
SECRET = "Your OTP is 918273 do not share"


@dataclass
class Daemon:
    """A ControlServer served from a thread, with a toy handler that records calls."""

    path: Path
    server: ControlServer
    calls: list[tuple[str, dict, Peer]] = field(default_factory=list)

    def run_ctl(self, *argv: str, user: int | None = None, timeout: float = 20) -> subprocess.CompletedProcess:
        """Run the real smsctl against this daemon (as ``user``: uid = gid = user, no other groups)."""
        cmd, kwargs = SMSCTL_CMD, {}
        if user is not None:
            cmd, env = smsctl_for(user)
            kwargs = dict(user=user, group=user, extra_groups=[], cwd="/", env=env)
        return subprocess.run([*cmd, "--socket", str(self.path), *argv], capture_output=True,
                              text=True, timeout=timeout, **kwargs)


_AS_USER: dict[int, tuple[list[str], dict[str, str]]] = {}


def smsctl_for(user: int) -> tuple[list[str], dict[str, str]]:
    """An smsctl command line that ``user`` can execute.

    The venv's interpreter may live under a directory only root can enter
    (e.g. pyenv in /root); then fall back to the system python3 with the
    source tree on PYTHONPATH (smsd.ctl needs only the standard library).
    """
    if user in _AS_USER:
        return _AS_USER[user]
    repo = str(Path(__file__).resolve().parents[2])
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": repo}
    candidates = [SMSCTL_CMD, [sys.executable, "-m", "smsd.ctl"]]
    for exe in ("/usr/bin/python3", "/usr/local/bin/python3", shutil.which("python3")):
        if exe:
            candidates.append([exe, "-m", "smsd.ctl"])
    for cmd in candidates:
        try:
            probe = subprocess.run([*cmd, "--help"], user=user, group=user, extra_groups=[], cwd="/",
                                   env=env, capture_output=True, timeout=20)
        except OSError:
            continue
        if probe.returncode == 0:
            _AS_USER[user] = (cmd, env)
            return cmd, env
    pytest.skip(f"no Python interpreter that uid {user} may run")


def toy_handler(calls: list) -> Callable[[str, dict, Peer], dict]:
    def handle(cmd: str, args: dict, peer: Peer) -> dict:
        calls.append((cmd, args, peer))
        if cmd == "status":
            reply = dict(STATUS)
            if "user_id" in args:
                reply["checkpoint"] = CHECKPOINT
            return reply
        if cmd == "quarantine":
            return {"quarantine": [{"user_id": "alice", "sms_id": "s:17", "reason": "unparseable answer",
                                    "attempts": 3, "text": SECRET}]}
        if cmd == "retry" and args.get("user_id") == "nobody":
            raise CommandError("no such user: nobody")
        if cmd in ("resume", "pause", "drain", "reload", "retry"):
            return {"message": f"{cmd} accepted for {args.get('user_id', 'all users')}"}
        if cmd == "boom":
            raise RuntimeError("handler bug")
        if cmd == "slow":
            time.sleep(0.05)
            return {}
        raise UnknownCommand(cmd)
    return handle


@pytest.fixture
def base_dir() -> Iterator[Path]:
    # Short (AF_UNIX paths are limited to 107 bytes) and traversable by the
    # unprivileged user some tests run smsctl as.
    d = Path(tempfile.mkdtemp(prefix="smsd-ctl-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_daemon(base_dir: Path) -> Iterator[Callable[..., Daemon]]:
    stops: list[Callable[[], None]] = []

    def start(**kwargs: Any) -> Daemon:
        path = base_dir / f"run{len(stops)}" / "control.sock"
        calls: list = []
        kwargs.setdefault("client_timeout", 1.0)
        server = ControlServer(path, toy_handler(calls), **kwargs)
        server.start()
        stop = threading.Event()

        def loop() -> None:
            while not stop.is_set():
                server.serve_once(0.05)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(5)
            server.close()

        stops.append(halt)
        return Daemon(path, server, calls)

    yield start
    for halt in stops:
        halt()


@pytest.fixture
def daemon(start_daemon: Callable[..., Daemon]) -> Daemon:
    return start_daemon()


def raw_connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def read_line(sock: socket.socket) -> dict:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    assert buf.endswith(b"\n"), buf
    return json.loads(buf)


def read_lines(sock: socket.socket, n: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < n:
        chunk = sock.recv(65536)
        assert chunk, buf
        buf += chunk
    return [json.loads(x) for x in buf.split(b"\n")[:n]]


def assert_status_answers(d: Daemon) -> None:
    assert control.request(d.path, "status", timeout=5)["pid"] == 4242


# --------------------------------------------------------------------------- smsctl round trips

@pytest.mark.parametrize("argv, cmd, args", [
    (["status"], "status", {"limit": 50, "offset": 0}),
    (["status", "--json"], "status", {"limit": 50, "offset": 0}),
    (["status", "--limit", "5", "--offset", "10"], "status", {"limit": 5, "offset": 10}),
    (["status", "--user-id", "alice"], "status", {"user_id": "alice", "limit": 50, "offset": 0}),
    (["resume"], "resume", {}),
    (["resume", "--user-id", "alice"], "resume", {"user_id": "alice"}),
    (["pause", "--user-id", "alice"], "pause", {"user_id": "alice"}),
    (["drain"], "drain", {}),
    (["reload"], "reload", {}),
    (["quarantine"], "quarantine", {}),
    (["quarantine", "--user-id", "alice", "--json"], "quarantine", {"user_id": "alice"}),
    (["retry", "--user-id", "alice"], "retry", {"user_id": "alice"}),
])
def test_every_command_round_trips(daemon: Daemon, argv: list[str], cmd: str, args: dict) -> None:
    result = daemon.run_ctl(*argv)
    assert result.returncode == ctl.EXIT_OK, result.stderr
    assert [(c, a) for c, a, _ in daemon.calls] == [(cmd, args)]
    peer = daemon.calls[0][2]
    assert peer.uid == os.geteuid() and peer.pid > 0


def test_status_json_is_the_daemon_object(daemon: Daemon) -> None:
    out = json.loads(daemon.run_ctl("status", "--json").stdout)
    assert out["ok"] is True and out["protocol"] == control.PROTOCOL
    for key in ("pid", "workers", "users", "journal", "llm"):
        assert out[key] == STATUS[key]


def test_status_table_is_readable(daemon: Daemon) -> None:
    out = daemon.run_ctl("status", "--user-id", "alice").stdout
    assert "pid 4242" in out and "state running" in out and "uptime 1h02m" in out
    assert "mongo ok" in out and "journal backlog 7" in out and "LLM calls 120 (repeated 1)" in out
    users = out[out.index("USERS"):out.index("WORKERS")]
    assert "QUARANTINED" in users and "alice" in users and "1443" in users and "794" in users
    workers = out[out.index("WORKERS"):]
    assert "4300" in workers and "50.0" in workers  # RSS in MiB
    assert "Resume point (alice): batch B, 649/1443 processed, last id X, at T, status in_progress" in out


def test_status_table_shows_mongo_down() -> None:
    text = ctl.format_status({**STATUS, "mongo": {"ok": False, "error": "connection refused"}, "workers": []})
    assert "mongo DOWN (connection refused)" in text
    assert "WORKERS (0)\n(none)" in text


def test_quarantine_never_prints_sms_text(daemon: Daemon) -> None:
    table = daemon.run_ctl("quarantine")
    assert table.returncode == 0
    assert "s:17" in table.stdout and "unparseable answer" in table.stdout and "3" in table.stdout
    assert SECRET not in table.stdout
    as_json = daemon.run_ctl("quarantine", "--json")
    assert SECRET not in as_json.stdout
    assert json.loads(as_json.stdout)["quarantine"][0]["sms_id"] == "s:17"


def test_ok_false_exits_1_with_the_daemons_reason(daemon: Daemon) -> None:
    result = daemon.run_ctl("retry", "--user-id", "nobody")
    assert result.returncode == ctl.EXIT_FAILED
    assert "no such user: nobody" in result.stderr


def test_usage_error_exits_2(daemon: Daemon) -> None:
    assert daemon.run_ctl("pause").returncode == ctl.EXIT_USAGE  # --user-id is required
    assert daemon.run_ctl("frobnicate").returncode == ctl.EXIT_USAGE
    assert daemon.run_ctl("status", "--limit", "-1").returncode == ctl.EXIT_USAGE
    assert daemon.run_ctl("status", "--offset", "many").returncode == ctl.EXIT_USAGE


def test_no_daemon_exits_3(base_dir: Path) -> None:
    path = base_dir / "absent" / "control.sock"
    result = subprocess.run([*SMSCTL_CMD, "--socket", str(path), "status"], capture_output=True, text=True)
    assert result.returncode == ctl.EXIT_NOT_RUNNING
    assert result.stderr.strip() == f"smsd is not running (no control socket at {path})"
    # A stale socket left by a dead daemon: nothing listens on it.
    stale = base_dir / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    result = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(stale), "status", "--json"],
                            capture_output=True, text=True)
    assert result.returncode == ctl.EXIT_NOT_RUNNING, result.stderr


def test_socket_path_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctl, "_config_runtime_dir", lambda: None)
    env = {"SMSD_RUNTIME_DIR": "/a", "RUNTIME_DIRECTORY": "/b"}
    assert ctl.default_socket_path(env) == Path("/a/control.sock")
    assert ctl.default_socket_path({"RUNTIME_DIRECTORY": "/b:/c"}) == Path("/b/control.sock")
    assert ctl.default_socket_path({}) == Path("/run/smsd/control.sock")


def test_socket_path_from_environment_reaches_the_daemon(daemon: Daemon) -> None:
    env = {**os.environ, "SMSD_RUNTIME_DIR": str(daemon.path.parent)}
    result = subprocess.run([*SMSCTL_CMD, "status"], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


def test_timeout_exits_5(base_dir: Path) -> None:
    # A listener that accepts (backlog) but never answers.
    path = base_dir / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(8)
    try:
        result = subprocess.run([*SMSCTL_CMD, "-t", "0.5", "--socket", str(path), "status"],
                                capture_output=True, text=True)
    finally:
        mute.close()
    assert result.returncode == ctl.EXIT_TIMEOUT
    assert "timed out" in result.stderr


# --------------------------------------------------------------------------- robustness

def test_socket_file_and_directory_modes(daemon: Daemon) -> None:
    st = os.stat(daemon.path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE(os.stat(daemon.path.parent).st_mode) == 0o750


def test_malformed_json_leaves_the_connection_usable(daemon: Daemon) -> None:
    with raw_connect(daemon.path) as s:
        s.sendall(b"{this is not json\n")
        reply = read_line(s)
        assert reply["ok"] is False and reply["protocol"] == 1
        assert reply["error"].startswith("malformed request: ")
        s.sendall(b'[1, 2]\n{"args": {}}\n{"cmd": "status", "args": 5}\n{"cmd": "status"}\n')
        bad_type, no_cmd, bad_args, good = read_lines(s, 4)
        assert not bad_type["ok"] and not no_cmd["ok"] and "missing cmd" in no_cmd["error"]
        assert not bad_args["ok"] and "args" in bad_args["error"]
        assert good["ok"] is True and good["pid"] == 4242
    assert_status_answers(daemon)


def test_unknown_command_and_handler_crash(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    with raw_connect(daemon.path) as s:
        s.sendall(b'{"cmd": "frobnicate"}\n{"cmd": "boom"}\n{"cmd": "status"}\n')
        unknown, boom, good = read_lines(s, 3)
    assert unknown == {"ok": False, "protocol": 1, "error": "unknown command: frobnicate"}
    assert boom == {"ok": False, "protocol": 1, "error": "internal error: RuntimeError"}
    assert good["ok"] is True
    assert any("handler failed" in r.getMessage() for r in caplog.records)
    with pytest.raises(control.ControlError, match="unknown command: frobnicate"):
        control.request(daemon.path, "frobnicate")


def test_one_megabyte_line_is_refused_not_buffered(daemon: Daemon) -> None:
    with raw_connect(daemon.path) as s:
        sender = threading.Thread(target=lambda: _send_quietly(s, b"x" * (1024 * 1024) + b"\n"))
        sender.start()
        reply = read_line(s)
        sender.join(10)
        assert reply["ok"] is False and "too long" in reply["error"]
        s.settimeout(5)
        assert s.recv(100) == b""  # and the server hung up
    assert_status_answers(daemon)


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError:
        pass


def test_silent_client_is_closed_after_client_timeout(daemon: Daemon) -> None:
    t0 = time.monotonic()
    with raw_connect(daemon.path) as s:
        assert_status_answers(daemon)  # a silent client blocks nobody
        reply = read_line(s)
        assert reply == {"ok": False, "protocol": 1, "error": "timeout"}
        assert s.recv(100) == b""
    assert 0.9 <= time.monotonic() - t0 < 4
    assert_status_answers(daemon)


def test_client_that_never_reads_does_not_block_the_server(daemon: Daemon) -> None:
    with raw_connect(daemon.path) as s:
        s.setblocking(False)
        sent = 0
        payload = b'{"cmd": "status"}\n' * 2000
        deadline = time.monotonic() + 3
        # Keep pushing requests until our send buffer is full: the server's
        # replies pile up unread on its side.
        while time.monotonic() < deadline:
            try:
                sent += s.send(payload)
            except BlockingIOError:
                time.sleep(0.05)
                try:
                    sent += s.send(payload)
                except BlockingIOError:
                    break
        assert sent > 0
        for _ in range(3):
            assert_status_answers(daemon)
        assert daemon.run_ctl("status").returncode == 0


def test_pipelined_requests_and_a_last_line_without_newline(daemon: Daemon) -> None:
    with raw_connect(daemon.path) as s:
        s.sendall(b'{"cmd":"drain"}\n\n{"cmd":"status","args":{"user_id":"alice"}}')
        s.shutdown(socket.SHUT_WR)
        drain, status = read_lines(s, 2)
    assert drain["message"] == "drain accepted for all users"
    assert status["checkpoint"] == CHECKPOINT


def test_a_hundred_clients_at_once(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(max_clients=32)
    # Hold 100 connections open at once: the first 32 are served, the rest are told "busy".
    socks = [raw_connect(d.path) for _ in range(100)]
    try:
        for s in socks:
            _send_quietly(s, b'{"cmd": "status"}\n')
        replies = []
        for s in socks:
            try:
                replies.append(read_line(s))
            except (ConnectionResetError, AssertionError):
                replies.append(None)
    finally:
        for s in socks:
            s.close()
    served = [r for r in replies if r and r["ok"]]
    busy = [r for r in replies if r and not r["ok"]]
    assert len(served) == 32 and len(busy) == 68, replies
    assert all(r["error"].startswith("busy") for r in busy)
    assert_status_answers(d)

    # A hundred real clients at once (threads using the client library): all
    # eventually served, as the client retries "busy" within its timeout.
    results: list[Any] = [None] * 100

    def one(i: int) -> None:
        try:
            results[i] = control.request(d.path, "slow" if i % 10 == 0 else "status", timeout=15)
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, dict) and r["ok"] for r in results), [r for r in results if not isinstance(r, dict)]
    assert d.run_ctl("status").returncode == 0


def test_start_refuses_a_live_socket_and_replaces_a_stale_one(daemon: Daemon, base_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="another process"):
        ControlServer(daemon.path, lambda c, a, p: {}).start()
    assert_status_answers(daemon)
    stale = base_dir / "stale" / "control.sock"
    stale.parent.mkdir()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))
    s.close()
    server = ControlServer(stale, lambda c, a, p: {"pong": True})
    server.start()
    try:
        reply: dict = {}
        t = threading.Thread(target=lambda: reply.update(control.request(stale, "ping", timeout=5)))
        t.start()
        deadline = time.monotonic() + 5
        while t.is_alive() and time.monotonic() < deadline:
            server.serve_once(0.05)
        t.join(1)
        assert reply["pong"] is True
    finally:
        server.close()
    assert not stale.exists()


def test_handle_line_pure() -> None:
    peer = Peer(1, 0, 0)
    handler = toy_handler([])
    assert control.handle_line(b'{"cmd":"drain"}', handler, peer)["ok"] is True
    assert control.handle_line("nope", handler, peer)["error"].startswith("malformed request: ")
    assert control.handle_line(b'{"cmd":"x"}', lambda c, a, p: [1], peer)["error"].startswith("internal error")
    assert control.handle_line(b'{"cmd":"x"}', lambda c, a, p: None, peer) == {"ok": True, "protocol": 1}


# --------------------------------------------------------------------------- access control

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run smsctl as another uid")
NOBODY = 65534


@needs_root
def test_socket_permissions_keep_other_users_out(daemon: Daemon) -> None:
    # 0660 root:root in a 0750 directory: nobody cannot even connect.
    result = daemon.run_ctl("status", user=NOBODY)
    assert result.returncode == ctl.EXIT_PERMISSION, result.stderr
    assert "permission denied on" in result.stderr  # EACCES from connect(), not a reply
    assert daemon.calls == []


@needs_root
def test_refused_peer_exits_4_then_allowed_peer_is_served(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    # Open the filesystem permissions wide so that only the server's own
    # peer-credential check stands in the way (defence in depth).
    os.chmod(daemon.path.parent, 0o755)
    os.chmod(daemon.path, 0o666)
    with caplog.at_level(logging.WARNING, logger="smsd.control"):
        result = daemon.run_ctl("status", user=NOBODY)
    assert result.returncode == ctl.EXIT_PERMISSION, (result.stdout, result.stderr)
    assert "permission denied by smsd" in result.stderr  # the server's refusal reply
    assert daemon.calls == []  # the handler never saw the request
    assert any(r.levelno == logging.WARNING and f"uid={NOBODY}" in r.getMessage() and "pid=" in r.getMessage()
               for r in caplog.records)

    daemon.server.allowed_uids = frozenset({NOBODY})
    result = daemon.run_ctl("status", "--json", user=NOBODY)
    assert result.returncode == ctl.EXIT_OK, result.stderr
    assert daemon.calls[0][2].uid == NOBODY


@needs_root
def test_members_of_the_socket_group_are_served(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon(group=NOBODY)
    st = os.stat(d.path)
    assert st.st_gid == NOBODY and stat.S_IMODE(st.st_mode) == 0o660
    assert os.stat(d.path.parent).st_gid == NOBODY
    result = d.run_ctl("drain", user=NOBODY)
    assert result.returncode == ctl.EXIT_OK, result.stderr
    assert result.stdout.strip() == "drain accepted for all users"


def test_a_supplementary_member_of_an_allowed_group_is_served(start_daemon: Callable[..., Daemon]) -> None:
    # uid and primary gid are nobody's; only a supplementary group grants access, and the
    # server learns it from the kernel (SO_PEERGROUPS), which works where /proc is hidden.
    group = 4242
    d = start_daemon(group=group)
    cmd, env = smsctl_for(NOBODY)
    result = subprocess.run([*cmd, "--socket", str(d.path), "drain"], capture_output=True, text=True,
                            timeout=20, user=NOBODY, group=NOBODY, extra_groups=[group], cwd="/", env=env)
    assert result.returncode == ctl.EXIT_OK, result.stderr
    assert d.calls and d.calls[-1][2].uid == NOBODY


def test_peer_groups_come_from_the_kernel_not_proc() -> None:
    from smsd.control import _peer_groups
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # A pid that does not exist: the /proc fallback would find nothing.
        assert _peer_groups(a, 2 ** 22 + 7) == set(os.getgroups())
    finally:
        a.close()
        b.close()
