"""The control protocol: wire format, request handling and the blocking client.

This module holds everything both ends of the control socket agree on, apart
from the server that carries it (:mod:`smsd.control`): the line framing, the
reply shapes, the handler contract (:class:`Peer`, :data:`Handler`,
:class:`UnknownCommand`, :class:`CommandError`), the pure
:func:`handle_line`, and :func:`request`, the client ``smsctl`` uses.  It is
apart so that the client never loads the server, and the protocol can be
read (and tested) without sockets.

Wire protocol (version :data:`PROTOCOL`): the client sends one line
``{"cmd": "status", "args": {...}}\\n``; the server answers each line with one
line, always ``{"ok": true, "protocol": 1, ...}`` or
``{"ok": false, "protocol": 1, "error": "..."}``.  A connection may carry many
requests; replies come back in order.

:func:`request` is the blocking client used by ``smsctl``.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

# The logger keeps the name it had when the protocol lived in smsd.control.
log = logging.getLogger("smsd.control")

__all__ = [
    "PROTOCOL", "Peer", "Handler", "UnknownCommand", "CommandError",
    "handle_line", "parse_request", "BadRequest", "error_reply", "encode_reply",
    "request", "ControlClientError", "DaemonNotRunning", "PermissionDenied",
    "ControlTimeout", "ControlError",
]

PROTOCOL = 1
#: Largest reply the client accepts (a status of thousands of users fits easily).
MAX_REPLY = 64 * 1024 * 1024

@dataclass(frozen=True)
class Peer:
    """The connected process, from ``SO_PEERCRED``."""

    pid: int
    uid: int
    gid: int


Handler = Callable[[str, dict, Peer], Mapping[str, Any] | None]


class UnknownCommand(Exception):
    """Raised by a handler for a command it does not know."""

    def __init__(self, cmd: str) -> None:
        super().__init__(f"unknown command: {cmd}")
        self.cmd = cmd


class CommandError(Exception):
    """Raised by a handler to refuse a request: the reply is ``ok: false`` with this message."""


class BadRequest(ValueError):
    """A request line that is not a valid request."""


# ---------------------------------------------------------------------------
# pure protocol functions
# ---------------------------------------------------------------------------

def error_reply(message: str) -> dict:
    """The ``ok: false`` reply carrying ``message``."""
    return {"ok": False, "protocol": PROTOCOL, "error": message}


def _json_default(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def encode_reply(reply: Mapping[str, Any]) -> bytes:
    """One reply as a JSON line (datetimes, Decimals and sets are converted)."""
    return json.dumps(reply, default=_json_default, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


def parse_request(line: bytes | str) -> tuple[str, dict]:
    """``(cmd, args)`` of one request line; raises :class:`BadRequest`."""
    try:
        obj = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed request: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("malformed request: a request is a JSON object")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str) or not cmd:
        raise BadRequest("malformed request: missing cmd")
    args = obj.get("args")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise BadRequest("malformed request: args must be an object")
    return cmd, args


def handle_line(line: bytes | str, handler: Handler, peer: Peer) -> dict:
    """Parse one request line, run ``handler`` and build the reply; never raises (bar BaseException)."""
    try:
        cmd, args = parse_request(line)
    except BadRequest as exc:
        return error_reply(str(exc))
    try:
        result = handler(cmd, args, peer)
    except UnknownCommand as exc:
        return error_reply(f"unknown command: {exc.cmd}")
    except CommandError as exc:
        return error_reply(str(exc) or "command failed")
    except Exception as exc:  # the server must survive any handler bug
        log.exception("control: handler failed on %r from uid=%d pid=%d", cmd, peer.uid, peer.pid)
        return error_reply(f"internal error: {type(exc).__name__}")
    if result is None:
        result = {}
    if not isinstance(result, Mapping):
        log.error("control: handler returned %s for %r, not a mapping", type(result).__name__, cmd)
        return error_reply("internal error: bad handler result")
    reply: dict = {"ok": True, "protocol": PROTOCOL}
    reply.update(result)
    reply["protocol"] = PROTOCOL
    if reply.get("ok") is not True:
        reply["ok"] = False
        reply.setdefault("error", "command failed")
    return reply



# ---------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------

class ControlClientError(Exception):
    """Base of every failure of :func:`request`."""


class DaemonNotRunning(ControlClientError):
    """No daemon answers on the socket (missing socket, ENOENT, ECONNREFUSED)."""

    def __init__(self, path: str | os.PathLike, detail: str = "") -> None:
        self.path = str(path)
        super().__init__(f"smsd is not running (no control socket at {self.path})" + (f": {detail}" if detail else ""))


class PermissionDenied(ControlClientError):
    """EACCES on connect, or the daemon refused this user."""

    def __init__(self, message: str, reply: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


class ControlTimeout(ControlClientError):
    """The daemon did not answer in time."""


class ControlError(ControlClientError):
    """The daemon answered ``ok: false`` (or answered garbage); ``message`` says why."""

    def __init__(self, message: str, reply: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.reply = reply


def request(path: str | os.PathLike, cmd: str, args: Mapping[str, Any] | None = None,
            timeout: float = 5.0, *, retry_busy: bool = True) -> dict:
    """Send one command and return the daemon's ``ok: true`` reply.

    Raises :class:`DaemonNotRunning`, :class:`PermissionDenied`,
    :class:`ControlTimeout` or :class:`ControlError`.  A ``busy`` reply (the
    server is at ``max_clients``) is retried with back-off until ``timeout``.
    """
    line = json.dumps({"cmd": cmd, "args": dict(args or {})}, default=_json_default).encode("utf-8") + b"\n"
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        reply = _request_once(str(path), line, deadline, timeout)
        if reply.get("ok") is True:
            return reply
        message = str(reply.get("error") or "request failed")
        if retry_busy and message.startswith("busy") and time.monotonic() + delay < deadline:
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
            continue
        if message == "permission denied":
            raise PermissionDenied(f"permission denied by smsd on {path}", reply)
        raise ControlError(message, reply)


def _request_once(path: str, line: bytes, deadline: float, timeout: float) -> dict:
    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlTimeout(f"no reply from smsd on {path} within {timeout:g}s")
        return left

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(remaining())
        try:
            sock.connect(path)
        except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError) as exc:
            raise DaemonNotRunning(path) from exc
        except PermissionError as exc:
            raise PermissionDenied(f"permission denied on {path}") from exc
        except (TimeoutError, socket.timeout) as exc:
            raise ControlTimeout(f"smsd on {path} did not accept the connection within {timeout:g}s") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
                raise DaemonNotRunning(path) from exc
            raise ControlError(f"cannot connect to {path}: {exc}") from exc
        try:
            sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may have refused us (busy/denied) and closed: read its reply
        except (TimeoutError, socket.timeout) as exc:
            raise ControlTimeout(f"smsd on {path} did not take the request within {timeout:g}s") from exc
        buf = bytearray()
        while b"\n" not in buf:
            sock.settimeout(remaining())
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, socket.timeout) as exc:
                raise ControlTimeout(f"no reply from smsd on {path} within {timeout:g}s") from exc
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                if not buf:
                    raise ControlError("smsd closed the connection without replying")
                break
            buf += chunk
            if len(buf) > MAX_REPLY:
                raise ControlError("reply too large")
    finally:
        sock.close()
    raw = bytes(buf).split(b"\n", 1)[0]
    try:
        reply = json.loads(raw)
    except ValueError as exc:
        raise ControlError(f"malformed reply from smsd: {exc}") from None
    if not isinstance(reply, dict):
        raise ControlError("malformed reply from smsd: not an object")
    return reply
