"""A TCP proxy for the MongoDB wire protocol that delays, counts and can play "down".

``python -m smsd.lab.mongoproxy --upstream HOST:PORT [--delay-ms N]`` listens on
loopback and forwards every connection to the upstream MongoDB-wire server.  It
reads each client→server message whole (the 16-byte header gives its length),
counts it by command name (the first key of an ``OP_MSG`` body, or of an
``OP_QUERY``'s query document), waits ``delay_ms`` and forwards it; the
server→client direction is forwarded as it arrives.  So with ``--delay-ms 200``
every command a client sends takes 200 ms more, as from a distant or overloaded
server, without touching the client or the server.

``down`` closes every proxied connection and stops listening, so new connections
are refused (a stopped ``mongod``); ``up`` listens again on the same port.

It is a separate process on purpose: what it measures (commands the smsd
processes send, seen from the server's side) and what it injects (latency, an
outage) must not depend on patching the clients.

Admin API (JSON over HTTP on its own port):

- ``GET  /stats``   ``{"commands": {name: n}, "messages": n, "connections_total": n,
  "connections_open": n, "delay_ms": x, "down": bool, "server_time": {label: {"n": n,
  "busy_s": x, "wall_s": x}}}``
- ``POST /config``  ``{"delay_ms": x}`` and/or ``{"down": true|false}``
- ``POST /reset``   zero the counters

The ready line on stdout is ``smsd-mongoproxy listening on HOST:PORT admin http://HOST:APORT``.
*Server time* says where the server's time goes, command by command, as seen
from outside it: a request is outstanding from the moment it is forwarded until
the whole reply is read back (a connection has at most one
request out: drivers do not pipeline on one socket).  While k requests are
outstanding, each is charged 1/k of the elapsed time (``busy_s``, which sums to
the time the server had work, at most the run's length); ``wall_s`` is the plain
sum of their round trips.  The label is the command and, where the command's
first value names one, its collection (``"update smsd_leases"``).  The drivers'
monitoring (:data:`MONITORING`, an awaitable ``hello`` is held for seconds on
purpose) and requests that want no reply are not timed.

It never logs message contents.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import signal
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any

from .subproc import admin_json, ready_line

log = logging.getLogger("smsd.mongoproxy")

READY_PREFIX = "smsd-mongoproxy listening on "
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013
#: ``OP_MSG`` flagBits: the sender wants no reply (an unacknowledged write, or exhaust).
MORE_TO_COME = 1 << 1
HEADER = struct.Struct("<iiii")
#: Largest message accepted (MongoDB's maxMessageSizeBytes is 48 MB).
MAX_MESSAGE = 64 * 1024 * 1024
#: Commands of the driver's own monitoring and session housekeeping, not of the job.
MONITORING = frozenset({"hello", "ismaster", "isMaster", "ping", "endSessions", "buildinfo",
                        "buildInfo", "saslStart", "saslContinue"})


def _first_key(doc: bytes, offset: int) -> str:
    """The first element name of the BSON document at ``offset`` (``"?"`` if empty or cut)."""
    start = offset + 5                      # int32 length, then the first element's type byte
    end = doc.find(b"\x00", start)
    if end < 0 or start > len(doc):
        return "?"
    return doc[start:end].decode("utf-8", "replace") or "?"


def _first_string(doc: bytes, offset: int) -> str | None:
    """The value of the first element of the BSON document at ``offset`` if it is a string."""
    try:
        if doc[offset + 4] != 0x02:
            return None
        end = doc.index(b"\x00", offset + 5)
        (size,) = struct.unpack_from("<i", doc, end + 1)
        if not 0 < size <= 1024:
            return None
        return doc[end + 5:end + 4 + size].decode("utf-8", "replace")
    except (ValueError, IndexError, struct.error):
        return None


def _command_doc(op_code: int, body: bytes) -> int | None:
    """Where the command document starts in ``body`` (the message after its header)."""
    try:
        if op_code == OP_MSG:
            pos = 4
            while pos < len(body):
                if body[pos] == 0:
                    return pos + 1
                (size,) = struct.unpack_from("<i", body, pos + 1)   # kind 1: a document sequence
                pos += 1 + size
            return None
        if op_code == OP_QUERY:
            return body.index(b"\x00", 4) + 1 + 8
    except (ValueError, IndexError, struct.error):
        return None
    return None


def command_label(op_code: int, body: bytes) -> str:
    """``command_name`` and, when the command's first value is a string, that value
    (the collection of ``find``, ``update``, ``aggregate``...): ``"find sms_fin_rawdata"``."""
    name = command_name(op_code, body)
    at = _command_doc(op_code, body)
    target = _first_string(body, at) if at is not None else None
    return f"{name} {target}" if target else name


def command_name(op_code: int, body: bytes) -> str:
    """The command a client→server message carries (``body`` = the message after its header).

    ``OP_MSG``: flagBits, then sections; the kind-0 section is the command document.
    ``OP_QUERY``: flags, collection cstring, skip, return, then the query document."""
    if op_code not in (OP_MSG, OP_QUERY):
        return f"op_{op_code}"
    at = _command_doc(op_code, body)
    return _first_key(body, at) if at is not None else "?"


class Proxy:
    """The asyncio proxy: connections, counters, the delay and the down switch."""

    def __init__(self, upstream: tuple[str, int], host: str = "127.0.0.1", port: int = 0,
                 delay_ms: float = 0.0) -> None:
        self.upstream = upstream
        self.host = host
        self.port = port
        self.delay_ms = float(delay_ms)
        self.down = False
        self.lock = threading.Lock()          # counters are read from the admin thread
        self.commands: collections.Counter = collections.Counter()
        self.messages = 0
        self.connections_total = 0
        # Server time (module docstring): requests out now, by connection; label -> [n, busy, wall].
        self._out: dict[int, tuple[str, float]] = {}
        self._since = time.monotonic()
        self.server_time: dict[str, list[float]] = {}
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def listen(self) -> None:
        """Start (or restart, on the same port) listening."""
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        self.down = False

    async def go_down(self) -> None:
        """Refuse new connections and cut the open ones."""
        self.down = True
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for w in list(self._open):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._open.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()   # upstream itself is down: the client sees a reset
            return
        with self.lock:
            self.connections_total += 1
        self._open.update((writer, up_writer))
        conn = id(writer)
        tasks = [asyncio.ensure_future(self._client_to_server(reader, up_writer, conn)),
                 asyncio.ensure_future(self._server_to_client(up_reader, writer, conn))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            with self.lock:
                self._advance(time.monotonic())
                self._out.pop(conn, None)      # cut mid-request: its time so far stays charged
            for w in (writer, up_writer):
                self._open.discard(w)
                with contextlib.suppress(Exception):
                    w.transport.abort()

    def _advance(self, now: float) -> None:
        """Under the lock: share the time since the last event among the requests out."""
        if self._out:
            share = (now - self._since) / len(self._out)
            for label, _ in self._out.values():
                self.server_time.setdefault(label, [0, 0.0, 0.0])[1] += share
        self._since = now

    def _sent(self, conn: int, op_code: int, body: bytes, name: str) -> None:
        if name in MONITORING or (op_code == OP_MSG and len(body) >= 4
                                  and struct.unpack_from("<I", body)[0] & MORE_TO_COME):
            return
        label = command_label(op_code, body)
        with self.lock:
            now = time.monotonic()
            self._advance(now)
            self._out[conn] = (label, now)

    def _answered(self, conn: int) -> None:
        with self.lock:
            if conn not in self._out:
                return
            now = time.monotonic()
            self._advance(now)
            label, started = self._out.pop(conn)
            entry = self.server_time.setdefault(label, [0, 0.0, 0.0])
            entry[0] += 1
            entry[2] += now - started

    async def _client_to_server(self, reader: asyncio.StreamReader, up: asyncio.StreamWriter,
                                conn: int = 0) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                header = await reader.readexactly(HEADER.size)
                length, _req, _resp, op_code = HEADER.unpack(header)
                if not HEADER.size <= length <= MAX_MESSAGE:
                    log.warning("message of %d bytes: not MongoDB wire protocol; closing", length)
                    return
                body = await reader.readexactly(length - HEADER.size)
                name = command_name(op_code, body)
                with self.lock:
                    self.commands[name] += 1
                    self.messages += 1
                if self.delay_ms > 0:
                    await asyncio.sleep(self.delay_ms / 1000.0)
                self._sent(conn, op_code, body, name)
                up.write(header + body)
                await up.drain()

    async def _server_to_client(self, up: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                conn: int = 0) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
            while True:
                header = await up.readexactly(HEADER.size)
                (length,) = struct.unpack_from("<i", header)
                if not HEADER.size <= length <= MAX_MESSAGE:
                    log.warning("reply of %d bytes: not MongoDB wire protocol; closing", length)
                    return
                message = header + await up.readexactly(length - HEADER.size)
                self._answered(conn)
                writer.write(message)
                await writer.drain()

    def stats(self) -> dict:
        """The admin API's ``/stats``."""
        with self.lock:
            return {"commands": dict(self.commands), "messages": self.messages,
                    "connections_total": self.connections_total,
                    "connections_open": len(self._open) // 2, "delay_ms": self.delay_ms,
                    "down": self.down, "port": self.port,
                    "server_time": {label: {"n": int(n), "busy_s": round(busy, 6), "wall_s": round(wall, 6)}
                                    for label, (n, busy, wall) in sorted(self.server_time.items())}}

    def reset(self) -> None:
        """Zero the counters."""
        with self.lock:
            self.commands.clear()
            self.messages = 0
            self.connections_total = 0
            self.server_time.clear()

    def configure(self, changes: dict) -> dict:
        """Apply ``{"delay_ms", "down"}`` from the admin thread; returns the new stats."""
        unknown = set(changes) - {"delay_ms", "down"}
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}")
        if "delay_ms" in changes:
            delay = float(changes["delay_ms"])
            if delay < 0:
                raise ValueError("delay_ms must be >= 0")
            self.delay_ms = delay
        if "down" in changes and bool(changes["down"]) != self.down:
            coro = self.go_down() if changes["down"] else self.listen()
            assert self.loop is not None
            asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)
        return self.stats()


def _admin_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            log.debug(fmt, *args)

        def _send(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802
            if self.path.rstrip("/") == "/stats":
                self._send(200, proxy.stats())
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:  # noqa: N802
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n else b""
            path = self.path.rstrip("/")
            try:
                body = json.loads(raw) if raw.strip() else {}
                if path == "/reset":
                    proxy.reset()
                    self._send(200, proxy.stats())
                elif path == "/config" and isinstance(body, dict):
                    self._send(200, proxy.configure(body))
                else:
                    self._send(404, {"error": "not found"})
            except (ValueError, TypeError) as exc:
                self._send(400, {"error": str(exc)})

    return Handler


def _parse_hostport(text: str) -> tuple[str, int]:
    text = text.removeprefix("mongodb://").split("/", 1)[0].split("?", 1)[0]
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    """Run the proxy until SIGTERM/SIGINT."""
    p = argparse.ArgumentParser(prog="python -m smsd.lab.mongoproxy", description=__doc__.split("\n")[0])
    p.add_argument("--upstream", required=True, help="HOST:PORT (or mongodb://HOST:PORT) of the server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--admin-port", type=int, default=0)
    p.add_argument("--delay-ms", type=float, default=0.0, help="delay of every client→server message")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        upstream = _parse_hostport(args.upstream)
    except ValueError as exc:
        print(f"smsd-mongoproxy: {exc}", file=sys.stderr)
        return 2
    proxy = Proxy(upstream, args.host, args.port, args.delay_ms)
    loop = asyncio.new_event_loop()
    proxy.loop = loop
    loop.run_until_complete(proxy.listen())
    admin = ThreadingHTTPServer((args.host, args.admin_port), _admin_handler(proxy))
    admin.daemon_threads = True
    threading.Thread(target=admin.serve_forever, daemon=True, name="admin").start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"{READY_PREFIX}{args.host}:{proxy.port} admin http://{args.host}:{admin.server_address[1]}",
          flush=True)
    loop.run_until_complete(stop.wait())
    admin.shutdown()
    loop.run_until_complete(proxy.go_down())
    loop.close()
    return 0


class ProxyProcess:
    """``python -m smsd.lab.mongoproxy`` as a subprocess, driven through its admin API."""

    def __init__(self, upstream: str, log_path: Path | None = None, delay_ms: float = 0.0) -> None:
        self.upstream = upstream
        self.log_path = log_path
        self.delay_ms = delay_ms
        self.proc: subprocess.Popen[str] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.admin = ""
        self._log: IO[bytes] | None = None

    @property
    def uri(self) -> str:
        """A MongoDB URI through the proxy (direct: never the server's own address)."""
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    def start(self, timeout: float = 30.0) -> "ProxyProcess":
        """Start it and wait for the ready line."""
        self._log = open(self.log_path, "ab") if self.log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsd.lab.mongoproxy", "--upstream", self.upstream,
             "--delay-ms", str(self.delay_ms)],
            stdout=subprocess.PIPE, stderr=self._log or subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            text=True)
        ready = ready_line(self.proc, READY_PREFIX, timeout)
        if ready is None:
            self.stop()
            raise RuntimeError("MongoDB proxy did not start")
        listen, _, admin = ready.partition(" admin ")
        self.host, self.port = _parse_hostport(listen)
        self.admin = admin
        return self

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        return admin_json(self.admin + path, method, body)

    def stats(self) -> dict:
        """Counters and settings."""
        return self._call("GET", "/stats")

    def configure(self, **changes: Any) -> dict:
        """``delay_ms=``, ``down=``."""
        return self._call("POST", "/config", changes)

    def reset(self) -> dict:
        """Zero the counters."""
        return self._call("POST", "/reset", {})

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; reap."""
        proc, self.proc = self.proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            if proc.stdout:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


if __name__ == "__main__":
    sys.exit(main())
