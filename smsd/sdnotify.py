"""sd_notify(3) without libsystemd: one datagram to ``$NOTIFY_SOCKET``.

Like gunicorn's ``systemd.sd_notify``, this speaks the protocol directly: a
newline-separated list of ``KEY=VALUE`` assignments sent as one datagram to
an ``AF_UNIX`` socket whose path is in ``$NOTIFY_SOCKET`` (a leading ``@``
means the Linux abstract namespace).  Outside systemd the variable is unset
and every call is a cheap no-op, so callers never need to check.

The supervisor should build its :class:`Notifier` first (it snapshots the
variables) and then call :func:`unset_environment` on ``os.environ`` so that
forked workers do not inherit them: systemd only accepts messages from the
main PID by default (``NotifyAccess=main``), and a worker pinging the
watchdog would hide a hung supervisor.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping

log = logging.getLogger("smsd.sdnotify")

__all__ = ["notify", "Notifier", "unset_environment", "NOTIFY_VARIABLES"]

#: The variables systemd passes to a Type=notify service for sd_notify.
NOTIFY_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def _address(value: str) -> str | None:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value, or None if unusable."""
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # abstract namespace
    if value.startswith("/"):
        return value
    # vsock:... and relative paths are not supported (systemd in a VM); say so quietly.
    log.debug("sd_notify: unsupported NOTIFY_SOCKET %r", value)
    return None


def notify(state: str, *, env: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1\\nSTATUS=up"``) to ``$NOTIFY_SOCKET``.

    Returns True if the datagram was sent, False when there is no socket to
    send to or sending failed (logged at DEBUG; never raises).
    """
    environ = os.environ if env is None else env
    addr = _address(environ.get("NOTIFY_SOCKET", ""))
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), addr)
        return True
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", environ.get("NOTIFY_SOCKET"), exc)
        return False


def unset_environment(env: MutableMapping[str, str] | None = None) -> None:
    """Remove NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID from ``env`` (default ``os.environ``)."""
    environ = os.environ if env is None else env
    for name in NOTIFY_VARIABLES:
        environ.pop(name, None)


def _one_line(text: str) -> str:
    # A newline would start a new KEY=VALUE assignment; keep STATUS one line.
    return " ".join(str(text).splitlines()).strip()


class Notifier:
    """sd_notify for one process, from a snapshot of the environment taken at construction.

    ``enabled`` is False outside systemd; every method then returns False.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self._env = {k: environ[k] for k in NOTIFY_VARIABLES if k in environ}

    @property
    def enabled(self) -> bool:
        """True when there is a notify socket to talk to."""
        return _address(self._env.get("NOTIFY_SOCKET", "")) is not None

    def notify(self, state: str) -> bool:
        """Send a raw sd_notify state string."""
        return notify(state, env=self._env)

    def ready(self, status: str | None = None) -> bool:
        """READY=1 (start-up finished, or a reload finished), with an optional STATUS."""
        msg = "READY=1"
        if status is not None:
            msg += "\nSTATUS=" + _one_line(status)
        return self.notify(msg)

    def status(self, text: str) -> bool:
        """STATUS=text, shown by ``systemctl status``."""
        return self.notify("STATUS=" + _one_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        msg = "STOPPING=1"
        if status is not None:
            msg += "\nSTATUS=" + _one_line(status)
        return self.notify(msg)

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC (Type=notify-reload wants both); send ready() when done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC: ask for more time to start up or shut down (a slow drain)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def watchdog_interval(self) -> float | None:
        """How often to ping the watchdog, in seconds (half of WATCHDOG_USEC), or None.

        None when the watchdog is off, or when WATCHDOG_PID names another
        process (the variable was meant for our parent).
        """
        raw = self._env.get("WATCHDOG_USEC")
        if not raw:
            return None
        pid = self._env.get("WATCHDOG_PID")
        if pid:
            try:
                if int(pid) != os.getpid():
                    return None
            except ValueError:
                return None
        try:
            usec = int(raw)
        except ValueError:
            log.debug("sd_notify: bad WATCHDOG_USEC %r", raw)
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000
