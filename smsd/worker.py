"""A worker process: owns one user for one turn, runs its pipeline, reports.

The supervisor forks a worker per user.  The worker never returns into the
supervisor's code: :func:`run_worker` ends with ``os._exit``.  It

* dies with its parent (``PR_SET_PDEATHSIG`` plus a ``getppid`` check on
  every tick), so an orphan never keeps writing;
* holds the user's journal lock, so a replacement cannot write beside an
  orphan that has not died yet (it exits with :data:`EXIT_LOCKED` instead);
* opens its own MongoDB client and LLM client after the fork;
* reports a JSON line on its status pipe about once a second: that line is
  the heartbeat the supervisor's ``worker_timeout`` watches.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import threading
import time
from typing import Callable

from .batch import run_phase
from .config import Settings
from .extractor import build_extractor, build_rate_limiter
from .journal import Journal, JournalLocked
from .logsetup import bind_context
from .pipeline import Pipeline
from .store import Store

log = logging.getLogger("smsd.worker")

EXIT_DONE = 0            # the user has nothing pending (or the run was drained)
EXIT_ERROR = 1           # an unexpected exception: counted as a crash
EXIT_MORE = 10           # the turn is over and the user has more: queue again
EXIT_LOCKED = 75         # another process still holds the user's journal
EXIT_MISCONFIGURED = 78  # the LLM refuses the setup (key, model, request): no retry until a reload
EXIT_PARENT_GONE = 76    # the supervisor died

PR_SET_PDEATHSIG = 1
HEARTBEAT_INTERVAL = 1.0


def make_store(settings: Settings, uri: str | None = None) -> Store:
    """A MongoDB store from the settings (call only after any fork)."""
    m = settings.mongo
    return Store(uri or m.uri, m.db, text_field=m.text_field, sender_field=m.sender_field,
                 time_field=m.time_field, timeout_ms=m.timeout_ms,
                 max_text_chars=settings.pipeline.max_text_chars)


def make_pipeline(settings: Settings, user_id: str, journal: Journal, store: Store, *,
                  stop: threading.Event, abort: threading.Event,
                  on_tick: Callable[[Pipeline], None] | None = None,
                  owner: str = "", epoch: int = 0) -> Pipeline:
    """A pipeline for one user with the extractor and rate limit the settings ask for."""
    extractor = build_extractor(settings, build_rate_limiter(settings))
    return Pipeline(user_id=user_id, journal=journal, store=store, extractor=extractor,
                    settings=settings, stop=stop, abort=abort, on_tick=on_tick,
                    owner=owner, epoch=epoch)


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
    """Writes the worker's status line (its heartbeat) to the supervisor's pipe."""

    def __init__(self, fd: int, parent_pid: int, user_id: str) -> None:
        self.fd = fd
        self.parent_pid = parent_pid
        self.user_id = user_id
        self.last = 0.0
        self.last_stats = 0.0
        self.journal_stats: dict = {}

    def tick(self, pipeline: Pipeline, state: str | None = None, force: bool = False) -> None:
        if os.getppid() != self.parent_pid:
            os._exit(EXIT_PARENT_GONE)   # the supervisor is gone: never write as an orphan
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
               "mongo_ok": pipeline.mongo_ok, "journal": self.journal_stats,
               "latency": {name: h.to_wire() for name, h in pipeline.latency.items()}}
        if s.config_error is not None:   # the supervisor shows it: `llm: misconfigured`
            msg.update(state="llm misconfigured", llm_error=str(s.config_error), llm_hint=s.config_error.hint)
        self.send(msg)

    def send(self, msg: dict) -> None:
        data = (json.dumps(msg, default=str) + "\n").encode()
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            pass   # the supervisor is behind; a dropped heartbeat is harmless
        except OSError:
            os._exit(EXIT_PARENT_GONE)


def run_worker(settings: Settings, user_id: str, status_fd: int, parent_pid: int,
               mongo_uri: str | None = None) -> None:
    """The body of a forked worker.  Never returns: exits the process."""
    code = EXIT_ERROR
    try:
        code = _work(settings, user_id, status_fd, parent_pid, mongo_uri)
    except BaseException:  # noqa: BLE001 - a worker must never unwind into the supervisor
        log.exception("worker for user %s crashed", user_id)
        code = EXIT_ERROR
    finally:
        logging.shutdown()
        os._exit(code)


def _work(settings: Settings, user_id: str, status_fd: int, parent_pid: int,
          mongo_uri: str | None) -> int:
    die_with_parent(parent_pid)
    bind_context(user_id=user_id)   # every JSON log line of this worker names its user
    stop, abort = threading.Event(), threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())               # drain
    signal.signal(signal.SIGQUIT, lambda *_: (stop.set(), abort.set()))  # fast stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C reaches the whole group; the supervisor decides
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    os.set_blocking(status_fd, False)
    try:
        journal = Journal.open(settings.state_dir, user_id, wait=2.0,
                               synchronous=settings.journal.synchronous)
    except JournalLocked as exc:
        log.warning("user %s: journal busy (%s); the supervisor will try again", user_id, exc)
        return EXIT_LOCKED
    store = make_store(settings, mongo_uri)
    reporter = _Reporter(status_fd, parent_pid, user_id)
    pipeline = make_pipeline(settings, user_id, journal, store, stop=stop, abort=abort,
                             on_tick=reporter.tick)
    try:
        # Batch mode: one step of the user's Batch API jobs (never a wait), then the
        # pipeline flushes what they answered; in "batch" mode it asks nothing online.
        batched = run_phase(pipeline, wait=False)
        online = 0 if settings.llm.mode == "batch" and batched is not None else settings.pipeline.worker_max_sms
        summary = pipeline.run(resume=True, max_sms=online)
        reporter.tick(pipeline, state="exiting", force=True)
    finally:
        journal.close()
        store.close()
    log.info("user %s: turn over: %s, %d/%d processed, %d asked, %d quarantined",
             user_id, summary.status, summary.processed_sms, summary.total_sms,
             summary.asked_sms, summary.quarantined)
    if summary.config_error is not None:
        return EXIT_MISCONFIGURED
    if summary.status == "completed" or summary.stopped:
        return EXIT_DONE
    if batched is not None and batched.open and summary.asked_sms == 0:
        return EXIT_DONE   # only waiting for a batch: discovery brings the user back, polls are paced
    return EXIT_MORE
