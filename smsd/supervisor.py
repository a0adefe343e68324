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
"""
from __future__ import annotations

import gc
import json
import logging
import os
import select
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from . import __version__, discovery, failpoints
from .config import ConfigError, Settings, load_settings
from .control import ControlServer, Peer, UnknownCommand
from .sdnotify import Notifier, unset_environment
from .worker import EXIT_DONE, EXIT_LOCKED, EXIT_MORE, die_with_parent, run_worker

log = logging.getLogger("smsd.supervisor")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_CONFIG = 78

RUNNING, DRAINING, STOPPING = "running", "draining", "stopping"
ADMIN_TIMEOUT = 10.0
DISCOVERY_TIMEOUT = 120.0


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
class UserState:
    """What the supervisor knows and decides about one user."""

    user_id: str
    paused: bool = False
    failed: bool = False
    crashes: deque = field(default_factory=deque)
    consecutive_crashes: int = 0
    restarts: int = 0
    next_start: float = 0.0
    last_served: float = 0.0
    done_generation: int = -1
    info: dict = field(default_factory=dict)     # counts from the last discovery
    last_exit: str | None = None


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


class Supervisor:
    """Forks one worker per user with pending work, restarts the dead, serves smsctl."""

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
        self.ready_sent = False
        self.stop_deadline: float | None = None
        self.notifier = Notifier()
        self.watchdog_every = self.notifier.watchdog_interval()
        self.last_watchdog = 0.0
        self.last_status_note = 0.0
        self.embedded = None
        self.mongo_uri: str | None = None
        self.control: ControlServer | None = None
        self.wake_r = self.wake_w = -1

    # ------------------------------------------------------------- start-up
    def run(self) -> int:
        """Start, loop until drained or stopped, return the exit code."""
        try:
            self.setup()
        except Exception as exc:  # noqa: BLE001 - report any start-up failure plainly
            log.error("start-up failed: %s", exc)
            self.cleanup()
            return EXIT_STARTUP_FAILED
        log.info("smsd %s supervisor %d up: max_workers=%d, state %s, socket %s", __version__,
                 self.pid, self.settings.supervisor.max_workers, self.settings.state_dir,
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

    def cleanup(self) -> None:
        if self.control:
            self.control.close()
            self.control = None
        if self.embedded:
            self.embedded.stop()
            self.embedded = None

    # ----------------------------------------------------------- main loop
    def loop(self) -> None:
        while True:
            self.handle_signals()
            self.reap()
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
        if self.control:
            readers += self.control.read_fds()
            writers += self.control.write_fds()
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
                self.read_worker(w)
        for c in list(self.children.values()):
            if c.fd in readable_set:
                self.read_child(c)
        if self.control:
            self.control.process(readable_set, writable_set)
            self.control.expire()

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
            self.notifier.ready(self.status_line())
            return
        old = self.settings
        # The journal, socket and database cannot move under running workers.
        for section, key in (("journal", "state_dir"), ("supervisor", "runtime_dir"), ("mongo", "uri")):
            if getattr(getattr(new, section), key) != getattr(getattr(old, section), key):
                log.warning("reload: %s.%s changes only on restart", section, key)
                setattr(getattr(new, section), key, getattr(getattr(old, section), key))
        self.settings = new
        logging.getLogger().setLevel(new.supervisor.log_level)
        log.info("reloaded %s: max_workers=%d (new workers get the new LLM settings)",
                 self.config_path or "settings", new.supervisor.max_workers)
        self.discovery_wanted = True
        self.notifier.ready(self.status_line())

    # ------------------------------------------------------------- workers
    def spawn_workers(self) -> None:
        room = self.settings.supervisor.max_workers - len(self.workers)
        if room <= 0:
            return
        running = {w.user_id for w in self.workers.values()}
        now = time.monotonic()
        candidates = [u for u in self.users.values()
                      if u.user_id not in running and not u.paused and not u.failed
                      and u.next_start <= now and self._has_work(u)]
        # Unflushed journal rows first (they are paid for), then whoever waited longest:
        # a user with 50,000 SMS gets one turn of worker_max_sms, then goes to the back.
        candidates.sort(key=lambda u: (not self._unflushed(u), u.last_served))
        for user in candidates[:room]:
            self.spawn_worker(user)

    def _has_work(self, user: UserState) -> bool:
        if user.done_generation >= self.applied_generation:
            return False   # finished after the last applied look began: wait for a fresh one
        return bool(user.info.get("pending_sms")) or self._unflushed(user) > 0

    @staticmethod
    def _unflushed(user: UserState) -> int:
        return int((user.info.get("journal") or {}).get("unflushed") or 0)

    def spawn_worker(self, user: UserState) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            try:
                os.close(r)
                self._close_inherited(keep={w})
                unset_environment(os.environ)
            finally:
                run_worker(self.settings, user.user_id, w, self.pid, self.mongo_uri)
        os.close(w)
        os.set_blocking(r, False)
        os.set_inheritable(r, False)
        self.workers[pid] = WorkerProc(pid=pid, user_id=user.user_id, fd=r)
        user.last_served = time.monotonic()
        log.info("worker %d started for user %s", pid, user.user_id)

    def _close_inherited(self, keep: set[int]) -> None:
        """In a fresh child: close the supervisor's fds (socket, pipes), keep stdio and log files."""
        keep = set(keep) | {0, 1, 2}
        for handler in logging.getLogger().handlers:
            stream = getattr(handler, "stream", None)
            if stream is not None and hasattr(stream, "fileno"):
                try:
                    keep.add(stream.fileno())
                except (OSError, ValueError):
                    pass
        self.control = None   # the child must not unlink the supervisor's socket
        self.embedded = None
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

    def read_worker(self, w: WorkerProc) -> None:
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

    def check_workers(self) -> None:
        """Kill the silent (hung) and recycle the fat."""
        now = time.monotonic()
        sup = self.settings.supervisor
        for w in list(self.workers.values()):
            if now - w.last_seen > sup.worker_timeout:
                log.error("worker %d (user %s) silent for %.0f s: killing it", w.pid, w.user_id,
                          now - w.last_seen)
                w.recycle_reason = "hung"
                self._kill(w.pid, signal.SIGKILL)
                w.last_seen = now   # do not kill twice while waiting for the reap
                continue
            if w.recycle_reason is None:
                rss = self._rss(w.pid)
                if rss > sup.worker_rss_limit_mb * 1024 * 1024:
                    log.warning("worker %d (user %s) RSS %d MiB over the limit: recycling it after "
                                "its current batch", w.pid, w.user_id, rss >> 20)
                    w.recycle_reason = "rss"
                    self._kill(w.pid, signal.SIGTERM)

    @staticmethod
    def _rss(pid: int) -> int:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0

    def kill_all(self, sig: int, why: str) -> None:
        for w in self.workers.values():
            if sig == signal.SIGTERM and w.term_sent is not None:
                continue
            w.term_sent = time.monotonic()
            self._kill(w.pid, sig)

    @staticmethod
    def _kill(pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

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
        self.read_worker(w)
        os.close(w.fd)
        user = self.users.setdefault(w.user_id, UserState(w.user_id))
        code = os.waitstatus_to_exitcode(status)
        if w.status:
            user.info.update({k: w.status[k] for k in ("total_sms", "processed_sms") if k in w.status})
            if w.status.get("journal"):
                user.info["journal"] = w.status["journal"]
        now = time.monotonic()
        if code == EXIT_DONE and w.recycle_reason is None:
            user.last_exit = "done"
            user.consecutive_crashes = 0
            user.done_generation = self.generation
            log.info("worker %d (user %s) finished", w.pid, w.user_id)
        elif code in (EXIT_MORE, EXIT_DONE):
            user.last_exit = "turn over" if code == EXIT_MORE else f"recycled ({w.recycle_reason})"
            user.consecutive_crashes = 0
            user.info["pending_sms"] = max(1, int(user.info.get("pending_sms") or 1))
        elif code == EXIT_LOCKED:
            # An orphan of a previous supervisor still holds the journal; it dies
            # with its parent (PDEATHSIG), so try again shortly.
            user.last_exit = "journal busy"
            user.next_start = now + 1.0
        else:
            why = f"signal {-code}" if code < 0 else f"exit {code}"
            if w.recycle_reason == "hung":
                why = "hung, killed"
            self.worker_crashed(user, w, why)

    def worker_crashed(self, user: UserState, w: WorkerProc, why: str) -> None:
        sup = self.settings.supervisor
        now = time.monotonic()
        user.last_exit = why
        user.restarts += 1
        user.consecutive_crashes += 1
        user.crashes.append(now)
        while user.crashes and now - user.crashes[0] > sup.crash_loop_window:
            user.crashes.popleft()
        if len(user.crashes) >= sup.crash_loop_count:
            user.failed = True
            log.error("user %s: worker crashed %d times in %.0f s (last: %s): marked failed; "
                      "`smsctl resume --user-id %s` to try again", user.user_id, len(user.crashes),
                      sup.crash_loop_window, why, user.user_id)
            return
        delay = min(sup.restart_backoff_max, sup.restart_backoff * 2 ** (user.consecutive_crashes - 1))
        user.next_start = now + delay
        user.last_served = 0.0   # restart the dead first, not after every other user's turn
        log.warning("worker %d (user %s) died (%s); restarting in %.1f s", w.pid, user.user_id, why, delay)

    # -------------------------------------------------- discovery / admin
    def maybe_discover(self) -> None:
        if any(c.kind == "discovery" for c in self.children.values()):
            return
        due = time.monotonic() - self.last_discovery >= self.settings.supervisor.discovery_interval
        if not (due or self.discovery_wanted):
            return
        self.discovery_wanted = False
        self.last_discovery = time.monotonic()
        self.generation += 1
        settings, uri = self.settings, self.mongo_uri
        child = self.fork_child("discovery", lambda: discovery.discover(settings, uri))
        child.generation = self.generation

    def fork_child(self, kind: str, fn: Callable[[], dict]) -> Child:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(r)
                die_with_parent(self.pid)   # never outlive a killed supervisor
                self._close_inherited(keep={w})
                for sig in self.SIGNALS:
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
        child = Child(pid=pid, fd=r, kind=kind)
        self.children[pid] = child
        return child

    def read_child(self, child: Child, final: bool = False) -> None:
        while not child.done:
            try:
                data = os.read(child.fd, 65536)
            except BlockingIOError:
                if not final:
                    return
                data = b""
            except OSError:
                data = b""
            if data:
                child.buf += data
                continue
            child.done = True
            try:
                answer = json.loads(child.buf) if child.buf else None
            except ValueError:
                answer = None
            if child.kind == "discovery":
                self.discovered(answer, child.generation)
            else:
                child.answer = answer  # type: ignore[attr-defined]

    def check_children(self) -> None:
        now = time.monotonic()
        for child in list(self.children.values()):
            if not child.done and now - child.started > DISCOVERY_TIMEOUT:
                log.error("%s child %d took over %.0f s: killing it", child.kind, child.pid, DISCOVERY_TIMEOUT)
                self._kill(child.pid, signal.SIGKILL)
                child.started = now

    def discovered(self, answer: dict | None, generation: int) -> None:
        if not answer:
            self.mongo = {"ok": False, "error": "discovery failed (see log)"}
            return
        self.mongo = answer.get("mongo", self.mongo)
        self.applied_generation = max(self.applied_generation, generation)
        found = answer.get("users", {})
        for user_id, info in found.items():
            user = self.users.setdefault(user_id, UserState(user_id))
            if user.done_generation >= generation:
                continue   # our own worker finished after this look began: its news is fresher
            running = any(w.user_id == user_id for w in self.workers.values())
            if running:
                info = {k: v for k, v in info.items() if k not in ("journal",)}
            user.info.update(info)
            if "pending_sms" not in info:
                user.info["pending_sms"] = 0
        for user_id, user in self.users.items():
            if user_id not in found and self.mongo.get("ok"):
                user.info["pending_sms"] = 0

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
        answer = getattr(child, "answer", None)
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
            self.notifier.ready(self.status_line())
            self.ready_sent = True
            log.info("ready: %s", self.status_line())

    def ping_watchdog(self) -> None:
        if not self.watchdog_every or failpoints.enabled("supervisor_no_watchdog"):
            return
        now = time.monotonic()
        if now - self.last_watchdog >= self.watchdog_every:
            self.notifier.watchdog()
            self.last_watchdog = now

    def note_status(self) -> None:
        now = time.monotonic()
        if self.ready_sent and now - self.last_status_note >= 5.0:
            self.notifier.status(self.status_line())
            self.last_status_note = now

    def status_line(self) -> str:
        users = self.status_users()
        pending = sum(u["pending_sms"] for u in users)
        backlog = sum(int((u.info.get("journal") or {}).get("unflushed") or 0) for u in self.users.values())
        mongo = "ok" if self.mongo.get("ok") else "degraded: MongoDB unreachable" \
            if self.mongo.get("ok") is False else "checking"
        return (f"{self.state}: {len(self.workers)} workers, {pending} SMS pending, "
                f"journal backlog {backlog}, MongoDB {mongo}")

    # ------------------------------------------------------------- control
    def handle_command(self, cmd: str, args: dict, peer: Peer) -> dict:
        """Serve one smsctl request (from the main loop; never blocks for long)."""
        user_id = args.get("user_id")
        if user_id is not None and not isinstance(user_id, str):
            raise ValueError("user_id must be a string")
        if cmd == "status":
            return self.status(user_id)
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
            if w.user_id == user_id:
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
            user.paused = user.failed = False
            user.crashes.clear()
            user.consecutive_crashes = 0
            user.next_start = 0.0
            user.done_generation = -1
        self._save_paused()
        self.discovery_wanted = True
        return {"resumed": sorted(resumed)}

    def _paused_file(self) -> Path:
        return self.settings.state_dir / "paused.json"

    def _load_paused(self) -> None:
        try:
            paused = json.loads(self._paused_file().read_text())
        except (OSError, ValueError):
            return
        for user_id in paused if isinstance(paused, list) else []:
            self.users.setdefault(str(user_id), UserState(str(user_id))).paused = True

    def _save_paused(self) -> None:
        path = self._paused_file()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(sorted(u.user_id for u in self.users.values() if u.paused)))
        os.replace(tmp, path)

    def status_users(self) -> list[dict]:
        running = {w.user_id: w for w in self.workers.values()}
        out = []
        for user in sorted(self.users.values(), key=lambda u: u.user_id):
            info = dict(user.info)
            live = running.get(user.user_id)
            if live and live.status:
                info["journal"] = live.status.get("journal") or info.get("journal")
            journal = info.get("journal") or {}
            pending = int(info.get("pending_sms") or 0)
            quarantined = int(info.get("quarantined_sms") or 0)
            unflushed = int(journal.get("unflushed") or 0)
            if user.paused:
                status = "paused"
            elif user.failed:
                status = "failed"
            elif live:
                status = "in_progress"
            elif pending or unflushed:
                status = "waiting" if user.next_start > time.monotonic() else "in_progress"
            elif quarantined:
                status = "quarantined"
            else:
                status = "completed"
            out.append({"user_id": user.user_id,
                        "total_sms": int(info.get("total_sms") or 0),
                        "processed_sms": int(info.get("processed_sms") or 0),
                        "pending_sms": pending, "quarantined_sms": quarantined,
                        "unflushed": unflushed, "status": status, "restarts": user.restarts,
                        "last_exit": user.last_exit})
        return out

    def status(self, user_id: str | None = None) -> dict:
        now = time.monotonic()
        workers = [{"user_id": w.user_id, "pid": w.pid,
                    "state": w.recycle_reason and f"stopping ({w.recycle_reason})" or
                    w.status.get("state", "starting"),
                    "uptime_s": round(now - w.started, 1), "rss_bytes": self._rss(w.pid),
                    "restarts": self.users[w.user_id].restarts if w.user_id in self.users else 0,
                    "last_heartbeat_s": round(now - w.last_seen, 1)}
                   for w in self.workers.values()]
        llm = {"calls": 0, "repeated_calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
        unflushed = 0
        running = {w.user_id: w for w in self.workers.values()}
        for user in self.users.values():
            journal = user.info.get("journal") or {}
            live = running.get(user.user_id)
            if live and live.status.get("journal"):
                journal = live.status["journal"]
            unflushed += int(journal.get("unflushed") or 0)
            for key in llm:
                llm[key] += int(journal.get(key) or 0)
        mongo_ok = self.mongo.get("ok")
        if any(w.status.get("mongo_ok") is False for w in self.workers.values()):
            mongo_ok = False
        users = self.status_users()
        if user_id:
            users = [u for u in users if u["user_id"] == user_id]
        reply = {"pid": self.pid, "version": __version__, "state": self.state,
                 "uptime_s": round(now - self.started, 1), "rss_bytes": self._rss(self.pid),
                 "mongo": {"ok": mongo_ok, "error": None if mongo_ok else self.mongo.get("error")},
                 "workers": workers if not user_id else [w for w in workers if w["user_id"] == user_id],
                 "users": users, "journal": {"unflushed": unflushed}, "llm": llm,
                 "max_workers": self.settings.supervisor.max_workers}
        if user_id:
            try:
                reply["checkpoint"] = self.run_admin("checkpoint", {"user_id": user_id}).get("checkpoint")
            except (TimeoutError, RuntimeError) as exc:
                reply["checkpoint"] = None
                reply["checkpoint_error"] = str(exc)
        return reply
