"""A worker process: long-lived, takes one user's turn at a time from the supervisor.

Why pre-forked workers (and not one fork per user turn, as before): most users
of a 24/7 deployment have a few new SMS at a time, and a turn of a 3-SMS user
costs one LLM call and a handful of MongoDB commands.  Forking a process for it
added a fork, a Python start-up of the worker's modules, a new MongoClient
(connection, handshake, ``hello``, monitor threads) and a new LLM client
(HTTP connection pool, TLS in production) -- more than the user's own work.  A
worker that lives across turns keeps its MongoClient and LLM client warm and
pays only what a turn needs (journal open, checkpoint, the SMS themselves).

What stays as it was, on purpose:

* one user at a time per worker, and the user's journal ``flock`` taken for the
  turn and released at its end, so an orphan and its replacement can never
  write for the same user at once (a busy journal ends the turn with
  :data:`EXIT_LOCKED`);
* a crashing user is isolated: an exception in a turn (or a SIGKILL) ends the
  worker process, never the supervisor; the supervisor starts a fresh worker
  and applies its back-off to that user, exactly as when workers were per turn;
* it dies with its parent (``PR_SET_PDEATHSIG`` plus a ``getppid`` check on
  every tick), and exits when its command pipe reaches EOF;
* it reports a JSON line on its status pipe about once a second, busy or idle:
  that line is the heartbeat ``worker_timeout`` watches; RSS recycling retires
  the worker: the supervisor lets its current turn end, then sends the SIGTERM
  that ends an idle worker;
* a SIGTERM never gets lost, even one sent while the worker is being forked:
  the supervisor blocks :data:`WORKER_SIGNALS` across the fork and the worker
  unblocks them once its own handlers are in place.

The protocol, one JSON object per line: the supervisor writes ``{"user_id": U}``
on the worker's command pipe, or ``{"user_ids": [U1, ..., Uk]}`` for a group
turn of small users (trickle batching, :mod:`smsd.worker_group`); the worker
answers on its status pipe with heartbeats (``user_id`` is ``None`` while idle)
and, at the end of each user's turn (every user of a group has its own),
``{"turn_over": U, "code": EXIT_DONE | EXIT_MORE | EXIT_LOCKED | EXIT_MISCONFIGURED, ...}``.
SIGTERM drains (the current turn ends, then the process exits), SIGQUIT
aborts waits too.

Several hosts: a turn takes the user's lease before any paid call and keeps it
while it works (:mod:`smsd.lease_worker`); every write carries the lease's
epoch, so MongoDB refuses it once a newer owner has the user
(:mod:`smsd.fencing`).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import threading
import time
from typing import Any, Callable

from .batch import run_phase
from .config import Settings
from .extractor import build_extractor, build_rate_limiter
from .exit_codes import (EXIT_DONE, EXIT_ERROR, EXIT_LEASED, EXIT_LOCKED,  # noqa: F401 - re-exported
                         EXIT_MISCONFIGURED, EXIT_MORE, EXIT_PARENT_GONE, EXIT_STALE)
from .failpoints import failpoint
from .fencing import FencedStore
from .journal import Journal, JournalLocked
from .lease_worker import WorkerLease
from .logsetup import bind_context
from .pipeline import Extractor, HandoverBox, Pipeline, StaleEpoch
from .store import Store
from .worker_group import run_group

log = logging.getLogger("smsd.worker")

PR_SET_PDEATHSIG = 1
HEARTBEAT_INTERVAL = 1.0
#: Blocked by the supervisor across the fork (smsd.children.start_worker) and
#: unblocked once the worker's own handlers are in place, so none is lost.
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGHUP})


def make_store(settings: Settings, uri: str | None = None, *, fenced: bool = False) -> Store:
    """A MongoDB store from the settings (call only after any fork); ``fenced``: epoch-filtered writes."""
    m = settings.mongo
    kind = FencedStore if fenced else Store
    return kind(uri or m.uri, m.db, text_field=m.text_field, sender_field=m.sender_field,
                time_field=m.time_field, timeout_ms=m.timeout_ms,
                max_text_chars=settings.pipeline.max_text_chars)


def make_extractor(settings: Settings) -> Extractor:
    """The extractor (LLM client or rules) with the host-wide rate limit the settings ask for."""
    return build_extractor(settings, build_rate_limiter(settings))


def make_pipeline(settings: Settings, user_id: str, journal: Journal, store: Store, *,
                  stop: threading.Event, abort: threading.Event,
                  on_tick: Callable[[Pipeline], None] | None = None,
                  owner: str = "", epoch: int = 0,
                  extractor: Extractor | None = None, handover: HandoverBox | None = None,
                  start: Any = None) -> Pipeline:
    """A pipeline for one user; ``extractor`` lets a long-lived worker reuse its LLM client.

    With a :class:`~smsd.fencing.FencedStore` the flush's first write is its claim.
    """
    fence = store.claim if isinstance(store, FencedStore) else None
    return Pipeline(user_id=user_id, journal=journal, store=store,
                    extractor=extractor or make_extractor(settings),
                    settings=settings, stop=stop, abort=abort, on_tick=on_tick,
                    owner=owner, epoch=epoch, fence=fence, handover=handover, start=start)


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the supervisor dies; exit if it already has."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the getppid check below still works
        pass
    if os.getppid() != parent_pid:
        os._exit(EXIT_PARENT_GONE)


class _Reporter:
    """Writes the worker's status lines (its heartbeat, turn ends) to the supervisor's pipe."""

    def __init__(self, fd: int, parent_pid: int) -> None:
        self.fd = fd
        self.parent_pid = parent_pid
        self.user_id: str | None = None
        self.last = 0.0
        self.last_stats = 0.0
        self.journal_stats: dict = {}
        self.lease: Callable[[], dict] = dict    # the lease for the status line
        self._lock = threading.Lock()            # a group turn's pipelines report from their threads

    def for_member(self, user_id: str) -> "_Reporter":
        """A reporter for one pipeline of a group turn: same pipe and lock, its own user."""
        r = _Reporter(self.fd, self.parent_pid)
        r._lock = self._lock
        r.user_id = user_id
        return r

    def check_parent(self) -> None:
        if os.getppid() != self.parent_pid:
            os._exit(EXIT_PARENT_GONE)   # the supervisor is gone: never write as an orphan

    def tick(self, pipeline: Pipeline, state: str | None = None, force: bool = False) -> None:
        self.check_parent()
        now = time.monotonic()
        if not force and now - self.last < HEARTBEAT_INTERVAL:
            return
        self.last = now
        if now - self.last_stats > 2.0 or force:
            self.journal_stats = pipeline.journal.stats()
            self.last_stats = now
        s = pipeline.summary
        msg = {"user_id": self.user_id, "pid": os.getpid(), "t": time.time(),
               "state": state or ("draining" if pipeline.stop.is_set() else
                                  "mongo-down" if not pipeline.mongo_ok else "working"),
               "total_sms": s.total_sms, "processed_sms": s.processed_sms,
               "asked_sms": s.asked_sms, "quarantined": s.quarantined,
               "newly_processed": s.newly_processed,
               "mongo_ok": pipeline.mongo_ok, "journal": self.journal_stats, "lease": self.lease(),
               "latency": {name: h.to_wire() for name, h in pipeline.latency.items()}}
        if s.config_error is not None:   # the supervisor shows it: `llm: misconfigured`
            msg.update(state="llm misconfigured", llm_error=str(s.config_error), llm_hint=s.config_error.hint)
        self.send(msg)

    def idle(self) -> None:
        """Heartbeat while waiting for the next user."""
        self.check_parent()
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_INTERVAL:
            self.last = now
            self.send({"user_id": None, "pid": os.getpid(), "t": time.time(), "state": "idle"})

    def beat(self, state: str) -> None:
        """A heartbeat of a turn before it has a pipeline (waiting for the lease)."""
        self.check_parent()
        now = time.monotonic()
        if now - self.last >= HEARTBEAT_INTERVAL:
            self.last = now
            self.send({"user_id": self.user_id, "pid": os.getpid(), "t": time.time(), "state": state})

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg, default=str) + "\n").encode()
        with self._lock:   # one whole line at a time, whichever thread writes
            self._write(data, "turn_over" in msg)

    def _write(self, data: bytes, must_arrive: bool) -> None:
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            if must_arrive:   # the end of a turn must arrive: wait for room
                os.set_blocking(self.fd, True)
                try:
                    os.write(self.fd, data)
                except OSError:
                    os._exit(EXIT_PARENT_GONE)
                finally:
                    os.set_blocking(self.fd, False)
            # a dropped heartbeat is harmless: the supervisor is behind
        except OSError:
            os._exit(EXIT_PARENT_GONE)


def run_worker(settings: Settings, cmd_fd: int, status_fd: int, parent_pid: int,
               mongo_uri: str | None = None) -> None:
    """The body of a forked worker.  Never returns: exits the process."""
    code = EXIT_ERROR
    try:
        code = _serve(settings, cmd_fd, status_fd, parent_pid, mongo_uri)
    except BaseException:  # noqa: BLE001 - a worker must never unwind into the supervisor
        log.exception("worker %d crashed", os.getpid())
        code = EXIT_ERROR
    finally:
        logging.shutdown()
        os._exit(code)


class _Commands:
    """The read side of the command pipe: the next user, or None at EOF."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = b""
        self.eof = False

    def next_turn(self, stop: threading.Event, reporter: _Reporter) -> list[str] | None:
        """The users of the next turn (one, or a group), or None at EOF or a drain."""
        while not stop.is_set():
            line, sep, rest = self.buf.partition(b"\n")
            if sep:
                self.buf = rest
                msg: Any = json.loads(line)
                if "user_ids" in msg:
                    return [str(u) for u in msg["user_ids"]]
                return [str(msg["user_id"])]
            if self.eof:
                return None
            reporter.idle()
            ready, _, _ = select.select([self.fd], [], [], HEARTBEAT_INTERVAL / 2)
            if ready:
                data = os.read(self.fd, 4096)
                self.buf += data
                self.eof = not data
        return None


def _serve(settings: Settings, cmd_fd: int, status_fd: int, parent_pid: int,
           mongo_uri: str | None) -> int:
    die_with_parent(parent_pid)
    failpoint("worker_forked")
    stop, abort = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())               # drain
    signal.signal(signal.SIGQUIT, lambda *_: (stop.set(), abort.set()))  # fast stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group; the supervisor decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    # A drain that began while we were being forked is pending: it sets ``stop`` now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
    os.set_blocking(status_fd, False)
    # Kept for the worker's whole life: the reason it is pre-forked (module docstring).
    store = make_store(settings, mongo_uri, fenced=True)
    extractor = make_extractor(settings)
    reporter = _Reporter(status_fd, parent_pid)
    commands = _Commands(cmd_fd)
    try:
        while True:
            users = commands.next_turn(stop, reporter)
            if users is None:
                return EXIT_DONE
            if len(users) > 1:
                run_group(settings, users, store, extractor, reporter, stop, abort, _turn)
                reporter.last = 0.0
                continue
            user_id = users[0]
            reporter.user_id = user_id
            bind_context(user_id=user_id)   # every JSON log line of this turn names its user
            code, info = _turn(settings, user_id, store, extractor, reporter, stop, abort)
            reporter.send({"turn_over": user_id, "code": code, "pid": os.getpid(), **info})
            reporter.user_id = None
            reporter.lease = dict
            bind_context(user_id=None)
            reporter.last = 0.0
    finally:
        store.close()


def _turn(settings: Settings, user_id: str, store: Store, extractor: Extractor,
          reporter: _Reporter, stop: threading.Event, abort: threading.Event,
          start: Any = None) -> tuple[int, dict]:
    """One user's turn: lock and open its journal, run its pipeline, close; (code, counts).

    ``start``: a group turn's :class:`smsd.group_start.Member` (journal open, lease taken,
    the run's start read by the group's prologue).
    """
    if start is not None:
        journal, lease = start.journal, start.lease_for(store)
    else:
        try:
            journal = Journal.open(settings.state_dir, user_id, wait=2.0,
                                   synchronous=settings.journal.synchronous,
                                   background_sync=settings.journal.background_sync)
        except JournalLocked as exc:
            log.warning("user %s: journal busy (%s); the supervisor will try again", user_id, exc)
            return EXIT_LOCKED, {}
        lease = WorkerLease(settings, store, user_id)
    try:
        if not lease.acquire(stop, reporter.beat):
            if not stop.is_set():
                lease.hand_over(journal)
                log.info("user %s: lease held by another host", user_id)
            return (EXIT_DONE if stop.is_set() else EXIT_LEASED), {"journal": journal.stats()}
        lease.prepare()
        lease.keep(on_lost=lambda why: stop.set())   # drain; MongoDB refuses what is stale
        reporter.lease = lease.status
        pipeline = make_pipeline(settings, user_id, journal, store, stop=stop, abort=abort,
                                 on_tick=reporter.tick, extractor=extractor, owner=lease.host,
                                 epoch=lease.lease.epoch, handover=lease.handover(),
                                 start=start.pre if start is not None else None)
        pipeline.may_pay = lease.may_pay
        try:
            # Batch mode: one step of the user's Batch API jobs (never a wait), then the
            # pipeline flushes what they answered; in "batch" mode it asks nothing online.
            batched = run_phase(pipeline, wait=False)
            online = 0 if settings.llm.mode == "batch" and batched is not None \
                else settings.pipeline.worker_max_sms
            summary = pipeline.run(resume=True, max_sms=online)
        except StaleEpoch as exc:
            log.warning("user %s: stopped, the user moved to another host: %s", user_id, exc)
            lease.stop()
            lease.hand_over(journal)
            return EXIT_STALE, {"journal": journal.stats()}
        reporter.tick(pipeline, state="exiting", force=True)   # the turn's last figures
        # The forced tick just read the journal's counters: the exit report reuses them.
        info = {"total_sms": summary.total_sms, "processed_sms": summary.processed_sms,
                "journal": reporter.journal_stats}
        lease.stop()
        if lease.lost:
            lease.hand_over(journal)
            return EXIT_STALE, info
        if summary.status == "completed" or summary.stopped:
            lease.release()
    finally:
        lease.stop()
        journal.close()
    log.info("user %s: turn over: %s, %d/%d processed, %d asked, %d quarantined",
             user_id, summary.status, summary.processed_sms, summary.total_sms,
             summary.asked_sms, summary.quarantined)
    if summary.config_error is not None:
        return EXIT_MISCONFIGURED, info
    if summary.status == "completed" or summary.stopped:
        return EXIT_DONE, info
    if batched is not None and batched.open and summary.asked_sms == 0:
        return EXIT_DONE, info   # only waiting for a batch: discovery brings the user back, polls are paced
    return EXIT_MORE, info
