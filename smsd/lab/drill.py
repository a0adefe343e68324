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
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from .drill_common import (BATCH_SIZE, CONCURRENCY, DB_NAME, FAULTS, KINDS, LATENCY, STATE_FILE,
                           DrillError, KillEvent, Options, build_seed)
from .drill_kills import KillsMixin
from .drill_monitor import Monitor
from .drill_report import ReportMixin, format_report, verify_dir, verify_state

EXIT_OK = 0
EXIT_VIOLATION = 1
EXIT_USAGE = 2


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


def _clean_env(config: Path, api_key: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMSD_", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_"))
           and k not in ("OPENAI_API_KEY", "CREDENTIALS_DIRECTORY", "STATE_DIRECTORY",
                         "RUNTIME_DIRECTORY")}
    env["SMSD_CONFIG"] = str(config)
    env["PYTHONUNBUFFERED"] = "1"
    if api_key:
        env["OPENAI_API_KEY"] = api_key
    return env


def _toml(conf: dict[str, dict]) -> str:
    lines = []
    for section, values in conf.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the drill

class Drill(KillsMixin, ReportMixin):
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
        self.llm = LlmServer(KnownAnswers(table), model="smsd-drill", api_key=o.api_key, **faults).start()
        self.say(f"LLM server on {self.llm.url} (faults {'on' if o.faults else 'off'})")

        calls = math.ceil(o.sms / BATCH_SIZE) * o.users
        if o.pace == "auto":
            self.rpm = round(calls * 1.3 / (0.6 * o.duration / 60.0), 1)
        elif o.pace != "off":
            self.rpm = float(o.pace)
        conf = {
            "mongo": {"uri": uri, "db": DB_NAME, "timeout_ms": 2000},
            "llm": {"base_url": self.llm.url, "model": "smsd-drill", "key_header": True, "batch_size": BATCH_SIZE,
                    "concurrency": CONCURRENCY, "timeout": 30.0, "max_retries": 3,
                    "backoff_base": 0.05, "backoff_max": 0.5,
                    "requests_per_minute": self.rpm},
            "journal": {"state_dir": str(self.dir / "state"), "max_backlog": 25},
            "pipeline": {"page_size": 50, "worker_max_sms": 100},
            "supervisor": {"runtime_dir": str(self.dir / "run"), "max_workers": o.max_workers,
                           "discovery_interval": 1.0, "restart_backoff": 0.2,
                           "restart_backoff_max": 2.0, "crash_loop_count": 1000,
                           "drain_timeout": 20.0, "log_level": "INFO", "log_format": o.log_format,
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
                env=_clean_env(self.config, self.o.api_key), stdin=subprocess.DEVNULL, stdout=log,
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
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="supervisor.log_format of the daemon under drill (default text)")
    p.add_argument("--api-key", help="an API key the LLM server requires and smsd is given "
                                     "(OPENAI_API_KEY); default none")
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
                   quiet=args.quiet, log_format=args.log_format, api_key=args.api_key)


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
