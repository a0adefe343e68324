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
from .worker import WORKER_SIGNALS, die_with_parent, run_worker

log = logging.getLogger("smsd.supervisor")


@dataclass
class WorkerProc:
    """A live worker as the supervisor sees it: busy with ``user_id``, or idle (``None``).

    In a group turn (trickle batching) ``user_id`` is the first of its users whose
    turn has not ended (the one its heartbeats describe) and ``group`` the others.
    """

    pid: int
    user_id: str | None
    fd: int                      # status pipe, read end
    cmd_fd: int = -1             # command pipe, write end: the next user goes here
    started: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    buf: bytes = b""
    status: dict = field(default_factory=dict)
    term_sent: float | None = None
    recycle_reason: str | None = None
    turns: int = 0
    retire: bool = False         # end it once idle (reload: it keeps the settings it was forked with)
    rss_checked: float = 0.0     # monotonic time of the last RSS look (WorkerPool.check_workers)
    events: list = field(default_factory=list)   # turn ends read, not yet handled
    group: list = field(default_factory=list)    # the other users of a group turn, not yet ended

    def users(self) -> list[str]:
        """Every user whose turn this worker has not ended yet."""
        return ([self.user_id] if self.user_id is not None else []) + list(self.group)

    def end_turn(self, user_id: str) -> bool:
        """``user_id``'s turn ended; True when the worker has no user left (idle)."""
        if user_id == self.user_id:
            self.user_id = self.group.pop(0) if self.group else None
            self.status = {}   # the heartbeats describe the new first user from now on
        elif user_id in self.group:
            self.group.remove(user_id)
        return self.user_id is None


def running_users(workers: Iterable[WorkerProc]) -> dict[str, WorkerProc]:
    """Each user in a turn now, with the worker serving it."""
    return {u: w for w in workers for u in w.users()}


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
    # Inherited garbage is never finalized here (fork() froze it): e.g. the
    # EmbeddedMongo, kept alive by a traceback cycle of its start-up pings, owns
    # the server's log file object; collected in the child after this, it would
    # close whatever reuses that fd number (a journal's WAL: "disk I/O error").
    last = 3
    for fd in sorted(keep):
        if fd >= last:
            os.closerange(last, fd)
            last = fd + 1
    os.closerange(last, 65536)


#: What the SDK imports only on a client's first use (its chat resources; its HTTP
#: transport's core): about half a second of CPU in each worker that did it itself.
LAZY_SDK_MODULES = ("openai.resources.chat.chat", "openai.resources.chat.completions.completions", "httpcore2",
                    "httpcore")


def preload() -> None:
    """Import now what an LLM client would import on its first call.

    The supervisor calls this once, before it forks: every worker then shares
    the modules (copy-on-write) instead of importing them again in each process.
    A module this SDK version does not have is skipped.
    """
    import importlib
    for name in LAZY_SDK_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue


def fork() -> int:
    """``os.fork()`` with the parent's objects frozen for the child's garbage collector.

    The child never collects (so never finalizes) what it inherited: a cycle that
    owns a file descriptor cannot close a number the child has reused, and the
    collector does not walk -- and so copy, page by page -- the parent's heap.
    A full ``gc.collect()`` in each child did the first at the price of the
    second: with a discovery child every few seconds it was 3 of the 30 s that
    smsd's processes held the GIL in a 300-user run (py-spy).  The parent
    unfreezes at once, so its own garbage is collected as before.
    """
    gc.freeze()
    try:
        pid = os.fork()
    except BaseException:
        gc.unfreeze()
        raise
    if pid != 0:
        gc.unfreeze()
    return pid


def start_worker(settings: Settings, parent_pid: int, mongo_uri: str | None,
                 close_inherited: Callable[..., None]) -> WorkerProc:
    """Fork an idle worker; the parent gets its record (status read end, command write end)."""
    r, w = os.pipe()
    cmd_r, cmd_w = os.pipe()
    # Until the worker has its own handlers, a SIGTERM (a drain starting right now)
    # would run the supervisor's inherited handler in the child and be lost: the
    # worker would then ignore the drain.  Blocked across the fork, it stays pending
    # and reaches the worker's handler once _serve unblocks it (WORKER_SIGNALS).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
    try:
        pid = fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:  # the worker
        try:
            os.close(r)
            os.close(cmd_w)
            close_inherited(keep={w, cmd_r})
            unset_environment(os.environ)
        finally:
            run_worker(settings, cmd_r, w, parent_pid, mongo_uri)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(w)
    os.close(cmd_r)
    for fd in (r, cmd_w):
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    return WorkerProc(pid=pid, user_id=None, fd=r, cmd_fd=cmd_w)


def assign(w: WorkerProc, user_ids: list[str]) -> bool:
    """Hand a turn (one user, or a group) to an idle worker; False if its pipe is gone (it is dying)."""
    msg = {"user_id": user_ids[0]} if len(user_ids) == 1 else {"user_ids": list(user_ids)}
    try:
        os.write(w.cmd_fd, (json.dumps(msg) + "\n").encode())
    except OSError:   # BlockingIOError cannot happen: an idle worker's pipe is empty
        return False
    w.user_id = user_ids[0]
    w.group = list(user_ids[1:])
    w.turns += 1
    w.status = {}
    return True


def close_worker_fds(w: WorkerProc) -> None:
    """The supervisor's ends of a reaped worker's pipes."""
    for fd in (w.fd, w.cmd_fd):
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
    w.fd = w.cmd_fd = -1


def start_child(kind: str, fn: Callable[[], dict], parent_pid: int,
                close_inherited: Callable[..., None], signals: Iterable[int]) -> Child:
    """Fork a child that runs ``fn`` and writes its answer as JSON on a pipe, then exits."""
    r, w = os.pipe()
    pid = fork()
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
    """Read what a worker sent: turn ends queue in ``w.events``; the newest heartbeat is its status."""
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
    for line in lines:
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("worker %d sent an unreadable status line", w.pid)
            continue
        if "turn_over" in msg:
            w.events.append(msg)   # every turn end counts, not only the newest line
        elif msg.get("user_id") == w.user_id:
            w.status = msg         # (an idle line sent just before it took its next user is not news)


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
