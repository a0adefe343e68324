"""A tiny non-blocking HTTP/1.x server for ``GET /metrics``, for the supervisor's select() loop.

The supervisor never blocks and runs no threads (it pings systemd's
watchdog), so prometheus_client's threaded HTTP server is out.  Like
:class:`smsd.control.ControlServer`, :class:`MetricsServer` hands its
descriptors to the loop's ``select()`` and does all socket I/O
non-blocking in :meth:`MetricsServer.process`.  Every client costs a bounded
buffer and at most ``client_timeout`` seconds: a request head over
``max_request`` bytes, or that is not HTTP, is answered 400; a client too
slow to send its request is dropped; past ``max_clients`` connections the
listener is not polled (the rest wait in the kernel's backlog).  Each
connection carries one request and is closed after the answer.
"""
from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Callable, Iterable

log = logging.getLogger("smsd.metrics")

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large"}


class ListenError(ValueError):
    """A ``host:port`` that cannot be parsed."""


def parse_listen(value: str) -> tuple[str, int]:
    """``"127.0.0.1:9108"``, ``"[::1]:9108"``, ``"localhost:0"`` → (host, port)."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise ListenError(f"{value!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        number = int(port)
    except ValueError:
        raise ListenError(f"{value!r}: port {port!r} is not a number") from None
    if not 0 <= number <= 65535:
        raise ListenError(f"{value!r}: port out of range")
    return host, number


class _Client:
    __slots__ = ("sock", "fd", "inbuf", "outbuf", "deadline", "answered", "eof")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.deadline = deadline
        self.answered = False   # the reply is queued; what the client still sends is discarded
        self.eof = False        # the client shut its side: not polled for reading any more


class MetricsServer:
    """``GET /metrics`` on ``host:port``; ``body()`` gives the page (called from :meth:`process`)."""

    def __init__(self, listen: str, body: Callable[[], bytes], *, content_type: str,
                 max_clients: int = 64, client_timeout: float = 5.0, max_request: int = 8192) -> None:
        self.host, self.port = parse_listen(listen)
        self.body = body
        self.content_type = content_type
        self.max_clients = max_clients
        self.client_timeout = client_timeout
        self.max_request = max_request
        self._listener: socket.socket | None = None
        self._clients: dict[int, _Client] = {}
        self._accept_paused_until = 0.0
        self.served = 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Bind and listen; raises OSError (e.g. address in use) for start-up to report."""
        infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._listener = sock
        self.port = sock.getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.url_host, self.port)

    @property
    def url_host(self) -> str:
        """The host as it goes in a URL (IPv6 in brackets)."""
        return f"[{self.host}]" if ":" in self.host else self.host

    @property
    def url(self) -> str:
        """Where the metrics are (the port is the bound one, also for port 0)."""
        return f"http://{self.url_host}:{self.port}/metrics"

    def close(self) -> None:
        """Close every client and the listener."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # ------------------------------------------------------------ main loop API
    def read_fds(self) -> list[int]:
        """Descriptors to ``select()`` for reading."""
        fds = [c.fd for c in self._clients.values() if not c.eof]
        if (self._listener is not None and len(self._clients) < self.max_clients
                and time.monotonic() >= self._accept_paused_until):
            fds.append(self._listener.fileno())
        return fds

    def write_fds(self) -> list[int]:
        """Descriptors with unsent answers."""
        return [c.fd for c in self._clients.values() if c.outbuf]

    def process(self, readable: Iterable[int], writable: Iterable[int]) -> None:
        """Accept, read, answer and write whatever is ready; never blocks.  Also expires clients."""
        readable, writable = set(readable), set(writable)
        if self._listener is not None and self._listener.fileno() in readable:
            self._accept()
        for fd in readable:
            client = self._clients.get(fd)
            if client is not None:
                self._read(client)
        for fd in writable:
            client = self._clients.get(fd)
            if client is not None and client.outbuf:
                self._send(client)
        self.expire()

    def expire(self) -> None:
        """Drop clients past their deadline (a slow request, or an answer never read)."""
        now = time.monotonic()
        for client in list(self._clients.values()):
            if now >= client.deadline:
                self._drop(client)

    # ------------------------------------------------------------ internals
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):   # bounded, so a connection storm cannot starve the loop
            if len(self._clients) >= self.max_clients:
                return
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("metrics: cannot accept (%s); pausing accepts", exc)
                    self._accept_paused_until = time.monotonic() + 0.5
                    return
                continue
            sock.setblocking(False)
            client = _Client(sock, time.monotonic() + self.client_timeout)
            self._clients[client.fd] = client

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            client.eof = True
            if not client.answered and client.inbuf:
                self._answer(client, *self._route(bytes(client.inbuf), complete=False))
            elif not client.outbuf:
                self._drop(client)
            return
        if client.answered:
            return   # discarded: one request per connection
        client.inbuf += data
        head_end = client.inbuf.find(b"\r\n\r\n")
        if head_end < 0:
            head_end = client.inbuf.find(b"\n\n")
        if head_end > self.max_request or (head_end < 0 and len(client.inbuf) > self.max_request):
            self._answer(client, 431, b"request head too long\n", self.TEXT)
        elif head_end >= 0:
            self._answer(client, *self._route(bytes(client.inbuf[:head_end]), complete=True))

    TEXT = "text/plain; charset=utf-8"

    def _route(self, head: bytes, complete: bool) -> tuple[int, bytes, str]:
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not complete:
            return 400, b"bad request\n", self.TEXT
        method, target = parts[0], parts[1]
        path = target.split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET\n", self.TEXT
        if path == b"/metrics":
            return 200, self.body(), self.content_type
        if path == b"/":
            return 200, b"smsd: metrics at /metrics\n", self.TEXT
        return 404, b"not found: try /metrics\n", self.TEXT

    def _answer(self, client: _Client, code: int, body: bytes, ctype: str) -> None:
        head_only = client.inbuf[:5] == b"HEAD "
        head = (f"HTTP/1.1 {code} {_REASONS.get(code, 'Error')}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        client.outbuf += head if head_only else head + body
        client.inbuf.clear()
        client.answered = True
        self.served += 1
        self._send(client)

    def _send(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        del client.outbuf[:sent]
        if not client.outbuf:
            # Signal the end; the client's own close (or the deadline) ends the connection,
            # so closing here never turns unread input into a reset before it has read us.
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop(client)
                return
            if client.eof:
                self._drop(client)
                return
            client.deadline = min(client.deadline, time.monotonic() + 1.0)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.fd, None)
        try:
            client.sock.close()
        except OSError:
            pass
