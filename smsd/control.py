"""The control socket server: line-delimited JSON over a UNIX stream socket.

The wire protocol, the handler contract and the client live in
:mod:`smsd.control_protocol`; this module is the server that carries them and
decides who may talk to it (peer credentials).

:class:`ControlServer` is built for a single-threaded supervisor main loop that
must never block on a client (it also pings the systemd watchdog): it exposes
its descriptors (:meth:`~ControlServer.read_fds` / :meth:`~ControlServer.write_fds`)
so the supervisor can ``select()`` on them together with its own wake-up pipe,
and does all socket I/O non-blocking in :meth:`~ControlServer.process`.  A
client that sends garbage, too much, nothing at all, or never reads its
replies costs the server a bounded buffer and at most ``client_timeout``.
"""
from __future__ import annotations

import errno
import grp
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Iterable
from pathlib import Path

from .control_protocol import Handler, Peer, encode_reply, error_reply, handle_line
# The handler contract lives in control_protocol; re-exported for the handlers
# a ControlServer runs (the supervisor's), and the client for callers of
# control.request (smsd.lab).
from .control_protocol import (CommandError, ControlClientError, UnknownCommand,  # noqa: F401
                               request)

log = logging.getLogger("smsd.control")

__all__ = [
    "Peer", "Handler", "UnknownCommand", "CommandError", "ControlServer",
    "request", "ControlClientError",
]

#: Stop reading a client's requests while this much of its output is unsent.
MAX_OUTBUF = 4 * 1024 * 1024
#: After a fatal error reply, how long to drain a client's input before closing
#: (closing with unread input would make the peer see ECONNRESET).
LINGER_S = 1.0
_UNIX_PATH_MAX = 107


def _peercred(sock: socket.socket) -> Peer:
    fmt = "3i"
    pid, uid, gid = struct.unpack(fmt, sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt)))
    return Peer(pid=pid, uid=uid, gid=gid)


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)   # Linux >= 4.13


def _peer_groups(sock: socket.socket, pid: int) -> set[int]:
    """Supplementary groups of the peer, from the kernel (``SO_PEERGROUPS``).

    The kernel's answer works under ``ProtectProc=invisible``, which hides
    ``/proc/<pid>`` from the daemon; ``/proc`` is only the fallback.
    """
    size = 64
    while size <= 65536 * 4:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            break
        n = len(raw) // 4
        return set(struct.unpack(f"{n}I", raw[: n * 4]))
    return _proc_groups(pid)


def _proc_groups(pid: int) -> set[int]:
    """Supplementary groups of ``pid`` (empty if the process is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:] if g.isdigit()}
    except OSError:
        pass
    return set()


def _resolve_gid(group: str | int) -> int:
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r}") from None


# ---------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------

class _Client:
    __slots__ = ("sock", "fd", "peer", "inbuf", "outbuf", "last_active", "closing", "eof",
                 "wr_shut", "linger_until")

    def __init__(self, sock: socket.socket, peer: Peer, now: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.last_active = now
        self.closing = False      # a fatal reply is queued: read and discard, then close
        self.eof = False          # the peer shut down its writing side
        self.wr_shut = False      # our reply is flushed and we shut our writing side
        self.linger_until = 0.0


class ControlServer:
    """Non-blocking control socket server for a ``select()`` main loop.

    ``handler(cmd, args, peer) -> dict`` runs in the caller's thread, inside
    :meth:`process`; it must be quick.  It raises :class:`UnknownCommand` for
    commands it does not know and :class:`CommandError` to refuse one; its
    dict is merged into ``{"ok": true, "protocol": 1}``.

    Access: uid 0, the server's own uid, ``allowed_uids``, and any peer whose
    primary or supplementary group is in ``allowed_gids`` -- or is ``group``,
    the group the socket is given to (a socket's group is who may operate it).
    Everyone else gets ``permission denied``, logged at WARNING.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        handler: Handler,
        *,
        mode: int = 0o660,
        dir_mode: int = 0o750,
        group: str | int | None = None,
        allowed_uids: Iterable[int] = (),
        allowed_gids: Iterable[int] = (),
        max_line: int = 65536,
        client_timeout: float = 5.0,
        max_clients: int = 64,
        backlog: int = 128,
    ) -> None:
        self.path = Path(path)
        if len(os.fsencode(self.path)) > _UNIX_PATH_MAX:
            raise ValueError(f"control socket path too long for AF_UNIX ({_UNIX_PATH_MAX} bytes max): {self.path}")
        self.handler = handler
        self.mode = mode
        self.dir_mode = dir_mode
        self.gid = _resolve_gid(group) if group is not None else None
        self.allowed_uids = frozenset(int(u) for u in allowed_uids)
        gids = {int(g) for g in allowed_gids}
        if self.gid is not None:
            gids.add(self.gid)
        self.allowed_gids = frozenset(gids)
        self.max_line = int(max_line)
        self.client_timeout = float(client_timeout)
        self.max_clients = int(max_clients)
        self.backlog = int(backlog)
        self._uid = os.geteuid()
        self._listener: socket.socket | None = None
        self._ino: tuple[int, int] | None = None
        self._clients: dict[int, _Client] = {}
        self._accept_paused_until = 0.0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Create the directory if missing, replace a stale socket, bind and listen.

        Raises ``RuntimeError`` if another live process already answers on
        the path (never steal a running daemon's socket).
        """
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(parents=True, mode=self.dir_mode, exist_ok=True)
            os.chmod(directory, self.dir_mode)  # mkdir's mode is filtered by the umask
            if self.gid is not None:
                os.chown(directory, -1, self.gid)
        self._remove_stale()
        # Bind under a temporary name, fix mode and group, then rename into
        # place: the socket is never reachable with the umask's permissions.
        tmp = directory / f".{self.path.name}.{os.getpid()}.tmp"
        if len(os.fsencode(tmp)) > _UNIX_PATH_MAX:
            tmp = self.path  # no room for a longer name: bind in place, then chmod
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, self.mode)
            if self.gid is not None:
                os.chown(tmp, -1, self.gid)
            sock.listen(self.backlog)
            if tmp != self.path:
                os.rename(tmp, self.path)
        except BaseException:
            sock.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self._listener = sock
        log.info("control socket listening on %s (mode %o)", self.path, self.mode)

    def _remove_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RuntimeError(f"{self.path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("control: removing stale socket %s", self.path)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            return
        except OSError as exc:  # timeout (full backlog) or EACCES: someone is there
            raise RuntimeError(f"control socket {self.path} is in use ({exc})") from exc
        finally:
            probe.close()
        raise RuntimeError(f"another process is serving {self.path}")

    def close(self) -> None:
        """Close every client and the listener, and unlink the socket if it is still ours."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass

    def close_after_fork(self) -> None:
        """In a forked child: close the inherited descriptors without touching the socket file.

        A worker that kept the listener open would keep accepting (and never
        answering) connections after the supervisor died.
        """
        for client in self._clients.values():
            try:
                client.sock.close()
            except OSError:
                pass
        self._clients.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def fileno(self) -> int:
        """The listening socket's descriptor."""
        if self._listener is None:
            raise RuntimeError("control server not started")
        return self._listener.fileno()

    @property
    def client_count(self) -> int:
        """Connections currently open."""
        return len(self._clients)

    # ------------------------------------------------------------ main loop API
    def read_fds(self) -> list[int]:
        """Descriptors to ``select()`` for reading."""
        fds = []
        if self._listener is not None and time.monotonic() >= self._accept_paused_until:
            fds.append(self._listener.fileno())
        for c in self._clients.values():
            # Backpressure: a client that does not read its replies is not read either.
            if not c.eof and len(c.outbuf) < MAX_OUTBUF:
                fds.append(c.fd)
        return fds

    def write_fds(self) -> list[int]:
        """Descriptors to ``select()`` for writing (clients with unsent replies)."""
        return [c.fd for c in self._clients.values() if c.outbuf]

    def next_timeout(self) -> float | None:
        """Seconds until :meth:`expire` has work to do (a ``select`` timeout), or None."""
        if not self._clients and time.monotonic() >= self._accept_paused_until:
            return None
        now = time.monotonic()
        deadlines = [c.linger_until if c.wr_shut else c.last_active + self.client_timeout
                     for c in self._clients.values()]
        if now < self._accept_paused_until:
            deadlines.append(self._accept_paused_until)
        return max(0.0, min(deadlines) - now) if deadlines else None

    def process(self, readable: Iterable[int], writable: Iterable[int]) -> None:
        """Accept, read, handle and write whatever is ready; never blocks. Also runs :meth:`expire`."""
        readable = set(readable)
        writable = set(writable)
        if self._listener is not None and self._listener.fileno() in readable:
            self._accept()
        for fd in readable:
            client = self._clients.get(fd)
            if client is not None:
                self._read(client)
        for fd in writable:
            client = self._clients.get(fd)
            if client is not None and client.outbuf:
                self._pump(client)
        self.expire()

    def serve_once(self, timeout: float | None = None) -> None:
        """One ``select`` round on the server's own descriptors (for tests and simple loops)."""
        wait = self.next_timeout()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        rfds, wfds = self.read_fds(), self.write_fds()
        try:
            r, w, _ = select.select(rfds, wfds, [], wait)
        except InterruptedError:
            return
        self.process(r, w)

    def expire(self) -> None:
        """Close clients silent for longer than ``client_timeout`` (after a ``timeout`` error if it fits)."""
        now = time.monotonic()
        for client in list(self._clients.values()):
            if client.wr_shut:
                if now >= client.linger_until:
                    self._drop(client)
            elif now - client.last_active >= self.client_timeout:
                if not client.closing:
                    log.info("control: closing idle client uid=%d pid=%d", client.peer.uid, client.peer.pid)
                    try:
                        client.sock.send(encode_reply(error_reply("timeout")))
                    except OSError:
                        pass
                self._drop(client)

    # ------------------------------------------------------------ internals
    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # bounded, so a connection storm cannot starve the main loop
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable; stop polling it briefly instead of spinning.
                    log.warning("control: cannot accept (%s); pausing accepts", exc)
                    self._accept_paused_until = time.monotonic() + 0.5
                    return
                continue  # ECONNABORTED and friends: that client is gone
            sock.setblocking(False)
            try:
                peer = _peercred(sock)
            except OSError:
                sock.close()
                continue
            if len(self._clients) >= self.max_clients:
                log.warning("control: too many clients (%d); refusing uid=%d pid=%d",
                            len(self._clients), peer.uid, peer.pid)
                try:
                    sock.send(encode_reply(error_reply("busy: too many control clients, try again")))
                except OSError:
                    pass
                sock.close()
                continue
            client = _Client(sock, peer, time.monotonic())
            self._clients[client.fd] = client
            if not self._allowed(peer, sock):
                log.warning("control: permission denied for uid=%d gid=%d pid=%d", peer.uid, peer.gid, peer.pid)
                self._fatal(client, "permission denied")
            self._pump(client)

    def _allowed(self, peer: Peer, sock: socket.socket) -> bool:
        if peer.uid == 0 or peer.uid == self._uid or peer.uid in self.allowed_uids:
            return True
        if self.allowed_gids:
            if peer.gid in self.allowed_gids:
                return True
            if _peer_groups(sock, peer.pid) & self.allowed_gids:
                return True
        return False

    def _read(self, client: _Client) -> None:
        for _ in range(4):  # at most 256 KiB per round, to stay fair to other clients
            try:
                data = client.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(client)
                return
            if not data:
                client.eof = True
                if client.inbuf and not client.closing:
                    client.inbuf += b"\n"  # a last request without its newline still counts
                break
            client.last_active = time.monotonic()
            if client.closing:
                continue  # draining input we will not handle
            client.inbuf += data
            if len(client.inbuf) > self.max_line and b"\n" not in client.inbuf:
                break  # will be refused in _pump; no point reading more now
        self._pump(client)

    def _fatal(self, client: _Client, message: str) -> None:
        client.inbuf.clear()
        client.outbuf += encode_reply(error_reply(message))
        client.closing = True

    def _handle_lines(self, client: _Client) -> None:
        while not client.closing and len(client.outbuf) < MAX_OUTBUF:
            nl = client.inbuf.find(b"\n")
            if nl < 0:
                if len(client.inbuf) > self.max_line:
                    self._refuse_long(client)
                return
            if nl > self.max_line:
                self._refuse_long(client)
                return
            line = bytes(client.inbuf[:nl]).strip()
            del client.inbuf[: nl + 1]
            if not line:
                continue  # blank lines are harmless keep-alives
            reply = handle_line(line, self.handler, client.peer)
            try:
                data = encode_reply(reply)
            except (TypeError, ValueError) as exc:
                log.error("control: cannot encode reply: %s", exc)
                data = encode_reply(error_reply(f"internal error: {type(exc).__name__}"))
            client.outbuf += data

    def _refuse_long(self, client: _Client) -> None:
        log.warning("control: request over %d bytes from uid=%d pid=%d; closing",
                    self.max_line, client.peer.uid, client.peer.pid)
        self._fatal(client, f"request too long (over {self.max_line} bytes)")

    def _pump(self, client: _Client) -> None:
        """Handle complete lines, send what we can, and close when the conversation is over."""
        if client.fd not in self._clients:
            return
        self._handle_lines(client)
        if client.outbuf:
            try:
                sent = client.sock.send(client.outbuf)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:  # EPIPE/ECONNRESET: the client left
                self._drop(client)
                return
            if sent:
                del client.outbuf[:sent]
                client.last_active = time.monotonic()
                if not client.outbuf and client.inbuf and not client.closing:
                    self._pump(client)  # resume lines held back by backpressure
                    return
        if client.outbuf:
            return
        if client.eof and (client.closing or not client.inbuf):
            self._drop(client)
        elif client.closing and not client.wr_shut:
            # Reply delivered: signal EOF, then drain input briefly so the
            # close does not turn into ECONNRESET on the client's side.
            try:
                client.sock.shutdown(socket.SHUT_WR)
            except OSError:
                self._drop(client)
                return
            client.wr_shut = True
            client.linger_until = time.monotonic() + min(LINGER_S, self.client_timeout)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.fd, None)
        try:
            client.sock.close()
        except OSError:
            pass
