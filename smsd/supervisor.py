"""The supervisor (``smsd run``): one class owns the process lifecycle.

Modelled on gunicorn's arbiter:

* signal handlers only queue the signal and wake the main loop through a
  pipe; each signal has one ``handle_<name>`` method, run from the loop;
* children (workers, discovery and admin children) are reaped in one place,
  :meth:`Supervisor.reap`;
* the supervisor itself never opens a MongoClient and runs no threads, so
  forking a worker is always safe (pymongo is not fork-safe).  Whatever needs
  MongoDB runs in a child: a worker, or a short-lived discovery/admin child
  (:mod:`smsd.discovery`).

The main loop is also the only place that pings systemd's watchdog, so a
stuck loop is a dead service.

Around the class: :mod:`smsd.children` forks the children and reads their
pipes, :mod:`smsd.scheduler` holds the per-user state and decides who gets
a worker next (fair order, back-off, crash loops), :mod:`smsd.workerpool`
keeps the pre-forked workers and hands them turns, and :mod:`smsd.status`
builds the ``smsctl status`` reply and systemd's status line.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable

from . import __version__, discovery, failpoints
from .children import (Child, WorkerProc, close_fds, preload, close_worker_fds, read_answer, read_status,
                       running_users, start_child)
from .config import ConfigError, Settings, load_settings
from .control import CommandError, ControlServer, Peer, UnknownCommand
from .journal_schema import journal_path
from .lease_sched import LeaseView, lease_moved, release_user
from .metrics import CONTENT_TYPE, Figures, Metrics
from .metrics_http import MetricsServer
from .health import Health
from .scheduler import UserState, clear_failures, load_paused, record_crash, save_paused
from .sdnotify import Notifier
from .workerpool import WorkerPool
from .status import open_batches, page_args, status_line, status_reply
from .worker import EXIT_DONE, EXIT_LEASED, EXIT_LOCKED, EXIT_MISCONFIGURED, EXIT_MORE, EXIT_STALE

log = logging.getLogger("smsd.supervisor")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_CONFIG = 78

RUNNING, DRAINING, STOPPING = "running", "draining", "stopping"
ADMIN_TIMEOUT = 10.0
DISCOVERY_TIMEOUT = 120.0
#: Counters read again from this far before the last discovery's read (a write
#: stamped before that read may commit after it).
STATS_OVERLAP = timedelta(seconds=60)
#: How often discovery reads every user's counters, not only the changed ones.
STATS_FULL_REFRESH_S = 600.0


class Supervisor(WorkerPool):
    """Keeps up to ``max_workers`` pre-forked workers, hands each one user's turn at a time,
    replaces the dead (back-off on the user whose turn died), serves smsctl."""

    SIGNALS = {signal.SIGHUP: "hup", signal.SIGQUIT: "quit", signal.SIGINT: "int",
               signal.SIGTERM: "term", signal.SIGCHLD: "chld"}

    def __init__(self, settings: Settings, *, config_path: str | None = None) -> None:
        self.settings = settings
        self.config_path = config_path or settings.source or None
        self.pid = os.getpid()
        self.state = RUNNING
        self.started = time.monotonic()
        self.sig_queue: list[int] = []
        self.workers: dict[int, WorkerProc] = {}
        self.children: dict[int, Child] = {}
        self.users: dict[str, UserState] = {}
        self.generation = 0            # discoveries started
        self.applied_generation = 0    # the newest discovery whose answer is applied
        self.last_discovery = 0.0
        self.discovery_wanted = True
        self.mongo: dict = {"ok": None, "error": "not checked yet"}
        # smsd's indexes: created by a discovery (ok None: not yet; the tick after a start or a reload).
        self.indexes: dict = {"ok": None}
        self.health = Health()         # llm: misconfigured, and how long MongoDB has been down
        # What earlier discoveries saw, so the next one reads only what changed since.
        self.journal_seen: dict[str, list] = {}
        self.ran_at_last_discovery: set[str] = set()
        self.stats_since: datetime | None = None
        self.stats_full_at = 0.0
        self.ready_sent = False
        self.stop_deadline: float | None = None
        self.notifier = Notifier()
        self.watchdog_every = self.notifier.watchdog_interval()
        self.last_watchdog = 0.0
        self.last_status_note = 0.0
        self.embedded = None
        self.mongo_uri: str | None = None
        self.control: ControlServer | None = None
        self.figures = Figures()
        self.metrics: MetricsServer | None = None
        self.wake_r = self.wake_w = -1
        self.lease = LeaseView(settings.state_dir)   # this host's id, the leases as last read

    @property
    def metrics_url(self) -> str | None:
        """Where ``/metrics`` is served (None: off)."""
        return self.metrics.url if self.metrics else None

    # ------------------------------------------------------------- start-up
    def run(self) -> int:
        """Start, loop until drained or stopped, return the exit code."""
        try:
            self.setup()
        except Exception as exc:  # noqa: BLE001 - report any start-up failure plainly
            log.error("start-up failed: %s", exc)
            self.cleanup()
            return EXIT_STARTUP_FAILED
        log.info("smsd %s supervisor %d up: host %s, max_workers=%d, state %s, socket %s", __version__,
                 self.pid, self.lease.host, self.settings.supervisor.max_workers, self.settings.state_dir,
                 self.settings.control_socket)
        try:
            self.loop()
        finally:
            self.cleanup()
        log.info("supervisor %d stopped", self.pid)
        return EXIT_OK

    def setup(self) -> None:
        s = self.settings
        s.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        s.runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.wake_r, self.wake_w = os.pipe()
        for fd in (self.wake_r, self.wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        for sig in self.SIGNALS:
            signal.signal(sig, self._signal)
        self._load_paused()
        preload()   # before any fork: the workers share the SDK's lazy imports
        if s.mongo.uri == "embedded":
            from .embedded import EmbeddedMongo
            path = Path(s.mongo.embedded_path or s.state_dir / "embedded-mongo")
            self.embedded = EmbeddedMongo(path, port=s.mongo.embedded_port,
                                          log_path=path.parent / "embedded-mongo.log")
            self.mongo_uri = self.embedded.start()
            log.info("embedded MongoDB-wire server started (pid %s)", self.embedded.pid)
        self.control = ControlServer(
            s.control_socket, self.handle_command, group=s.supervisor.socket_group or None,
            allowed_uids=s.supervisor.allowed_uids, allowed_gids=s.supervisor.allowed_gids)
        self.control.start()
        if s.supervisor.metrics_listen:
            self.metrics = MetricsServer(s.supervisor.metrics_listen, Metrics(self).body,
                                         content_type=CONTENT_TYPE)
            try:
                self.metrics.start()
            except OSError as exc:
                raise RuntimeError(f"metrics_listen {s.supervisor.metrics_listen}: {exc.strerror or exc}") from exc

    def cleanup(self) -> None:
        if self.control:
            self.control.close()
            self.control = None
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.embedded:
            self.embedded.stop()
            self.embedded = None

    # ----------------------------------------------------------- main loop
    def loop(self) -> None:
        while True:
            self.handle_signals()
            self.reap()
            self.handle_turns()
            if self.state == RUNNING:
                self.maybe_discover()
                self.spawn_workers()
                self.check_embedded()
            self.check_workers()
            self.check_children()
            self.maybe_ready()
            self.ping_watchdog()
            self.note_status()
            if self.state != RUNNING and not self.workers:
                return
            if self.stop_deadline and time.monotonic() > self.stop_deadline:
                self.kill_all(signal.SIGKILL, "stop deadline passed")
                self.stop_deadline = time.monotonic() + 5.0
            self.sleep()

    def sleep(self) -> None:
        """Wait for a signal, a control client, a worker's status line or a child's answer."""
        readers = [self.wake_r] + [w.fd for w in self.workers.values()] + \
                  [c.fd for c in self.children.values() if not c.done]
        writers: list[int] = []
        for server in (self.control, self.metrics):
            if server:
                readers += server.read_fds()
                writers += server.write_fds()
        timeout = 1.0
        if self.watchdog_every:
            timeout = min(timeout, self.watchdog_every / 2)
        now = time.monotonic()
        waiting = [u.next_start for u in self.users.values() if u.next_start > now]
        if waiting and self.state == RUNNING:
            # Wake for the next back-off that ends, so a restart is as prompt as configured.
            timeout = max(0.01, min(timeout, min(waiting) - now))
        try:
            readable, writable, _ = select.select(readers, writers, [], timeout)
        except InterruptedError:
            return
        readable_set, writable_set = set(readable), set(writable)
        if self.wake_r in readable_set:
            try:
                while os.read(self.wake_r, 512):
                    pass
            except BlockingIOError:
                pass
        for w in list(self.workers.values()):
            if w.fd in readable_set:
                read_status(w)
                self.figures.worker_status(w)
        for c in list(self.children.values()):
            if c.fd in readable_set:
                self.read_child(c)
        if self.control:
            self.control.process(readable_set, writable_set)
            self.control.expire()
        if self.metrics:
            self.metrics.process(readable_set, writable_set)

    # ------------------------------------------------------------- signals
    def _signal(self, signum: int, _frame: Any) -> None:
        # Only queue and wake: everything else happens in the main loop.
        if len(self.sig_queue) < 10 or signum != signal.SIGCHLD:
            self.sig_queue.append(signum)
        try:
            os.write(self.wake_w, b".")
        except OSError:
            pass

    def handle_signals(self) -> None:
        while self.sig_queue:
            signum = self.sig_queue.pop(0)
            getattr(self, "handle_" + self.SIGNALS[signum])()

    def handle_chld(self) -> None:
        """Children are reaped on every loop turn; SIGCHLD only wakes the loop."""

    def handle_hup(self) -> None:
        """Reload config.toml; apply what can change live."""
        self.reload()

    def handle_term(self) -> None:
        """Drain: no new LLM calls, in-flight calls finish, flush, exit 0."""
        if self.state == RUNNING:
            self.drain("SIGTERM")
        else:
            self.handle_quit()

    def handle_int(self) -> None:
        """Ctrl-C drains like SIGTERM; a second one stops fast."""
        self.handle_term()

    def handle_quit(self) -> None:
        """Fast stop: workers abort their waits; what is journaled stays safe."""
        if self.state == STOPPING:
            return
        log.info("fast stop")
        self.state = STOPPING
        self.notifier.stopping("fast stop")
        self.kill_all(signal.SIGQUIT, "fast stop")
        self.stop_deadline = time.monotonic() + 5.0

    def drain(self, why: str) -> None:
        log.info("draining (%s): %d workers finish their in-flight calls and flush", why, len(self.workers))
        self.state = DRAINING
        self.notifier.stopping(f"draining ({why})")
        self.kill_all(signal.SIGTERM, "drain")
        for child in list(self.children.values()):
            self._kill(child.pid, signal.SIGKILL)
        self.stop_deadline = time.monotonic() + self.settings.supervisor.drain_timeout

    def reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running settings: %s", exc)
            self.notifier.ready(status_line(self))
            return
        old = self.settings
        # The journal, socket and database cannot move under running workers.
        for section, key in (("journal", "state_dir"), ("supervisor", "runtime_dir"), ("mongo", "uri"),
                             ("supervisor", "metrics_listen"), ("supervisor", "log_format")):
            if getattr(getattr(new, section), key) != getattr(getattr(old, section), key):
                log.warning("reload: %s.%s changes only on restart", section, key)
                setattr(getattr(new, section), key, getattr(getattr(old, section), key))
        self.settings = new
        self.health.reloaded()
        self.indexes = {"ok": None}   # the next discovery creates them again (mongo.db may have changed)
        for w in self.workers.values():
            self.retire(w)   # a worker keeps the settings it was forked with: replace each one
        logging.getLogger().setLevel(new.supervisor.log_level)
        log.info("reloaded %s: max_workers=%d (new workers get the new LLM settings)",
                 self.config_path or "settings", new.supervisor.max_workers)
        self.discovery_wanted = True
        self.notifier.ready(status_line(self))

    def _close_inherited(self, keep: set[int]) -> None:
        """In a fresh child: drop the supervisor's socket and embedded server, close its fds."""
        self.control = None   # the child must not unlink the supervisor's socket
        self.metrics = None
        self.embedded = None
        close_fds(keep)

    # ------------------------------------------------------------- reaping
    def reap(self) -> None:
        """The one place children are reaped: workers, discovery and admin children."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.embedded is not None and pid == self.embedded.pid:
                # Popen.poll() reports a child reaped here as exited (ECHILD).
                log.error("embedded MongoDB-wire server exited (%s)", os.waitstatus_to_exitcode(status))
                continue
            if pid in self.workers:
                self.worker_exited(self.workers.pop(pid), status)
            elif pid in self.children:
                child = self.children[pid]
                self.read_child(child, final=True)
                self.children.pop(pid, None)
                os.close(child.fd)

    def worker_exited(self, w: WorkerProc, status: int) -> None:
        """A worker process ended: its turn (if it had one) ends with its exit status."""
        read_status(w)
        self.turns_over(w)     # the turn ends it reported before it died count first
        close_worker_fds(w)
        code = os.waitstatus_to_exitcode(status)
        if w.user_id is None:
            if code not in (EXIT_DONE,) and self.state == RUNNING:
                log.warning("idle worker %d exited (%s)", w.pid, f"exit {code}" if code >= 0
                            else f"signal {-code}")
            return
        # A group turn's death ends (and backs off) every user whose turn had not ended.
        reasons = [self.turn_ended(w, code, w.status if u == w.user_id else {}, u) for u in w.users()]
        self.figures.worker_exited(w, reasons[0])

    def turn_ended(self, w: WorkerProc, code: int, report: dict, user_id: str) -> str | None:
        """Decide about ``user_id``, whose turn on ``w`` ended with ``code`` (EXIT_* or -signal).

        Returns the restart reason /metrics counts (None: no restart); the caller
        tells the figures once per worker turn.
        """
        user = self.users.setdefault(user_id, UserState(user_id))
        if report:
            user.info.update({k: report[k] for k in ("total_sms", "processed_sms") if k in report})
            if report.get("journal"):
                user.info["journal"] = report["journal"]
        now = time.monotonic()
        restart_reason = "rss" if w.recycle_reason == "rss" else None   # for /metrics
        # An RSS recycle retires the worker after its turn (workerpool): the turn was whole.
        cut_short = w.recycle_reason not in (None, "rss")
        if code == EXIT_DONE and not cut_short:
            user.last_exit = "done"
            user.consecutive_crashes = 0
            user.done_generation = self.generation
            log.info("worker %d (user %s) finished", w.pid, user_id)
        elif code in (EXIT_MORE, EXIT_DONE):
            user.last_exit = "turn over" if code == EXIT_MORE else f"recycled ({w.recycle_reason})"
            user.consecutive_crashes = 0
            user.info["pending_sms"] = max(1, int(user.info.get("pending_sms") or 1))
        elif code == EXIT_MISCONFIGURED:
            # Not the user's fault and not a crash: the LLM refuses our setup.
            user.last_exit = "LLM misconfigured"
            user.info["pending_sms"] = max(1, int(user.info.get("pending_sms") or 1))
            self.health.misconfigured(w.status.get("llm_error"), w.status.get("llm_hint"), user_id)
            if self.ready_sent:
                self.notifier.status(status_line(self))
        elif code in (EXIT_LEASED, EXIT_STALE):
            lease_moved(user, w.pid, stale=code == EXIT_STALE)   # until a discovery says it is free
        elif code == EXIT_LOCKED:
            # An orphan of a previous supervisor still holds the journal; it dies
            # with its parent (PDEATHSIG), so try again shortly.
            user.last_exit = "journal busy"
            user.next_start = now + 1.0
        else:
            why = f"signal {-code}" if code < 0 else f"exit {code}"
            restart_reason = "killed" if code < 0 else "crashed"
            if w.recycle_reason == "hung":
                why, restart_reason = "hung, killed", "hung"
            record_crash(user, self.settings.supervisor, w.pid, why)
        return restart_reason

    # -------------------------------------------------- discovery / admin
    def maybe_discover(self) -> None:
        if any(c.kind == "discovery" for c in self.children.values()):
            return
        due = time.monotonic() - self.last_discovery >= self.settings.supervisor.discovery_interval
        if not (due or self.discovery_wanted):
            return
        self.discovery_wanted = False
        previous, self.last_discovery = self.last_discovery, time.monotonic()
        self.generation += 1
        settings, uri, seen = self.settings, self.mongo_uri, self.journal_seen
        since, check = self.stats_since, self.journals_to_check(previous)
        if time.monotonic() - self.stats_full_at >= STATS_FULL_REFRESH_S:
            since = check = None   # now and then everything, in case a change was missed
        indexes = self.indexes.get("ok") is None
        child = self.fork_child("discovery", lambda: discovery.discover(
            settings, uri, journals_seen=seen, journals_check=check, stats_since=since, indexes=indexes,
            **self.lease.ask(self)))
        child.generation = self.generation

    def journals_to_check(self, since: float) -> set[str]:
        """Journal files a worker may have written since the discovery forked at ``since``.

        Only workers write journals: those running now, those running at the
        previous discovery (they may have written after its scan), and those
        started since.  (``smsd once`` beside the daemon is caught by the
        periodic full look.)
        """
        running = set(running_users(self.workers.values()))
        started = {u.user_id for u in self.users.values() if u.last_served >= since}
        users = running | started | self.ran_at_last_discovery
        self.ran_at_last_discovery = running
        return {journal_path(self.settings.state_dir, u).name for u in users}

    def fork_child(self, kind: str, fn: Callable[[], dict]) -> Child:
        child = start_child(kind, fn, self.pid, self._close_inherited, self.SIGNALS)
        self.children[child.pid] = child
        return child

    def read_child(self, child: Child, final: bool = False) -> None:
        if read_answer(child, final) and child.kind == "discovery":
            self.discovered(child.answer, child.generation)

    def check_children(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if not child.done and now - child.started > DISCOVERY_TIMEOUT:
                log.error("%s child %d took over %.0f s: killing it", child.kind, child.pid, DISCOVERY_TIMEOUT)
                self._kill(child.pid, signal.SIGKILL)
                child.started = now

    def discovered(self, answer: dict | None, generation: int) -> None:
        """Merge one discovery's news (see :func:`smsd.discovery.discover`) into ``users``."""
        if not answer:
            self.mongo = {"ok": False, "error": "discovery failed (see log)"}
            self.health.mongo_seen(False)
            return
        self.mongo = answer.get("mongo", self.mongo)
        self.health.mongo_seen(self.mongo.get("ok"))
        self.applied_generation = max(self.applied_generation, generation)
        running = set(running_users(self.workers.values()))

        def fresher_here(user: UserState) -> bool:
            # Our own worker runs, or finished after this look began: its news is fresher.
            return user.user_id in running or user.done_generation >= generation

        journals = answer.get("journals", {})
        self.figures.discovered({user_id: {"journal": stats} for user_id, stats in journals.items()})
        for user_id, stats in journals.items():
            user = self.users.setdefault(user_id, UserState(user_id))
            if not fresher_here(user):
                user.info["journal"] = stats
        for name, sig in answer.get("journal_seen", {}).items():
            user = self.users.get(sig[-1]) if sig[-1] is not None else None
            if user is None or not fresher_here(user):
                self.journal_seen[name] = sig   # else: read it again next time
        for name, user_id in answer.get("journal_gone", {}).items():
            self.journal_seen.pop(name, None)
            if user_id in self.users and user_id not in journals:
                self.users[user_id].info.pop("journal", None)
        if not self.mongo.get("ok") or "pending" not in answer:
            return
        if "indexes" in answer and self.indexes.get("ok") is None:
            self.indexes_created(answer["indexes"])
        self.figures.discovered(answer.get("counters", {}))
        for user_id, counters in answer.get("counters", {}).items():
            self.users.setdefault(user_id, UserState(user_id)).info["counters"] = counters
        pending = answer["pending"]
        for user_id in pending:
            self.users.setdefault(user_id, UserState(user_id))
        for user_id, user in self.users.items():
            if user_id in pending and user.done_generation >= generation:
                continue
            user.info["pending_sms"] = int(pending.get(user_id, 0))
        through = datetime.fromisoformat(answer["stats_through"])
        self.stats_since = through - STATS_OVERLAP
        if answer.get("counters_all"):
            self.stats_full_at = time.monotonic()
        self.lease.seen(self.users, answer.get("leases"), pending)

    def indexes_created(self, indexes: dict) -> None:
        """Note a discovery's index creation; a refusal is logged once (until a reload)."""
        self.indexes = indexes
        db = self.settings.mongo.db
        if indexes.get("ok"):
            log.info("indexes: smsd's indexes are in database %s", db)
        else:
            log.warning("indexes: MongoDB refused smsd's indexes in database %s (%s): every read of "
                        "pending SMS and checkpoints scans its collection; `smsd doctor` tells which "
                        "are missing", db, indexes.get("error"))

    def run_admin(self, cmd: str, args: dict) -> dict:
        """Ask MongoDB in a child and wait for it (bounded), still pinging the watchdog."""
        settings, uri = self.settings, self.mongo_uri
        child = self.fork_child("admin", lambda: discovery.admin(settings, cmd, args, uri))
        deadline = time.monotonic() + ADMIN_TIMEOUT
        while not child.done and time.monotonic() < deadline:
            ready, _, _ = select.select([child.fd], [], [], 0.2)
            if ready:
                self.read_child(child)
            self.ping_watchdog()
        if not child.done:
            self._kill(child.pid, signal.SIGKILL)
            raise TimeoutError(f"{cmd}: MongoDB did not answer within {ADMIN_TIMEOUT:.0f} s")
        answer = child.answer
        if not answer:
            raise RuntimeError(f"{cmd} failed (see the daemon's log)")
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    # ------------------------------------------------------------ embedded
    def check_embedded(self) -> None:
        if self.embedded is None or self.embedded.alive():
            return
        log.error("embedded MongoDB-wire server died: restarting it")
        try:
            self.mongo_uri = self.embedded.start()
        except Exception as exc:  # noqa: BLE001 - keep supervising; workers journal meanwhile
            log.error("embedded MongoDB did not restart: %s", exc)

    # ------------------------------------------------------------- systemd
    def maybe_ready(self) -> None:
        if self.ready_sent or self.state != RUNNING:
            return
        # Ready once the journal directory, the socket and the first discovery
        # (and so the first workers) are done.  MongoDB down is degraded, not failed.
        if self.generation >= 1 and not any(c.kind == "discovery" for c in self.children.values()):
            self.spawn_workers()
            self.notifier.ready(status_line(self))
            self.ready_sent = True
            log.info("ready: %s", status_line(self))

    def ping_watchdog(self) -> None:
        if not self.watchdog_every or failpoints.enabled("supervisor_no_watchdog"):
            return
        now = time.monotonic()
        if now - self.last_watchdog >= self.watchdog_every:
            self.notifier.watchdog()
            self.last_watchdog = now

    def note_status(self) -> None:
        self.health.nag()
        now = time.monotonic()
        if self.ready_sent and now - self.last_status_note >= 5.0:
            self.notifier.status(status_line(self))
            self.last_status_note = now

    # ------------------------------------------------------------- control
    def handle_command(self, cmd: str, args: dict, peer: Peer) -> dict:
        """Serve one smsctl request (from the main loop; never blocks for long)."""
        user_id = args.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise ValueError("user_id must be a string")
        if cmd == "status":
            limit, offset = page_args(args)
            return status_reply(self, user_id, limit=limit, offset=offset)
        if cmd == "pause":
            if not user_id:
                raise ValueError("pause needs a user_id")
            return self.pause(user_id)
        if cmd == "resume":
            return self.resume(user_id)
        if cmd == "drain":
            if self.state == RUNNING:
                self.drain(f"smsctl drain (uid {peer.uid})")
            return {"state": self.state}
        if cmd == "reload":
            self.reload()
            return {"reloaded": True, "config": self.config_path}
        if cmd == "batches":
            if args.get("cancel"):
                try:
                    return self.run_admin("batch_cancel", {"batch_id": str(args["cancel"])})
                except RuntimeError as exc:   # the server's refusal, said plainly
                    raise CommandError(str(exc)) from None
            return {"batches": open_batches(self, user_id)}
        if cmd == "release":
            return release_user(self, user_id)
        if cmd in ("quarantine", "retry"):
            if cmd == "retry" and not user_id:
                raise ValueError("retry needs a user_id")
            answer = self.run_admin(cmd, args)
            if cmd == "retry":
                self.discovery_wanted = True
            return answer
        raise UnknownCommand(cmd)

    def pause(self, user_id: str) -> dict:
        user = self.users.setdefault(user_id, UserState(user_id))
        user.paused = True
        for w in self.workers.values():
            if user_id in w.users():   # a group turn drains all its users
                w.recycle_reason = "paused"
                self._kill(w.pid, signal.SIGTERM)   # drain: its in-flight calls finish and flush
        self._save_paused()
        log.info("user %s paused", user_id)
        return {"paused": [user_id]}

    def resume(self, user_id: str | None) -> dict:
        targets = [self.users.setdefault(user_id, UserState(user_id))] if user_id else list(self.users.values())
        resumed = []
        for user in targets:
            if user.paused or user.failed or user.next_start > time.monotonic() or user_id:
                resumed.append(user.user_id)
            clear_failures(user)
        self._save_paused()
        self.discovery_wanted = True
        return {"resumed": sorted(resumed)}

    def _paused_file(self) -> Path:
        return self.settings.state_dir / "paused.json"

    def _load_paused(self) -> None:
        for user_id in load_paused(self._paused_file()):
            self.users.setdefault(user_id, UserState(user_id)).paused = True

    def _save_paused(self) -> None:
        save_paused(self._paused_file(), self.users.values())
