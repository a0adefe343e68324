"""sd_notify over a real AF_UNIX datagram socket, as systemd would listen."""
from __future__ import annotations

import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from smsd.sdnotify import Notifier, notify, unset_environment


@pytest.fixture
def listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to a filesystem path, like systemd's notify socket."""
    with tempfile.TemporaryDirectory(prefix="smsd-notify-", dir="/tmp") as d:
        path = str(Path(d) / "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(2.0)
        try:
            yield sock, path
        finally:
            sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace; NOTIFY_SOCKET spells it ``@name``."""
    name = f"smsd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        yield sock, "@" + name
    finally:
        sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_notify_without_socket_is_a_quiet_no_op() -> None:
    assert notify("READY=1", env={}) is False
    assert Notifier(env={}).enabled is False
    assert Notifier(env={}).ready() is False


def test_notify_sends_one_datagram_to_a_path(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    assert notify("READY=1\nSTATUS=up", env={"NOTIFY_SOCKET": path}) is True
    assert _recv(sock) == "READY=1\nSTATUS=up"


def test_notify_reads_os_environ_by_default(listener: tuple[socket.socket, str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert notify("WATCHDOG=1") is True
    assert _recv(sock) == "WATCHDOG=1"


def test_notify_to_abstract_socket(abstract_listener: tuple[socket.socket, str]) -> None:
    sock, name = abstract_listener
    assert notify("READY=1", env={"NOTIFY_SOCKET": name}) is True
    assert _recv(sock) == "READY=1"


def test_missing_listener_returns_false_and_never_raises(tmp_path: Path) -> None:
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "@smsd-nobody-" + uuid.uuid4().hex}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": "vsock:2:1234"}) is False
    assert Notifier(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}).watchdog() is False


def test_notifier_messages(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier(env={"NOTIFY_SOCKET": path})
    assert n.enabled
    n.ready("serving 3 users")
    assert _recv(sock) == "READY=1\nSTATUS=serving 3 users"
    n.status("draining\nREADY=1")  # a newline must not smuggle in another assignment
    assert _recv(sock) == "STATUS=draining READY=1"
    n.watchdog()
    assert _recv(sock) == "WATCHDOG=1"
    n.stopping("bye")
    assert _recv(sock) == "STOPPING=1\nSTATUS=bye"
    n.extend_timeout(30)
    assert _recv(sock) == "EXTEND_TIMEOUT_USEC=30000000"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    lines = _recv(sock).split("\n")
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert Notifier(env={"WATCHDOG_USEC": "10000000"}).watchdog_interval() == 5.0
    mine = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(env=mine).watchdog_interval() == 1.5
    # Meant for another process (our parent), disabled, or garbage: no watchdog for us.
    assert Notifier(env={"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval() is None
    assert Notifier(env={"WATCHDOG_USEC": "0"}).watchdog_interval() is None
    assert Notifier(env={"WATCHDOG_USEC": "soon"}).watchdog_interval() is None
    assert Notifier(env={}).watchdog_interval() is None


def test_unset_environment_keeps_children_out_but_notifier_keeps_working(
        listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()  # snapshot first, as the supervisor does
    unset_environment()
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert name not in os.environ
    assert notify("READY=1") is False  # a worker forked now inherits nothing
    assert n.watchdog_interval() == 1.0
    assert n.ready() is True
    assert _recv(sock) == "READY=1"
    env = {"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "1", "PATH": "/bin"}
    unset_environment(env)
    assert env == {"PATH": "/bin"}
