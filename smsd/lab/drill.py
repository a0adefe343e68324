"""``smsd drill``: a kill -9 recovery drill of the whole daemon.

The drill is self-contained.  In a temporary directory it

1. starts an embedded MongoDB-wire server (:class:`smsd.embedded.EmbeddedMongo`)
   and seeds synthetic SMS for several users.  Each text is a labelled fixture
   (``smsd/data/sms_fixtures.jsonl``) with a harmless ``" Ref#<n>"`` appended,
   so every SMS is distinct and its right answer is known;
2. starts the local LLM server (:class:`smsd.lab.llmserver.LlmServer`, in this
   process) answering from that table, with latency and, unless
   ``--no-faults``, small probabilities of 429, 500, partial and malformed
   answers;
3. runs ``smsd run`` as a subprocess and, while it works, SIGKILLs at random
   (seeded): a worker, the supervisor (then starts a new ``smsd run``), the
   database (restarted on the same port and storage after a moment), and the
   supervisor while the database is down;
4. waits until every SMS is processed (or quarantined) and the daemon is idle,
   drains it (SIGTERM), and checks every invariant of DESIGN.md with
   :func:`smsd.lab.invariants.verify` plus the drill's own checks (orphans, calls
   cut in flight, provenance of every transaction);
5. prints a report (``--json`` for a machine-readable one) and exits 0 only if
   nothing was violated.

``smsd drill --verify-only DIR`` re-checks a directory kept by ``--keep``.
Progress lines go to stderr; no SMS text is ever printed or logged.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2

KINDS = ("worker", "supervisor", "database", "supervisor-db-down")
#: Kills after which every worker of the killed supervisor must be gone.
SUPERVISOR_KINDS = ("supervisor", "supervisor-db-down")
#: How long after a supervisor kill its children may still live.
ORPHAN_GRACE_S = 5.0
DB_NAME = "smsd_drill"
STATE_FILE = "drill-state.json"
FIXTURES = Path(__file__).resolve().parent / "data" / "sms_fixtures.jsonl"

#: Faults of the LLM server when faults are on (small probabilities).
FAULTS = {"p_429": 0.02, "p_500": 0.02, "p_partial": 0.02, "p_malformed": 0.02}
LATENCY = {"latency_ms": 20.0, "latency_jitter_ms": 60.0}

#: Settings of the daemon under drill (besides paths and URLs).
BATCH_SIZE = 5
CONCURRENCY = 2


# ----------------------------------------------------------------------------- data

def load_fixtures(path: Path | None = None) -> list[dict]:
    """The labelled fixture SMS shipped with smsd (``{"text", "sender", "expected", ...}``)."""
    with open(path or FIXTURES, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_raw_id(kind: str, user_index: int, i: int) -> Any:
    """A raw ``_id`` of the given BSON kind: ``objectid``, ``int`` or ``str``."""
    from bson import ObjectId
    if kind == "objectid":
        return ObjectId()
    if kind == "int":
        return 1_000_000 * (user_index + 1) + i
    return f"drill-{user_index:02d}-sms-{i:06d}"


def build_seed(users: int, per_user: int, rng: random.Random
               ) -> tuple[list[dict], dict[Any, dict], dict[str, dict], list[str]]:
    """The SMS documents to insert, raw ``_id`` → expected answer, text → answer, user ids.

    Users cycle through ObjectId, int and string ``_id``\\ s.  Each text is a
    fixture text plus ``" Ref#<n>"`` (unique across the drill).
    """
    lines = load_fixtures()
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs: list[dict] = []
    expected: dict[Any, dict] = {}
    table: dict[str, dict] = {}
    user_ids = [f"drill-user-{u:02d}" for u in range(users)]
    kinds = ("objectid", "int", "str")
    n = 0
    for u, user_id in enumerate(user_ids):
        offset = rng.randrange(len(lines))
        for i in range(per_user):
            line = lines[(offset + i) % len(lines)]
            text = f"{line['text']} Ref#{n:07d}"
            n += 1
            raw_id = make_raw_id(kinds[u % len(kinds)], u, i)
            doc = {"_id": raw_id, "user_id": user_id, "body": text,
                   "received_at": base + timedelta(minutes=i), "isprocessed": False}
            if line.get("sender"):
                doc["sender"] = line["sender"]
            docs.append(doc)
            expected[raw_id] = line["expected"]
            table[text] = line["expected"]
    return docs, expected, table, user_ids


# ----------------------------------------------------------------------------- records

@dataclass
class KillEvent:
    """One kill the drill made, and what followed it."""

    n: int
    kind: str
    at_s: float                      # seconds since the daemon was first started
    wall: float                      # time.time() of the kill (journal clock)
    user_id: str | None = None       # worker kill: whose worker
    pid: int | None = None           # the process killed (worker or supervisor)
    workers: list[int] = field(default_factory=list)   # supervisor kill: its workers then
    db_down_s: float | None = None   # database kinds: how long it was down
    resumed_at_s: float | None = None   # new supervisor started / database back / worker killed
    recovery_s: float | None = None     # resumed → the processed count rises again
    recovery_note: str = ""
    new_supervisor_pid: int | None = None


@dataclass
class Options:
    """The drill's parameters (see ``smsd drill --help``)."""

    users: int = 4
    sms: int = 50
    kills: int = 8
    faults: bool = True
    duration: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    max_workers: int = 4
    grace: float = 0.0
    pace: str = "auto"
    keep: bool = False
    dir: str | None = None
    quiet: bool = False


class DrillError(RuntimeError):
    """The drill could not run (setup failed); not a verdict on smsd."""


# ----------------------------------------------------------------------------- helpers

def _pdeathsig_exec(argv: list[str]) -> list[str]:
    """argv that sets PR_SET_PDEATHSIG=SIGKILL, then execs ``argv``.

    Done in a fresh interpreter rather than with ``preexec_fn`` (unsafe with
    threads).  The death signal survives ``execve``; it fires when the thread
    that started the process (the drill's main thread) dies, so a drill that is
    itself SIGKILLed leaves no supervisor behind (workers follow by their own
    PDEATHSIG).
    """
    code = ("import ctypes, os, sys\n"
            "ctypes.CDLL(None).prctl(1, 9, 0, 0, 0)\n"
            "os.getppid() == int(sys.argv[1]) or os._exit(70)\n"
            "os.execv(sys.argv[2], sys.argv[2:])\n")
    return [sys.executable, "-c", code, str(os.getpid()), *argv]


def _clean_env(config: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMSD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))
           and k not in ("OPENAI_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY",
                         "RUNTIME_DIRECTORY")}
    env["SMSD_CONFIG"] = str(config)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _toml(conf: dict[str, dict]) -> str:
    lines = []
    for section, values in conf.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


def _alive(pid: int, create_time: float | None = None) -> bool:
    """True if ``pid`` runs (not a zombie) and, if given, started at ``create_time``."""
    import psutil
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 0.05:
            return False   # the pid was reused
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


# ----------------------------------------------------------------------------- monitor

class Monitor(threading.Thread):
    """Polls MongoDB: SMS processed per user and SMS still pending.

    Samples are ``(t, {user: processed} | None)`` with ``t`` in seconds since
    the drill's clock origin; ``None`` while the database does not answer.
    The poll interval adapts to the cost of a poll (at most ~1/3 of the time).
    """

    def __init__(self, uri: str, users: list[str], origin: float, total: int) -> None:
        super().__init__(name="drill-monitor", daemon=True)
        self.uri = uri
        self.users = users
        self.origin = origin
        self.total = total
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.samples: list[tuple[float, dict[str, int] | None]] = []
        self.pending: int | None = None
        self.processed = 0

    def run(self) -> None:
        """Poll until stopped (a daemon thread)."""
        import pymongo
        from pymongo.errors import PyMongoError

        from ..store import RAW_COLLECTION, Store

        client = pymongo.MongoClient(self.uri, directConnection=True, serverSelectionTimeoutMS=400,
                                     connectTimeoutMS=400, socketTimeoutMS=10000)
        coll = client[DB_NAME][RAW_COLLECTION]
        interval = 0.25
        try:
            while not self.stop_event.wait(interval):
                t = time.monotonic()
                try:
                    counts = {u: int(coll.count_documents({"user_id": u, "isprocessed": True}))
                              for u in self.users}
                    pending = int(coll.count_documents(Store.pending_filter()))
                except PyMongoError:
                    counts, pending = None, None
                took = time.monotonic() - t
                with self.lock:
                    self.samples.append((t - self.origin, counts))
                    if counts is not None:
                        self.processed = sum(counts.values())
                        self.pending = pending
                interval = min(2.0, max(0.25, 2.0 * took))
        finally:
            client.close()

    def snapshot(self) -> tuple[int, int | None]:
        """(processed, pending) as last seen; pending is None before the first answer."""
        with self.lock:
            return self.processed, self.pending

    def recovery(self, killed: float, resumed: float, user: str | None,
                 until: float | None = None, db_was_down: bool = False) -> tuple[float | None, str]:
        """Seconds from ``resumed`` until the processed count (of ``user``, or all) rises.

        The baseline is the count just after the kill (nothing killed can
        flush any more), or, when the database was down, the last count before
        the kill.  ``None`` with a note when the count did not rise, or only
        after ``until`` (the next kill, which then owns the delay).
        """
        with self.lock:
            samples = [(t, c) for t, c in self.samples if c is not None]

        def value(counts: dict[str, int]) -> int:
            return counts.get(user, 0) if user else sum(counts.values())

        if db_was_down:
            before = [(t, c) for t, c in samples if t <= killed]
            base = before[-1] if before else None
        else:
            after = [(t, c) for t, c in samples if t >= killed]
            base = after[0] if after else None
        if base is None:
            return None, "no count around the kill"
        for t, counts in samples:
            if t <= max(resumed, base[0]):
                continue
            if value(counts) > value(base[1]):
                if until is not None and t > until:
                    return None, "the next kill came first"
                return round(t - resumed, 2), ""
        return None, "no further flush seen (nothing left to do)"

    def recovered(self, ev: "KillEvent") -> bool:
        """Whether the processed count rose again after ``ev``."""
        if ev.resumed_at_s is None:
            return True
        return self.recovery(ev.at_s, ev.resumed_at_s, ev.user_id if ev.kind == "worker" else None,
                             db_was_down=ev.db_down_s is not None)[0] is not None


# ----------------------------------------------------------------------------- the drill

class Drill:
    """One drill run: owns every process it starts and stops them all in :meth:`cleanup`."""

    def __init__(self, opts: Options, say: Callable[[str], None]) -> None:
        self.o = opts
        self.say = say
        self.rng = random.Random(opts.seed)
        self.dir: Path | None = None
        self.mongo = None
        self.llm = None
        self.monitor: Monitor | None = None
        self.sup: subprocess.Popen | None = None
        self.sup_count = 0
        self.sessions: list[int] = []          # process groups of every smsd run started
        self.config: Path | None = None
        self.expected: dict[Any, dict] = {}
        self.user_ids: list[str] = []
        self.events: list[KillEvent] = []
        self.skipped: list[dict] = []
        self.orphan_checks: list[dict] = []     # pending: {"due", "event", "children"}
        self.orphans: list[dict] = []
        self.violations: list[str] = []
        self.notes: list[str] = []
        self.origin = time.monotonic()
        self.rpm: float = 0.0
        self.log_files: list[str] = []

    # ------------------------------------------------------------------ set-up
    def elapsed(self) -> float:
        """Seconds since the clock origin (reset when the daemon is first started)."""
        return time.monotonic() - self.origin

    def setup(self) -> None:
        """Directory, database, seeded SMS, LLM server and config.toml (no daemon yet)."""
        from pymongo import MongoClient

        from ..embedded import EmbeddedMongo
        from .llmserver import KnownAnswers, LlmServer
        from ..store import Store

        o = self.o
        if o.dir:
            self.dir = Path(o.dir).resolve()
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            self.dir = Path(tempfile.mkdtemp(prefix="smsd-drill-"))
        self.say(f"directory {self.dir}")
        self.mongo = EmbeddedMongo(self.dir / "mongo", log_path=self.dir / "mongo.log")
        uri = self.mongo.start()
        self.say(f"MongoDB-wire server up (pid {self.mongo.pid}, port {self.mongo.port})")

        docs, self.expected, table, self.user_ids = build_seed(o.users, o.sms, self.rng)
        client = MongoClient(uri, directConnection=True)
        try:
            coll = client[DB_NAME]["sms_fin_rawdata"]
            for i in range(0, len(docs), 1000):
                coll.insert_many(docs[i:i + 1000])
        finally:
            client.close()
        store = Store(uri, DB_NAME, timeout_ms=10000)
        try:
            store.ensure_indexes()
        finally:
            store.close()
        self.say(f"seeded {len(docs)} SMS for {o.users} users")
        self._save_state()

        faults = dict(LATENCY, retry_after_s=0.5, seed=o.seed)
        if o.faults:
            faults.update(FAULTS)
        self.llm = LlmServer(KnownAnswers(table), model="smsd-drill", **faults).start()
        self.say(f"LLM server on {self.llm.url} (faults {'on' if o.faults else 'off'})")

        calls = math.ceil(o.sms / BATCH_SIZE) * o.users
        if o.pace == "auto":
            self.rpm = round(calls * 1.3 / (0.6 * o.duration / 60.0), 1)
        elif o.pace != "off":
            self.rpm = float(o.pace)
        conf = {
            "mongo": {"uri": uri, "db": DB_NAME, "timeout_ms": 2000},
            "llm": {"base_url": self.llm.url, "model": "smsd-drill", "batch_size": BATCH_SIZE,
                    "concurrency": CONCURRENCY, "timeout": 30.0, "max_retries": 3,
                    "backoff_base": 0.05, "backoff_max": 0.5,
                    "requests_per_minute": self.rpm},
            "journal": {"state_dir": str(self.dir / "state"), "max_backlog": 25},
            "pipeline": {"page_size": 50, "worker_max_sms": 100},
            "supervisor": {"runtime_dir": str(self.dir / "run"), "max_workers": o.max_workers,
                           "discovery_interval": 1.0, "restart_backoff": 0.2,
                           "restart_backoff_max": 2.0, "crash_loop_count": 1000,
                           "drain_timeout": 20.0, "log_level": "INFO",
                           "log_file": str(self.dir / "smsd.log")},
        }
        self.config = self.dir / "config.toml"
        self.config.write_text(_toml(conf))
        if self.rpm:
            self.say(f"pace: llm.requests_per_minute = {self.rpm:g} (work spread over ~60% of "
                     f"{o.duration:g} s)")

    def _save_state(self, extra: dict | None = None) -> None:
        from bson import json_util
        assert self.dir is not None
        state = {"db": DB_NAME, "mongo_path": "mongo", "state_dir": "state",
                 "users": self.user_ids,
                 "expected": [{"_id": k, "answer": v} for k, v in self.expected.items()]}
        path = self.dir / STATE_FILE
        if path.exists() and extra:
            old = json_util.loads(path.read_text())
            state.update({k: v for k, v in old.items() if k not in state})
        state.update(extra or {})
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json_util.dumps(state))
        os.replace(tmp, path)

    # ------------------------------------------------------------ supervisor
    @property
    def socket(self) -> Path:
        assert self.dir is not None
        return self.dir / "run" / "control.sock"

    def start_supervisor(self) -> int:
        """Start a new ``smsd run`` in its own session; return its pid."""
        assert self.dir is not None and self.config is not None
        self.sup_count += 1
        log_path = self.dir / f"smsd-run-{self.sup_count}.log"
        self.log_files.append(log_path.name)
        with open(log_path, "ab") as log:
            self.sup = subprocess.Popen(
                _pdeathsig_exec([sys.executable, "-m", "smsd.cli", "run"]),
                env=_clean_env(self.config), stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, cwd=str(self.dir), start_new_session=True)
        self.sessions.append(self.sup.pid)
        return self.sup.pid

    def status(self, timeout: float = 2.0) -> dict | None:
        """The current supervisor's ``status`` reply, or ``None`` if it does not answer."""
        from ..control import ControlClientError, request
        try:
            reply = request(self.socket, "status", {}, timeout=timeout)
        except (ControlClientError, OSError, ValueError):
            return None
        # Only the current supervisor's answer counts (not a stale one's).
        current = self.sup.pid if self.sup else None
        return reply if reply.get("ok", True) and reply.get("pid") == current else None

    def wait_ready(self, timeout: float = 40.0) -> dict:
        """Wait until the current supervisor answers ``status``; :class:`DrillError` if it dies."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sup is not None and self.sup.poll() is not None:
                raise DrillError(f"smsd run exited with code {self.sup.returncode} at start "
                                 f"(see {self.log_files[-1]})")
            st = self.status(timeout=1.0)
            if st is not None:
                return st
            time.sleep(0.1)
        raise DrillError(f"smsd run did not answer on its control socket within {timeout:.0f} s")

    def check_supervisor(self) -> None:
        """A supervisor that died without our kill is a finding; start a new one."""
        if self.sup is not None and self.sup.poll() is not None:
            code = self.sup.returncode
            self.violations.append(f"smsd run (pid {self.sup.pid}) exited on its own with code {code}")
            self.say(f"!! smsd run pid {self.sup.pid} exited on its own (code {code}); starting another")
            self.start_supervisor()
            self.wait_ready()

    # ----------------------------------------------------------------- kills
    def _children(self, pid: int) -> list[dict]:
        import psutil
        try:
            kids = psutil.Process(pid).children(recursive=True)
        except psutil.Error:
            return []
        out = []
        for k in kids:
            try:
                out.append({"pid": k.pid, "create_time": k.create_time()})
            except psutil.Error:
                pass
        return out

    def kill_worker(self, n: int) -> KillEvent | None:
        """SIGKILL a random worker of the current supervisor; ``None`` if there is none."""
        import psutil
        st = self.status()
        if not st or self.sup is None:
            return None
        candidates = [w for w in st.get("workers", [])
                      if not str(w.get("state", "")).startswith(("stopping", "exiting"))]
        self.rng.shuffle(candidates)
        for w in candidates:
            try:
                proc = psutil.Process(int(w["pid"]))
                if proc.ppid() != self.sup.pid:
                    continue    # never kill a process that is not this supervisor's child
            except psutil.Error:
                continue
            ev = KillEvent(n=n, kind="worker", at_s=self.elapsed(), wall=time.time(),
                           user_id=w["user_id"], pid=proc.pid)
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            ev.resumed_at_s = ev.at_s
            self.say(f"kill {n}: worker pid {proc.pid} (user {w['user_id']})")
            return ev
        return None

    def _kill_supervisor_now(self, ev: KillEvent) -> None:
        assert self.sup is not None
        st = self.status(timeout=1.0)
        ev.workers = sorted(int(w["pid"]) for w in (st or {}).get("workers", []))
        children = self._children(self.sup.pid)
        ev.pid = self.sup.pid
        ev.wall = time.time()
        try:
            os.kill(self.sup.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.sup.wait()
        self.orphan_checks.append({"due": time.monotonic() + ORPHAN_GRACE_S, "event": ev.n,
                                   "children": children, "workers": set(ev.workers)})

    def kill_supervisor(self, n: int) -> KillEvent | None:
        """SIGKILL the supervisor, then start a new ``smsd run``; ``None`` if none answers."""
        if self.sup is None or self.status(timeout=1.0) is None:
            return None
        ev = KillEvent(n=n, kind="supervisor", at_s=self.elapsed(), wall=time.time())
        self._kill_supervisor_now(ev)
        time.sleep(self.rng.uniform(0.0, 0.5))
        ev.new_supervisor_pid = self.start_supervisor()
        ev.resumed_at_s = self.elapsed()
        self.say(f"kill {n}: supervisor pid {ev.pid} ({len(ev.workers)} workers) "
                 f"-> new smsd run pid {ev.new_supervisor_pid}")
        self.wait_ready()
        return ev

    def kill_database(self, n: int) -> KillEvent | None:
        """SIGKILL the database server; restart it on the same port and storage soon after."""
        assert self.mongo is not None
        ev = KillEvent(n=n, kind="database", at_s=self.elapsed(), wall=time.time(),
                       pid=self.mongo.pid)
        self.mongo.kill()
        down = self.rng.uniform(0.5, 2.0)
        self.say(f"kill {n}: database pid {ev.pid}, down for {down:.1f} s")
        time.sleep(down)
        self.mongo.start()
        ev.db_down_s = round(self.elapsed() - ev.at_s, 2)
        ev.resumed_at_s = self.elapsed()
        return ev

    def kill_supervisor_db_down(self, n: int) -> KillEvent | None:
        """SIGKILL the database, then the supervisor while it is down; restart both."""
        assert self.mongo is not None
        if self.sup is None or self.status(timeout=1.0) is None:
            return None
        ev = KillEvent(n=n, kind="supervisor-db-down", at_s=self.elapsed(), wall=time.time())
        db_pid = self.mongo.pid
        self.mongo.kill()
        time.sleep(self.rng.uniform(0.2, 1.0))
        self._kill_supervisor_now(ev)
        ev.new_supervisor_pid = self.start_supervisor()
        self.say(f"kill {n}: database pid {db_pid}, then supervisor pid {ev.pid} "
                 f"({len(ev.workers)} workers) while it is down -> new smsd run pid "
                 f"{ev.new_supervisor_pid}")
        self.wait_ready()
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.mongo.start()
        ev.db_down_s = round(self.elapsed() - ev.at_s, 2)
        ev.resumed_at_s = self.elapsed()
        return ev

    def check_orphans(self, final: bool = False) -> None:
        """Children of killed supervisors still alive 5 s later are orphans (``final``: wait)."""
        now = time.monotonic()
        for check in list(self.orphan_checks):
            if not final and now < check["due"]:
                continue
            if final and now < check["due"]:
                time.sleep(max(0.0, check["due"] - now))
            self.orphan_checks.remove(check)
            for child in check["children"]:
                if _alive(child["pid"], child["create_time"]):
                    kind = "worker" if child["pid"] in check["workers"] else "child"
                    self.orphans.append({"kill": check["event"], "pid": child["pid"], "kind": kind})
                    self.say(f"!! orphan: {kind} pid {child['pid']} of the supervisor killed by "
                             f"kill {check['event']} still alive {ORPHAN_GRACE_S:.0f} s later")

    # ------------------------------------------------------------------- plan
    def plan(self) -> list[str]:
        """The kinds of the kills, in order: each chosen kind at least once if there is room."""
        o = self.o
        kinds = list(o.kinds)
        plan = kinds[:o.kills] if o.kills >= len(kinds) else self.rng.sample(kinds, o.kills)
        plan += [self.rng.choice(kinds) for _ in range(o.kills - len(plan))]
        self.rng.shuffle(plan)
        return plan

    def run_kills(self) -> None:
        """Kill on schedule (time- or progress-triggered) until the plan is done or the work is."""
        o = self.o
        plan = self.plan()
        n = len(plan)
        start = self.elapsed()
        window = max(1.0, 0.6 * o.duration - start)
        times = [start + window * (i + self.rng.uniform(0.2, 0.8)) / max(1, n) for i in range(n)]
        fracs = [0.9 * (i + 1) / (n + 1) for i in range(n)]
        spacing = window / max(1, n)
        min_gap = max(0.5, min(1.5, spacing / 4))
        # The next kill waits for the last one's recovery (the processed count
        # rose again) unless that takes longer than this: then it strikes anyway.
        gate = max(min_gap, 2.0 * spacing)
        total = len(self.expected)
        last_resume = self.elapsed()
        last: KillEvent | None = None
        i = 0
        waiting_since: float | None = None
        kill_fn = {"worker": self.kill_worker, "supervisor": self.kill_supervisor,
                   "database": self.kill_database, "supervisor-db-down": self.kill_supervisor_db_down}
        while i < n:
            self.check_supervisor()
            self.check_orphans()
            now = self.elapsed()
            processed, pending = self.monitor.snapshot() if self.monitor else (0, None)
            finished = pending == 0 and processed > 0
            if finished or now > o.duration + o.grace:
                why = "the work was finished" if finished else "past --duration + --grace"
                for kind in plan[i:]:
                    self.skipped.append({"kind": kind, "why": why})
                self.say(f"kills {i + 1}..{n} skipped: {why}")
                return
            due = now >= times[i] or processed >= fracs[i] * total
            recovered = last is None or self.monitor is None or self.monitor.recovered(last)
            if not due or now - last_resume < min_gap or (not recovered and now - last_resume < gate):
                time.sleep(0.1)
                continue
            ev = kill_fn[plan[i]](i + 1)
            if ev is None:
                waiting_since = waiting_since or now
                if now - waiting_since > 10.0:
                    self.skipped.append({"kind": plan[i], "why": "no target (no worker/supervisor up)"})
                    self.say(f"kill {i + 1} ({plan[i]}): no target for 10 s: skipped")
                    i += 1
                    waiting_since = None
                time.sleep(0.1)
                continue
            waiting_since = None
            last = ev
            self.events.append(ev)
            last_resume = ev.resumed_at_s if ev.resumed_at_s is not None else self.elapsed()
            i += 1

    # ---------------------------------------------------------------- finish
    def wait_done(self, deadline: float) -> bool:
        """Until every SMS is processed or quarantined and the daemon is idle (twice in a row)."""
        idle_seen = 0
        last_note = 0.0
        all_done_said = False
        failed_seen: set[str] = set()
        while self.elapsed() < deadline:
            self.check_supervisor()
            self.check_orphans()
            processed, pending = self.monitor.snapshot() if self.monitor else (0, None)
            st = self.status()
            idle = (pending == 0 and st is not None and not st.get("workers")
                    and int((st.get("journal") or {}).get("unflushed") or 0) == 0
                    and all(u.get("status") in ("completed", "quarantined")
                            for u in st.get("users", [])))
            if st is not None:
                failed = {u["user_id"] for u in st.get("users", []) if u.get("status") == "failed"}
                if failed - failed_seen:
                    failed_seen |= failed
                    self.violations.append(f"users marked failed by the supervisor: {sorted(failed)}")
                    self.say(f"!! users marked failed: {sorted(failed)}; resuming them")
                    from ..control import ControlClientError, request
                    try:
                        request(self.socket, "resume", {}, timeout=5.0)
                    except ControlClientError:
                        pass
            if pending == 0 and not all_done_said:
                all_done_said = True
                self.say("every SMS processed or quarantined; waiting for the daemon to go idle")
            idle_seen = idle_seen + 1 if idle else 0
            if idle_seen >= 2:
                return True
            if self.elapsed() - last_note > 15.0:
                last_note = self.elapsed()
                self.say(f"waiting: {processed}/{len(self.expected)} processed, "
                         f"{pending if pending is not None else '?'} pending")
            time.sleep(0.5)
        return False

    def drain(self) -> dict:
        """SIGTERM the supervisor: it must exit 0 and leave no process of any ``smsd run``."""
        assert self.sup is not None
        t = time.monotonic()
        self.sup.send_signal(signal.SIGTERM)
        try:
            code = self.sup.wait(timeout=45.0)
        except subprocess.TimeoutExpired:
            self.violations.append("smsd run did not stop within 45 s of SIGTERM (drain hang)")
            os.killpg(self.sup.pid, signal.SIGKILL)
            code = self.sup.wait()
        took = round(time.monotonic() - t, 2)
        if code != 0:
            self.violations.append(f"smsd run exited with code {code} after SIGTERM (drain), not 0")
        # Every process of every smsd run must be gone once the last one drained.
        time.sleep(0.5)
        left = self._session_members()
        if left:
            self.violations.append(f"processes left after the drain: {left}")
        return {"exit_code": code, "seconds": took, "processes_left": left}

    def _session_members(self) -> list[int]:
        """Live processes of this drill's ``smsd run`` sessions (checked by their config)."""
        import psutil
        out = []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.getpgid(p.pid) not in self.sessions or p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.environ().get("SMSD_CONFIG") == str(self.config):
                    out.append(p.pid)   # ours: a pgid reused by a stranger is never touched
            except (OSError, psutil.Error):
                pass
        return out

    def cleanup(self) -> None:
        """Stop every process the drill started (idempotent; safe after any failure)."""
        for pid in self._session_members() if self.sessions else []:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.sup is not None and self.sup.poll() is None:
            try:
                self.sup.kill()
                self.sup.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.monitor is not None:
            self.monitor.stop_event.set()
            self.monitor.join(15)
            self.monitor = None
        if self.llm is not None:
            try:
                self.llm.stop()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
            self.llm = None
        if self.mongo is not None:
            try:
                self.mongo.stop()
            except Exception:  # noqa: BLE001
                self.mongo.kill()
            self.mongo = None

    # ------------------------------------------------------------------ main
    def run(self) -> dict:
        """The whole drill; returns the report (see :func:`format_report`)."""
        o = self.o
        t_start = time.monotonic()
        self.setup()
        assert self.mongo is not None
        self.origin = time.monotonic()
        self.monitor = Monitor(self.mongo.uri, self.user_ids, self.origin, len(self.expected))
        self.monitor.start()
        pid = self.start_supervisor()
        self.say(f"smsd run pid {pid} started")
        self.wait_ready()
        self.say(f"smsd run ready after {self.elapsed():.1f} s; {o.kills} kills "
                 f"({', '.join(o.kinds)}) over ~{0.6 * o.duration:.0f} s")
        self.run_kills()
        deadline = o.duration + o.grace
        finished = self.wait_done(deadline)
        work_s = round(self.elapsed(), 1)
        if not finished:
            processed, pending = self.monitor.snapshot()
            self.violations.append(f"hang: not finished {deadline:.0f} s after the start "
                                   f"({processed}/{len(self.expected)} processed, {pending} pending)")
            self.say("!! not finished before the deadline")
        else:
            self.say(f"all SMS done after {work_s} s; draining")
        self.check_orphans(final=True)
        drain = self.drain()
        for ev, nxt in zip(self.events, self.events[1:] + [None]):
            if ev.resumed_at_s is None:
                continue
            ev.recovery_s, ev.recovery_note = self.monitor.recovery(
                ev.at_s, ev.resumed_at_s, ev.user_id if ev.kind == "worker" else None,
                until=nxt.at_s if nxt is not None else None, db_was_down=ev.db_down_s is not None)
        self.monitor.stop_event.set()
        self.monitor.join(15)
        stats = self.llm.stats()
        self._save_state({"billed": stats["billed"], "events": [asdict(e) for e in self.events],
                          "concurrency": CONCURRENCY})
        checks = verify_state(self.dir, self.mongo.uri, self.expected, stats["billed"],
                              [asdict(e) for e in self.events], CONCURRENCY)
        report = self.report(checks, stats, drain, work_s, time.monotonic() - t_start)
        return report

    def report(self, checks: dict, stats: dict, drain: dict, work_s: float, total_s: float) -> dict:
        """Assemble the report from the checks, the LLM server's stats and the kills."""
        o = self.o
        r = checks["invariants"]
        billed = stats["billed"]
        by_kind = Counter(e.kind for e in self.events)
        rec_by_kind: dict[str, dict] = {}
        for kind in KINDS:
            vals = [e.recovery_s for e in self.events if e.kind == kind and e.recovery_s is not None]
            if by_kind.get(kind):
                rec_by_kind[kind] = {"n": len(vals), "median_s": _median(vals),
                                     "max_s": round(max(vals), 2) if vals else None}
        orphan_workers = [x for x in self.orphans if x["kind"] == "worker"]
        violations = list(checks["violations"]) + self.violations
        if self.orphans:
            violations.append(f"orphans alive {ORPHAN_GRACE_S:.0f} s after a supervisor kill: "
                              f"{len(orphan_workers)} workers, "
                              f"{len(self.orphans) - len(orphan_workers)} other children")
        return {
            "ok": not violations,
            "violations": violations,
            "seed": o.seed,
            "options": {"users": o.users, "sms_per_user": o.sms, "kills": o.kills,
                        "kill_kinds": list(o.kinds), "faults": o.faults, "duration_s": o.duration,
                        "max_workers": o.max_workers, "requests_per_minute": self.rpm,
                        "batch_size": BATCH_SIZE, "llm_concurrency": CONCURRENCY},
            "dir": str(self.dir),
            "work_s": work_s,
            "total_s": round(total_s, 1),
            "sms": {"seeded": r["sms_seeded"], "processed": r["sms_processed"],
                    "quarantined": r["sms_quarantined"], "lost": r["sms_lost"]},
            "transactions": {"expected": r["tx_expected"], "found": r["tx_found"],
                             "missing": r["tx_missing"], "duplicated": r["tx_duplicated"],
                             "wrong": r["tx_wrong"], "stray": checks["tx_stray"],
                             "not_from_journal": checks["tx_not_from_journal"],
                             "money_not_decimal128": r["money_not_decimal128"]},
            "llm": {"http_calls": stats["calls"], "faults": stats["faults"],
                    "sms_billed": sum(billed.values()),
                    "journal_calls": checks["journal_calls"],
                    "calls_cut_in_flight": checks["calls_cut"],
                    "calls_cut_unexplained": checks["calls_cut_unexplained"],
                    "sms_asked_more_than_once": r["sms_asked_more_than_once"],
                    "sms_paid_more_than_once": sum(1 for v in billed.values() if v > 1),
                    "repeats_explained": r["repeats_explained"],
                    "repeats_by_kill_in_flight": r["repeats_in_flight"],
                    "repeats_by_failed_call": r["repeats_failed"],
                    "repeats_by_fault_answer": r["repeats_without_answer"],
                    "repeats_unexplained": r["repeats_unexplained"],
                    "asked_after_answer": r["asked_after_answer"]},
            "kills": {"planned": o.kills, "done": len(self.events),
                      "by_kind": {k: by_kind.get(k, 0) for k in KINDS},
                      "skipped": len(self.skipped),
                      "skipped_why": dict(Counter(x["why"] for x in self.skipped)),
                      "events": [asdict(e) for e in self.events]},
            "orphans": {"supervisor_kills_checked": sum(1 for e in self.events
                                                        if e.kind in SUPERVISOR_KINDS),
                        "workers": len(orphan_workers),
                        "other_children": len(self.orphans) - len(orphan_workers),
                        "details": self.orphans},
            "recovery_s": {"by_kind": rec_by_kind},
            "drain": drain,
            "invariants": r,
            "logs": {"daemon": "smsd.log", "runs": f"smsd-run-1..{len(self.log_files)}.log",
                     "database": "mongo.log"},
        }


# ----------------------------------------------------------------------------- verification

def _cut_calls_unexplained(calls: list[dict], events: list[dict], concurrency: int) -> int:
    """Calls left 'sent' that no kill explains (DESIGN.md invariant 5's bound).

    A call still 'sent' after the drain was cut by a kill of its worker; each
    killed worker can leave at most ``concurrency`` of them.  A worker kill
    explains calls of its user sent before it; a supervisor kill (its workers
    die with it) explains calls of any user sent before it (plus 1 s for the
    death signal).  Matching is greedy, most constrained call first.
    """
    sent = defaultdict(list)
    for c in calls:
        if c["state"] == "sent":
            sent[c["user_id"]].append(float(c["sent_at"]))
    unexplained = 0
    for user, times in sent.items():
        slots = sorted(
            (e["wall"] + (0.2 if e["kind"] == "worker" else 1.0))
            for e in events
            if e["kind"] in SUPERVISOR_KINDS or (e["kind"] == "worker" and e["user_id"] == user))
        cap = [concurrency] * len(slots)
        for t in sorted(times, reverse=True):
            j = bisect.bisect_left(slots, t)
            while j < len(slots) and cap[j] == 0:
                j += 1
            if j < len(slots):
                cap[j] -= 1
            else:
                unexplained += 1
    return unexplained


def verify_state(directory: Path, uri: str, expected: dict[Any, dict], billed: dict[str, int],
                 events: list[dict] | None, concurrency: int) -> dict:
    """Run every check on a stopped drill: :func:`smsd.lab.invariants.verify` plus the drill's own.

    Returns ``{"invariants": Report dict, "violations": [...], "tx_stray",
    "tx_not_from_journal", "processed_without_journal", "journal_calls",
    "calls_cut", "calls_cut_unexplained"}``.
    """
    from pymongo import MongoClient

    from .invariants import journal_answers, journal_calls, verify
    from ..model import sms_key

    state_dir = Path(directory) / "state"
    client = MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=10000)
    try:
        db = client[DB_NAME]
        report = verify(db, expected, state_dir=state_dir, billed=billed)
        violations = list(report.violations)
        answers = journal_answers(state_dir)
        # Invariant 1, from the outside: what MongoDB holds came from a journaled answer.
        not_from_journal = 0
        keys = {sms_key(k) for k in expected}
        for tx in db["financial_transactions"].find({}, {"sms_key": 1, "source.call_id": 1}):
            if tx.get("sms_key") in keys and \
                    (tx.get("source") or {}).get("call_id") != answers.get(tx.get("sms_key")):
                not_from_journal += 1
        processed_without_journal = sum(
            1 for d in db["sms_fin_rawdata"].find({"isprocessed": True}, {"_id": 1})
            if sms_key(d["_id"]) not in answers)
        tx_total = db["financial_transactions"].count_documents({})
        stray = max(0, tx_total - report.tx_found)
    finally:
        client.close()
    calls = journal_calls(state_dir)
    cut = sum(1 for c in calls if c["state"] == "sent")
    cut_unexplained = _cut_calls_unexplained(calls, events, concurrency) if events is not None else 0
    if not_from_journal:
        violations.append(f"transactions whose source call is not the journaled answer: {not_from_journal}")
    if processed_without_journal:
        violations.append(f"SMS processed with no result in the journal: {processed_without_journal}")
    if stray:
        violations.append(f"transactions for SMS that were never seeded: {stray}")
    if cut_unexplained:
        violations.append(f"LLM calls cut in flight that no kill explains (more than "
                          f"llm_concurrency={concurrency} per killed worker): {cut_unexplained}")
    return {"invariants": report.to_dict(), "violations": violations, "tx_stray": stray,
            "tx_not_from_journal": not_from_journal,
            "processed_without_journal": processed_without_journal,
            "journal_calls": len(calls), "calls_cut": cut, "calls_cut_unexplained": cut_unexplained}


def verify_dir(directory: str | os.PathLike) -> dict:
    """Re-check a drill directory kept with ``--keep`` (its own short-lived database server).

    Returns the checks of :func:`verify_state` plus ``ok``; raises
    :class:`DrillError` if the directory is not a drill's.
    """
    from bson import json_util

    from ..embedded import EmbeddedMongo

    directory = Path(directory).resolve()
    path = directory / STATE_FILE
    if not path.is_file():
        raise DrillError(f"{directory} holds no {STATE_FILE}: not a kept drill directory")
    state = json_util.loads(path.read_text())
    expected = {row["_id"]: row["answer"] for row in state["expected"]}
    mongo = EmbeddedMongo(directory / state.get("mongo_path", "mongo"),
                          log_path=directory / "mongo-verify.log")
    mongo.start()
    try:
        checks = verify_state(directory, mongo.uri, expected, state.get("billed") or {},
                              state.get("events"), int(state.get("concurrency") or CONCURRENCY))
    finally:
        mongo.stop()
    checks["ok"] = not checks["violations"]
    checks["dir"] = str(directory)
    return checks


# ----------------------------------------------------------------------------- output

def format_report(rep: dict) -> str:
    """The human-readable report."""
    s, t, llm, k, o = rep["sms"], rep["transactions"], rep["llm"], rep["kills"], rep["orphans"]
    rec = rep["recovery_s"]["by_kind"]
    lines = [
        f"smsd drill (seed {rep['seed']}): {'OK' if rep['ok'] else 'VIOLATIONS'}",
        f"  work          {rep['work_s']} s to finish, {rep['total_s']} s in all; "
        f"{rep['options']['users']} users x {rep['options']['sms_per_user']} SMS, "
        f"max_workers {rep['options']['max_workers']}, rpm cap {rep['options']['requests_per_minute']:g}",
        f"  SMS           {s['seeded']} seeded, {s['processed']} processed, "
        f"{s['quarantined']} quarantined, {s['lost']} lost",
        f"  transactions  {t['expected']} expected, {t['found']} found, {t['missing']} missing, "
        f"{t['duplicated']} duplicated, {t['wrong']} wrong, {t['stray']} stray, "
        f"{t['not_from_journal']} not from the journal",
        f"  LLM           {llm['http_calls']} HTTP calls (faults {llm['faults'] or 'none'}), "
        f"{llm['journal_calls']} journal calls, {llm['sms_billed']} SMS billed",
        f"  repeats       {llm['sms_asked_more_than_once']} SMS asked more than once "
        f"({llm['sms_paid_more_than_once']} paid more than once): "
        f"{llm['repeats_explained']} repeats explained ({llm['repeats_by_kill_in_flight']} in flight "
        f"at a kill, {llm['repeats_by_failed_call']} failed call, {llm['repeats_by_fault_answer']} "
        f"faulty answer), {llm['repeats_unexplained']} unexplained",
        f"  cut calls     {llm['calls_cut_in_flight']} calls cut in flight by kills, "
        f"{llm['calls_cut_unexplained']} beyond the bound",
        f"  kills         {k['done']}/{k['planned']}: "
        + ", ".join(f"{kind} {n}" for kind, n in k["by_kind"].items())
        + (f"; {k['skipped']} skipped ({', '.join(k['skipped_why'])})" if k["skipped"] else ""),
        f"  orphans       {o['workers']} workers, {o['other_children']} other children alive "
        f"{ORPHAN_GRACE_S:.0f} s after {o['supervisor_kills_checked']} supervisor kills",
        "  recovery      " + (", ".join(
            f"{kind} median {v['median_s']} s / max {v['max_s']} s (n={v['n']})"
            for kind, v in rec.items()) or "no kills"),
        f"  drain         exit {rep['drain']['exit_code']} after {rep['drain']['seconds']} s",
    ]
    for ev in k["events"]:
        lines.append(f"    kill {ev['n']:>3} {ev['kind']:<18} at {ev['at_s']:7.1f} s  "
                     + (f"user {ev['user_id']} " if ev["user_id"] else "")
                     + (f"db down {ev['db_down_s']} s " if ev["db_down_s"] is not None else "")
                     + (f"-> flush again after {ev['recovery_s']} s" if ev["recovery_s"] is not None
                        else f"-> {ev['recovery_note']}"))
    for v in rep["violations"]:
        lines.append(f"  VIOLATION: {v}")
    lines.append(f"  directory     {rep['dir']}" + (" (kept)" if rep.get("kept") else " (removed)"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    """The ``smsd drill`` command line."""
    p = argparse.ArgumentParser(
        prog="smsd drill",
        description="Kill -9 recovery drill: run smsd against an embedded database and a faulty "
                    "local LLM, SIGKILL workers, the supervisor and the database while it works, "
                    "then check every invariant of DESIGN.md (docs/DRILLS.md).")
    p.add_argument("--users", type=int, default=4, help="users to seed (default 4)")
    p.add_argument("--sms", type=int, default=50, help="SMS per user (default 50)")
    p.add_argument("--kills", type=int, default=8, help="kills to make (default 8)")
    p.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True,
                   help="LLM faults: 429, 500, partial, malformed at 2%% each (default on)")
    p.add_argument("--duration", type=float, default=None,
                   help="max run time in seconds; kills spread over its first 60%% "
                        "(default max(30, 6 x kills))")
    p.add_argument("--grace", type=float, default=None,
                   help="extra seconds allowed after --duration to finish (default max(60, duration/4))")
    p.add_argument("--seed", type=int, default=None, help="RNG seed (default: random, printed)")
    p.add_argument("--kill-kinds", default=",".join(KINDS),
                   help=f"comma-separated subset of {','.join(KINDS)} (default all)")
    p.add_argument("--max-workers", type=int, default=4, help="supervisor.max_workers (default 4)")
    p.add_argument("--pace", default="auto",
                   help="llm.requests_per_minute: auto (spread the work over ~60%% of --duration), "
                        "off, or a number")
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("--keep", action="store_true", help="keep the directory (kept anyway on a violation)")
    p.add_argument("--dir", help="work in this directory instead of a temporary one (implies --keep)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.add_argument("--verify-only", metavar="DIR",
                   help="only re-check a directory kept by an earlier drill, then exit")
    return p


def _options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Options:
    kinds = tuple(k.strip().replace("_", "-") for k in args.kill_kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        parser.error(f"--kill-kinds: unknown {bad or 'empty'}; choose from {','.join(KINDS)}")
    if args.users < 1 or args.sms < 1 or args.kills < 0 or args.max_workers < 1:
        parser.error("--users, --sms and --max-workers must be >= 1, --kills >= 0")
    if args.pace not in ("auto", "off"):
        try:
            if float(args.pace) <= 0:
                raise ValueError
        except ValueError:
            parser.error("--pace: auto, off or a positive number")
    duration = args.duration if args.duration is not None else max(30.0, 6.0 * args.kills)
    if duration <= 0:
        parser.error("--duration must be > 0")
    grace = args.grace if args.grace is not None else max(60.0, duration / 4)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)
    return Options(users=args.users, sms=args.sms, kills=args.kills, faults=args.faults,
                   duration=duration, seed=seed, kinds=kinds, max_workers=args.max_workers,
                   grace=grace, pace=args.pace, keep=args.keep or bool(args.dir), dir=args.dir,
                   quiet=args.quiet)


class _Interrupted(BaseException):
    """SIGTERM/SIGHUP to the drill: unwind through the finally blocks."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``smsd drill``; returns 0 only if no invariant was violated."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"[drill {time.monotonic() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    if args.verify_only:
        from ..embedded import EmbeddedUnavailable
        try:
            checks = verify_dir(args.verify_only)
        except (DrillError, EmbeddedUnavailable) as exc:
            print(f"smsd drill: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if args.json:
            print(json.dumps(checks, indent=2, default=str))
        else:
            print(f"smsd drill --verify-only {checks['dir']}: {'OK' if checks['ok'] else 'VIOLATIONS'}")
            for v in checks["violations"]:
                print(f"  VIOLATION: {v}")
        return EXIT_OK if checks["ok"] else EXIT_VIOLATION

    opts = _options(args, parser)
    say(f"seed {opts.seed}")

    def on_signal(signum: int, _frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    drill = Drill(opts, say)
    report: dict | None = None
    try:
        report = drill.run()
    except (_Interrupted, KeyboardInterrupt) as exc:
        say(f"interrupted ({exc or 'SIGINT'}): stopping every process")
        return 130
    except Exception as exc:  # noqa: BLE001 - report the setup failure, clean up below
        from ..embedded import EmbeddedError, EmbeddedUnavailable
        if isinstance(exc, (DrillError, EmbeddedUnavailable, EmbeddedError)):
            print(f"smsd drill: {exc}", file=sys.stderr)
            return EXIT_USAGE
        raise
    finally:
        drill.cleanup()
        for s, h in old.items():
            signal.signal(s, h)
        keep = opts.keep or (report is not None and not report["ok"]) or report is None
        if drill.dir is not None and not keep:
            shutil.rmtree(drill.dir, ignore_errors=True)
        elif drill.dir is not None:
            say(f"kept {drill.dir}")
        if report is not None:
            report["kept"] = keep
            if keep and drill.dir is not None:
                (drill.dir / "drill-report.json").write_text(json.dumps(report, indent=2, default=str))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print(format_report(report))
    return EXIT_OK if report["ok"] else EXIT_VIOLATION


if __name__ == "__main__":
    sys.exit(main())
