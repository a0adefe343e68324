"""The supervisor's forked children: the records it keeps of them and the pipe plumbing.

Everything :class:`smsd.supervisor.Supervisor` needs to fork a child and hear
from it: the :class:`WorkerProc` and :class:`Child` records, forking a worker
(status lines on a pipe) or a discovery/admin child (one JSON answer on a
pipe), closing the supervisor's descriptors in a fresh child, reading the
pipes without blocking, and a child's RSS.  It is apart from the supervisor
so that the arbiter reads as lifecycle, signals, loop and reaping, while the
fork-safety details (what a child may keep open, how it never unwinds into
the supervisor's code) sit in one place.  Nothing here keeps state of its
own: the supervisor owns the records and reaps every child itself.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil

from .config import Settings
from .sdnotify import unset_environment
from .worker import die_with_parent, run_worker

log = logging.getLogger("smsd.supervisor")


@dataclass
class WorkerProc:
    """A live worker as the supervisor sees it."""

    pid: int
    user_id: str
    fd: int
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    buf: bytes = b""
    status: dict = field(default_factory=dict)
    term_sent: float | None = None
    recycle_reason: str | None = None


@dataclass
class Child:
    """A discovery or admin child: its pid and the pipe its JSON answer comes on."""

    pid: int
    fd: int
    kind: str
    started: float = field(default_factory=time.monotonic)
    buf: bytes = b""
    generation: int = 0
    done: bool = False
    answer: Any = None   # the parsed JSON answer, once done (None: none or unreadable)


def close_fds(keep: set[int]) -> None:
    """In a fresh child: close the supervisor's fds (socket, pipes), keep stdio and log files."""
    keep = set(keep) | {0, 1, 2}
    for handler in logging.getLogger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(stream, "fileno"):
            try:
                keep.add(stream.fileno())
            except (OSError, ValueError):
                pass
    # Finalize inherited garbage now, while its descriptors are still its own:
    # e.g. the EmbeddedMongo, kept alive by a traceback cycle of its start-up
    # pings, owns the server's log file object; collected later, it would close
    # whatever reuses that fd number (a journal's WAL: "disk I/O error").
    gc.collect()
    last = 3
    for fd in sorted(keep):
        if fd >= last:
            os.closerange(last, fd)
            last = fd + 1
    os.closerange(last, 65536)


def start_worker(settings: Settings, user_id: str, parent_pid: int, mongo_uri: str | None,
                 close_inherited: Callable[..., None]) -> WorkerProc:
    """Fork a worker for ``user_id``; the parent gets its record (the read end of its status pipe)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            os.close(r)
            close_inherited(keep={w})
            unset_environment(os.environ)
        finally:
            run_worker(settings, user_id, w, parent_pid, mongo_uri)
    os.close(w)
    os.set_blocking(r, False)
    os.set_inheritable(r, False)
    return WorkerProc(pid=pid, user_id=user_id, fd=r)


def start_child(kind: str, fn: Callable[[], dict], parent_pid: int,
                close_inherited: Callable[..., None], signals: Iterable[int]) -> Child:
    """Fork a child that runs ``fn`` and writes its answer as JSON on a pipe, then exits."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            die_with_parent(parent_pid)   # never outlive a killed supervisor
            close_inherited(keep={w})
            for sig in signals:
                signal.signal(sig, signal.SIG_DFL)
            answer = json.dumps(fn(), default=str).encode()
            with os.fdopen(w, "wb") as out:
                out.write(answer)
            code = 0
        except BaseException:  # noqa: BLE001 - never unwind into the supervisor
            log.exception("%s child failed", kind)
        finally:
            os._exit(code)
    os.close(w)
    os.set_blocking(r, False)
    return Child(pid=pid, fd=r, kind=kind)


def read_status(w: WorkerProc) -> None:
    """Read what a worker sent; its newest complete line becomes its status."""
    try:
        data = os.read(w.fd, 65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        return   # EOF: the worker is exiting; reap() will see it
    w.last_seen = time.monotonic()
    w.buf += data
    *lines, w.buf = w.buf.split(b"\n")
    for line in lines[-1:]:
        try:
            w.status = json.loads(line)
        except ValueError:
            log.warning("worker %d sent an unreadable status line", w.pid)


def read_answer(child: Child, final: bool = False) -> bool:
    """Read a child's pipe; True when its answer has just completed (``child.answer``).

    ``final``: the child is reaped, so what the pipe holds is all there is.
    """
    while not child.done:
        try:
            data = os.read(child.fd, 65536)
        except BlockingIOError:
            if not final:
                return False
            data = b""
        except OSError:
            data = b""
        if data:
            child.buf += data
            continue
        child.done = True
        try:
            child.answer = json.loads(child.buf) if child.buf else None
        except ValueError:
            child.answer = None
        return True
    return False


def rss(pid: int) -> int:
    """A process's resident set size in bytes (0 when it is gone)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
