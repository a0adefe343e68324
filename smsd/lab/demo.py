"""``smsd demo``: the whole job on one machine, with a crash in the middle.

What a new user sees after ``make demo`` (no MongoDB, no API key needed):

1. a fresh work directory (``./var/demo``) with a ``config.toml`` in which
   ``mongo.uri = "embedded"``: ``smsd run`` starts and supervises its own
   MongoDB-wire server (``secantusd-py``, the ``embedded`` extra);
2. a local OpenAI-compatible server (:mod:`smsd.lab.llmserver`) answering with the
   offline rules extractor (:mod:`smsd.rules`), with a little latency so
   that calls are in flight at any moment — or, when ``OPENAI_API_KEY`` is
   set, the real LLM (``SMSD_LLM_BASE_URL``, ``SMSD_LLM_MODEL`` optional);
3. SMS seeded for a few users: labelled real bank SMS
   (``smsd/data/sms_fixtures.jsonl``), synthetic OTP and promotion texts, and
   malformed documents (no text) that must end up quarantined;
4. ``smsd run``, SIGKILLed about halfway (its workers and the embedded server
   die with it), started again, run to the end, ``smsctl status``, SIGTERM
   (drain);
5. a summary and the invariant check of :func:`smsd.lab.invariants.verify`:
   nothing lost, nothing duplicated.

Exit 0 when every invariant holds, 1 when one does not, 3 when the demo could
not run (e.g. the embedded extra is missing).  Every process the demo starts
is stopped, also on Ctrl-C.  SMS text and the API key are never printed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

EXIT_OK = 0
EXIT_INVARIANT = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 3
EXIT_INTERRUPTED = 130

MARKER = ".smsd-demo"
DB_NAME = "smsd_demo"
DATA_FILE = Path(__file__).resolve().parent / "data" / "sms_fixtures.jsonl"
SYNTHETIC_SENDER = "AX-DEMOBK"
OTHER = {"kind": "other", "transactions": []}

#: Synthetic texts that are not transactions (and carry amounts to tempt an extractor).
SYNTHETIC: tuple[tuple[str, str], ...] = (
    ("otp", "{code} is your OTP for login to NetBanking. Valid for 5 minutes. "
            "Do not share it with anyone. - Demo Bank"),
    ("otp", "Use OTP {code} to authorise a payment of Rs {amount} at DEMO STORE on your card "
            "XX{mask}. Never share your OTP."),
    ("otp", "Your OTP for adding a beneficiary is {code}. If not initiated by you, "
            "call 1800-000-0000."),
    ("promotion", "Get up to 20% cashback on your next 3 UPI payments above Rs 500! "
                  "Offer valid till 31 Jan. T&C apply."),
    ("promotion", "Pre-approved personal loan of Rs 5,00,000 at 10.5% p.a. is waiting for you. "
                  "Apply now in 2 minutes."),
)


class DemoFailed(Exception):
    """The demo could not go on (a process did not start, a timeout)."""


@dataclass
class Plan:
    """What the demo does: its size, its LLM and where it keeps its files."""

    workdir: Path
    users: int
    sms_per_user: int
    malformed: int
    latency_ms: float
    kill_at: float
    timeout: float
    real_llm: bool
    base_url: str = ""
    model: str = ""
    batch_size: int = 5
    concurrency: int = 2

    @property
    def config(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def runtime_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def mongo_path(self) -> Path:
        return self.workdir / "mongo"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "smsd.log"


@dataclass
class Seeded:
    """What was put into ``sms_fin_rawdata``."""

    expected: dict[Any, dict] = field(default_factory=dict)   # raw _id -> expected answer
    malformed: list[Any] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    fixtures: int = 0
    synthetic: int = 0

    @property
    def total(self) -> int:
        return len(self.expected)


# --------------------------------------------------------------------------- output

class Out:
    """Prints one line per step, prefixed with the seconds since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, message: str = "") -> None:
        prefix = f"[{self.elapsed():5.1f}s] " if message else ""
        print(prefix + message, flush=True)

    def block(self, text: str, indent: str = "    ") -> None:
        for line in text.rstrip("\n").splitlines():
            print(indent + line if line.strip() else "", flush=True)


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------- processes

def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def _descendants(pid: int) -> list[Any]:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _is_embedded(proc: Any) -> bool:
    try:
        return any("secantusd" in part for part in proc.cmdline()[:2])
    except Exception:  # noqa: BLE001 - gone or unreadable
        return False


def child_env(plan: Plan) -> dict[str, str]:
    """The environment of ``smsd run`` and ``smsctl``: the demo's config, no stray overrides.

    Every ``SMSD_*`` variable of the caller's shell is dropped (a
    ``SMSD_MONGO_URI`` there must not send the demo to a real database); the
    API key and the LLM settings pass only in real-LLM mode.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SMSD_") and k not in ("OPENAI_API_KEY", "NOTIFY_SOCKET",
                                                      "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                                                      "CREDENTIALS_DIRECTORY")}
    if os.environ.get("SMSD_SECANTUSD"):
        env["SMSD_SECANTUSD"] = os.environ["SMSD_SECANTUSD"]
    if plan.real_llm:
        env["OPENAI_API_KEY"] = os.environ["OPENAI_API_KEY"]
    env["SMSD_CONFIG"] = str(plan.config)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class SmsdRun:
    """One ``smsd run`` subprocess in its own session, logging to the demo's log file."""

    def __init__(self, plan: Plan, number: int) -> None:
        self.plan = plan
        self.number = number
        with open(plan.log, "ab") as log:
            log.write(f"\n===== smsd run #{number} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smsd.cli", "--config", str(plan.config), "run"],
                cwd=str(plan.workdir), env=child_env(plan), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def status(self, timeout: float = 5.0) -> dict | None:
        """``smsctl status --json`` as a dict, or ``None`` while it does not answer."""
        from .. import control
        try:
            return control.request(self.plan.socket, "status", {}, timeout=timeout)
        except (control.ControlClientError, OSError):
            return None

    def wait_ready(self, timeout: float) -> dict:
        """Wait until the supervisor answers on its control socket with MongoDB up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise DemoFailed(f"smsd run exited with code {self.proc.returncode} at start-up; "
                                 f"see {_show(self.plan.log)}")
            reply = self.status(timeout=2.0)
            if reply and (reply.get("mongo") or {}).get("ok"):
                return reply
            time.sleep(0.1)
        raise DemoFailed(f"smsd run did not become ready within {timeout:.0f} s; "
                         f"see {_show(self.plan.log)}")

    def kill9(self) -> int:
        """SIGKILL the supervisor alone (not its group): its children must die by themselves."""
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM (drain), wait; SIGKILL the whole group after ``timeout``."""
        if self.running():
            try:
                self.proc.send_signal(signal.SIGTERM)
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.proc.poll()

    def kill_group(self) -> None:
        """Last resort: SIGKILL the supervisor's whole session and reap it."""
        for pid in [self.proc.pid] + [p.pid for p in _descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- set-up

def prepare_workdir(workdir: Path) -> None:
    """Wipe ``workdir`` for a fresh demo; refuse a non-empty directory the demo did not make."""
    if workdir.exists():
        if not workdir.is_dir():
            raise DemoFailed(f"{workdir} exists and is not a directory")
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise DemoFailed(f"{workdir} is not empty and was not made by smsd demo: "
                             "not wiping it; choose another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `smsd demo`; wiped at the start of every demo\n")


def write_config(plan: Plan, mongo_port: int) -> None:
    """The demo's config.toml: embedded MongoDB, everything under the work directory."""
    conf: dict[str, dict[str, Any]] = {
        "mongo": {"uri": "embedded", "db": DB_NAME, "embedded_path": str(plan.mongo_path),
                  "embedded_port": mongo_port, "timeout_ms": 2000},
        "llm": {"extractor": "llm", "base_url": plan.base_url, "model": plan.model,
                "batch_size": plan.batch_size, "concurrency": plan.concurrency,
                "timeout": 60.0 if plan.real_llm else 10.0, "max_retries": 3,
                "backoff_base": 0.2, "backoff_max": 2.0},
        "journal": {"state_dir": str(plan.state_dir)},
        "pipeline": {"max_attempts": 3, "page_size": 50},
        "supervisor": {"runtime_dir": str(plan.runtime_dir), "max_workers": 4,
                       "discovery_interval": 1.0, "restart_backoff": 0.2, "drain_timeout": 20.0,
                       "log_level": "INFO"},
    }
    lines = ["# Written by `smsd demo`; wiped with the work directory at the next demo.",
             "# The API key is never in this file (OPENAI_API_KEY)."]
    for section, values in conf.items():
        lines.append(f"\n[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    plan.config.write_text("\n".join(lines) + "\n")


def fixture_lines() -> list[dict]:
    """The labelled fixture SMS (``smsd/data/sms_fixtures.jsonl``)."""
    with open(DATA_FILE, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def build_documents(plan: Plan, seed: int = 7) -> tuple[list[dict], Seeded]:
    """The SMS documents to seed and what each should become."""
    from bson import ObjectId

    rng = random.Random(seed)
    lines = fixture_lines()
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs: list[dict] = []
    seeded = Seeded()
    for u in range(plan.users):
        user_id = f"demo-user-{u + 1:02d}"
        seeded.users.append(user_id)
        for i in range(plan.sms_per_user):
            raw_id = ObjectId()
            doc: dict[str, Any] = {"_id": raw_id, "user_id": user_id,
                                   "received_at": base + timedelta(hours=u, minutes=i),
                                   "isprocessed": False}
            if i % 10 == 9:   # one in ten: an OTP or a promotion, not a transaction
                kind, template = SYNTHETIC[(u + i) % len(SYNTHETIC)]
                doc["body"] = template.format(code=f"{rng.randrange(10**6):06d}",
                                              amount=f"{rng.randrange(100, 9999):,}.00",
                                              mask=f"{rng.randrange(10**4):04d}")
                doc["sender"] = SYNTHETIC_SENDER
                seeded.expected[raw_id] = {"kind": kind, "transactions": []}
                seeded.synthetic += 1
            else:
                line = lines[(u * plan.sms_per_user + i) % len(lines)]
                doc["body"] = line["text"]
                if line.get("sender"):
                    doc["sender"] = line["sender"]
                seeded.expected[raw_id] = line["expected"]
                seeded.fixtures += 1
            docs.append(doc)
    for m in range(plan.malformed):   # no text at all, or only blanks: quarantined, never sent
        raw_id = ObjectId()
        doc = {"_id": raw_id, "user_id": seeded.users[m % len(seeded.users)],
               "sender": SYNTHETIC_SENDER, "received_at": base, "isprocessed": False}
        if m % 2:
            doc["body"] = "   "
        docs.append(doc)
        seeded.expected[raw_id] = dict(OTHER)
        seeded.malformed.append(raw_id)
    return docs, seeded


def seed_database(plan: Plan, mongo_port: int, docs: list[dict]) -> None:
    """Insert ``docs`` through a short-lived embedded server on smsd's own storage and port.

    ``smsd run`` starts its embedded server itself; seeding first, with the
    same storage directory and port, then stopping, is the simplest way to
    have the SMS there when it does (a journaled write survives the stop).
    """
    import pymongo
    from pymongo.write_concern import WriteConcern

    from ..embedded import EmbeddedMongo

    server = EmbeddedMongo(plan.mongo_path, port=mongo_port,
                           log_path=plan.mongo_path.parent / "embedded-mongo.log")
    try:
        uri = server.start()
        client = pymongo.MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=5000)
        try:
            coll = client[DB_NAME].get_collection("sms_fin_rawdata",
                                                  write_concern=WriteConcern(w="majority", j=True))
            coll.insert_many(docs, ordered=False)
        finally:
            client.close()
    finally:
        server.stop()


# --------------------------------------------------------------------------- watching

class Progress:
    """Counts processed and quarantined SMS straight from MongoDB (the ground truth)."""

    def __init__(self, uri: str, users: list[str]) -> None:
        import pymongo
        self.client = pymongo.MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=500,
                                          connectTimeoutMS=500, socketTimeoutMS=2000)
        self.raw = self.client[DB_NAME]["sms_fin_rawdata"]
        self.users = users

    def counts(self) -> tuple[int, int] | None:
        """``(processed, quarantined)``, or ``None`` while MongoDB does not answer."""
        from pymongo.errors import PyMongoError
        try:
            processed = self.raw.count_documents({"user_id": {"$in": self.users}, "isprocessed": True})
            quarantined = self.raw.count_documents({"user_id": {"$in": self.users},
                                                    "isprocessed": {"$ne": True},
                                                    "smsd_quarantine": {"$exists": True}})
        except PyMongoError:
            return None
        return processed, quarantined

    def close(self) -> None:
        self.client.close()


def watch(run: SmsdRun, progress: Progress, total: int, out: Out, *, until: Callable[[int], bool],
          deadline: float, every: float = 1.0) -> int:
    """Print ``processed X/N`` about every ``every`` s until ``until(done)``; return ``done``."""
    last_print, last_done = 0.0, -1
    while True:
        if not run.running():
            raise DemoFailed(f"smsd run exited unexpectedly (code {run.proc.returncode}); "
                             f"see {_show(run.plan.log)}")
        counts = progress.counts()
        done = sum(counts) if counts else last_done
        now = time.monotonic()
        if counts and done != last_done and (now - last_print >= every or until(done)):
            processed, quarantined = counts
            out(f"processed {processed}/{total}" + (f", quarantined {quarantined}" if quarantined else ""))
            last_print, last_done = now, done
        if counts and until(done):
            return done
        if now > deadline:
            raise DemoFailed(f"timed out at {max(done, 0)}/{total} SMS; see {_show(run.plan.log)}")
        time.sleep(0.1)


def wait_settled(run: SmsdRun, users: list[str], deadline: float) -> dict:
    """Wait until the supervisor reports every user finished, no worker and no journal backlog."""
    reply: dict | None = None
    while time.monotonic() < deadline:
        reply = run.status()
        if reply:
            states = {u["user_id"]: u.get("status") for u in reply.get("users") or []}
            finished = all(states.get(u) in ("completed", "quarantined") for u in users)
            if finished and not reply.get("workers") and not (reply.get("journal") or {}).get("unflushed"):
                return reply
        time.sleep(0.2)
    raise DemoFailed("smsd did not settle (users finished, no workers, empty journal backlog) in time")


def smsctl_status(plan: Plan) -> str:
    """The real ``smsctl status`` table (a subprocess, as an operator would run it)."""
    done = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(plan.socket), "status"],
                          env=child_env(plan), capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else f"(smsctl status exited {done.returncode}: {done.stderr.strip()})"


# --------------------------------------------------------------------------- checking

def journal_answers(state_dir: Path) -> dict[str, dict]:
    """Every journaled answer, ``{sms_key: {"kind", "transactions"}}`` (read-only)."""
    answers: dict[str, dict] = {}
    for path in sorted((state_dir / "journal").glob("*.sqlite")):
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=2.0)
        try:
            for key, kind, txs in conn.execute("SELECT sms_key, kind, transactions FROM results"):
                answers[key] = {"kind": kind, "transactions": json.loads(txs)}
        finally:
            conn.close()
    return answers


def journal_totals(state_dir: Path) -> dict[str, int]:
    """Call counters summed over every user's journal (see :meth:`smsd.journal.Journal.stats`)."""
    from ..journal import scan
    totals: dict[str, int] = {}
    for stats in scan(state_dir).values():
        for key in ("calls", "repeated_calls", "repeated_sms", "sent_calls", "failed_calls"):
            totals[key] = totals.get(key, 0) + int(stats.get(key) or 0)
    return totals


@dataclass
class Outcome:
    """The figures the summary prints."""

    report: Any
    transactions: int
    quarantined_malformed: int
    checks: list[str]

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.checks


def check(plan: Plan, mongo_port: int, seeded: Seeded, billed: dict[str, int] | None) -> Outcome:
    """Run :func:`smsd.lab.invariants.verify` on the stopped system (its own short-lived server).

    With the local server the transactions are compared with the fixture
    labels; with a real LLM with what it answered (the journal), since its
    answers may differ from the labels.
    """
    import pymongo

    from ..embedded import EmbeddedMongo
    from .invariants import verify
    from ..model import sms_key

    expected = seeded.expected
    if plan.real_llm:
        answers = journal_answers(plan.state_dir)
        expected = {raw_id: answers.get(sms_key(raw_id), dict(OTHER)) for raw_id in seeded.expected}
    server = EmbeddedMongo(plan.mongo_path, port=mongo_port,
                           log_path=plan.mongo_path.parent / "embedded-mongo.log")
    try:
        client = pymongo.MongoClient(server.start(), directConnection=True, serverSelectionTimeoutMS=5000)
        try:
            db = client[DB_NAME]
            report = verify(db, expected, state_dir=plan.state_dir, billed=billed)
            transactions = db["financial_transactions"].count_documents({"user_id": {"$in": seeded.users}})
            quarantined_malformed = db["sms_fin_rawdata"].count_documents(
                {"_id": {"$in": seeded.malformed}, "smsd_quarantine": {"$exists": True}})
        finally:
            client.close()
    finally:
        server.stop()
    checks = []
    if quarantined_malformed != len(seeded.malformed):
        checks.append(f"{len(seeded.malformed) - quarantined_malformed} malformed SMS not quarantined")
    if not plan.real_llm and report.sms_quarantined != len(seeded.malformed):
        checks.append(f"{report.sms_quarantined - quarantined_malformed} well-formed SMS quarantined")
    return Outcome(report, transactions, quarantined_malformed, checks)


# --------------------------------------------------------------------------- the demo

def run_demo(plan: Plan, out: Out, cleanups: list[Callable[[], None]]) -> int:
    """Every step of the demo; ``cleanups`` collects what must be stopped whatever happens."""
    from ..embedded import EmbeddedUnavailable, find_executable, free_port

    try:
        find_executable()
    except EmbeddedUnavailable as exc:
        print(f"smsd demo: the embedded MongoDB-wire server is missing: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN

    deadline = time.monotonic() + plan.timeout
    prepare_workdir(plan.workdir)
    mongo_port = free_port()

    llm_server = None
    if plan.real_llm:
        out(f"LLM: {plan.base_url}, model {plan.model} (API key from OPENAI_API_KEY)")
    else:
        from .llmserver import LlmServer, rules_extractor
        llm_server = LlmServer(rules_extractor(), "127.0.0.1", 0, latency_ms=plan.latency_ms,
                               latency_jitter_ms=plan.latency_ms / 2, seed=1).start()
        cleanups.append(llm_server.stop)
        plan.base_url = llm_server.url
        out(f"local OpenAI-compatible LLM server on {plan.base_url} "
            f"(offline rules extractor, {plan.latency_ms:.0f} ms latency; no API key needed)")
    write_config(plan, mongo_port)
    out(f"work dir {_show(plan.workdir)}: config.toml with mongo.uri = \"embedded\" "
        f"(port {mongo_port}), smsd's log in {_show(plan.log)}")

    docs, seeded = build_documents(plan)
    seed_database(plan, mongo_port, docs)
    out(f"seeded {seeded.total} SMS for {len(seeded.users)} users: {seeded.fixtures} real bank SMS "
        f"(labelled fixtures), {seeded.synthetic} OTP/promotion texts, "
        f"{len(seeded.malformed)} malformed (no text)")

    # ---- run 1, killed halfway
    run = SmsdRun(plan, 1)
    cleanups.append(lambda r=run: r.terminate(15))
    out(f"starting smsd run (pid {run.pid}); it starts its own embedded MongoDB")
    run.wait_ready(min(60.0, deadline - time.monotonic()))
    progress = Progress(f"mongodb://127.0.0.1:{mongo_port}/", seeded.users)
    cleanups.append(progress.close)
    half = max(1, int(seeded.total * plan.kill_at))
    watch(run, progress, seeded.total, out, until=lambda d: d >= half, deadline=deadline, every=0.5)

    victims = _descendants(run.pid)
    workers = [p.pid for p in victims if not _is_embedded(p)]
    embedded = [p.pid for p in victims if _is_embedded(p)]
    status = run.status(timeout=1.0) or {}
    worker_pids = {w["pid"] for w in status.get("workers") or []} or set(workers)
    run.kill9()
    out(f"kill -9 {run.pid} (the supervisor, mid-run): {len(worker_pids)} workers were busy")
    left = _wait_gone(workers + embedded, timeout=15.0)
    if left:
        raise DemoFailed(f"processes of the killed supervisor still run: {left}")
    out(f"its workers {sorted(worker_pids)} and the embedded MongoDB {embedded} are gone too "
        "(they die with their parent: PR_SET_PDEATHSIG)")

    # ---- run 2, to the end
    run = SmsdRun(plan, 2)
    cleanups.append(lambda r=run: r.terminate(15))
    out(f"starting smsd run again (pid {run.pid}): it replays the journals and carries on")
    run.wait_ready(min(60.0, max(1.0, deadline - time.monotonic())))
    watch(run, progress, seeded.total, out, until=lambda d: d >= seeded.total, deadline=deadline)
    wait_settled(run, seeded.users, deadline)
    out("every SMS is processed or quarantined; `smsctl status`:")
    out.block(smsctl_status(plan))
    progress.close()

    out("stopping smsd (SIGTERM: drain) ...")
    code = run.terminate(timeout=30)
    out(f"smsd run {run.pid} exited with code {code}")

    billed = llm_server.stats()["billed"] if llm_server else None
    server_calls = llm_server.stats()["calls"] if llm_server else None
    if llm_server:
        llm_server.stop()
        cleanups.remove(llm_server.stop)
    out("checking the invariants on the stopped system (journals + database) ...")
    outcome = check(plan, mongo_port, seeded, billed)
    totals = journal_totals(plan.state_dir)
    print_summary(plan, out, seeded, outcome, totals, server_calls, code)
    return EXIT_OK if outcome.ok and code == 0 else EXIT_INVARIANT


def print_summary(plan: Plan, out: Out, seeded: Seeded, outcome: Outcome, totals: dict[str, int],
                  server_calls: int | None, stop_code: int | None) -> None:
    """The closing table: what was done, what the crash cost, and the invariants."""
    r = outcome.report
    calls = totals.get("calls", 0)
    repeated = totals.get("repeated_calls", 0)
    in_flight = totals.get("sent_calls", 0)
    reasons = []
    if in_flight:
        sms = "" if totals.get("failed_calls") else f" ({totals.get('repeated_sms', 0)} SMS)"
        reasons.append(f"{in_flight} calls were in flight at the kill and were asked again{sms}")
    if totals.get("failed_calls"):
        reasons.append(f"{totals['failed_calls']} calls failed and their SMS were asked again")
    if repeated or reasons:
        repeat_text = f"{repeated} ({'; '.join(reasons) or 'see the journal'})"
    else:
        repeat_text = "0 (no call was in flight at the kill)"
    rows = [
        ("users", str(len(seeded.users))),
        ("SMS", f"{seeded.total} ({seeded.fixtures} bank, {seeded.synthetic} OTP/promotion, "
                f"{len(seeded.malformed)} malformed)"),
        ("SMS processed", str(r.sms_processed)),
        ("transactions stored", str(outcome.transactions)),
        ("SMS quarantined", f"{r.sms_quarantined} (malformed: {outcome.quarantined_malformed} "
                            f"of {len(seeded.malformed)})"),
        ("LLM calls", str(calls) + (f" (the local server counted {server_calls})"
                                    if server_calls is not None else "")),
        ("repeated calls", repeat_text),
        ("drain exit code", str(stop_code)),
    ]
    if plan.real_llm:
        rows.append(("checked against", "the LLM's journaled answers (real LLM: no fixture labels)"))
    else:
        rows.append(("checked against", f"the fixture labels ({r.tx_expected} transactions expected)"))
    invariants = (f"{r.sms_lost} lost, {r.tx_duplicated} duplicated, {r.tx_missing} missing, "
                  f"{r.tx_wrong} wrong, {r.asked_after_answer} asked again after an answer, "
                  f"{r.unflushed_left} unflushed")
    rows.append(("invariants", invariants + (": OK" if outcome.ok else ": FAILED")))
    out("summary")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"    {key:<{width}}  {value}", flush=True)
    for problem in r.violations + outcome.checks:
        print(f"    FAILED: {problem}", flush=True)
    out(f"demo {'passed' if outcome.ok and stop_code == 0 else 'FAILED'} in {out.elapsed():.0f} s "
        f"(files in {_show(plan.workdir)})")


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    """The ``smsd demo`` argument parser."""
    p = argparse.ArgumentParser(prog="smsd demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="var/demo",
                   help="work directory, wiped at the start (default ./var/demo)")
    p.add_argument("--users", type=int, help="users to seed (default 5; 2 with a real LLM)")
    p.add_argument("--sms-per-user", type=int, help="SMS per user (default 60; 10 with a real LLM)")
    p.add_argument("--malformed", type=int, default=2, help="malformed SMS documents (default 2)")
    p.add_argument("--latency-ms", type=float, default=150.0,
                   help="local LLM server latency per call (default 150)")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="share of SMS done when the supervisor is killed (default 0.5)")
    p.add_argument("--timeout", type=float, default=110.0, help="give up after this many seconds")
    return p


def _plan(args: argparse.Namespace) -> Plan:
    real = bool(os.environ.get("OPENAI_API_KEY"))
    plan = Plan(workdir=Path(args.workdir).absolute(),
                users=args.users or (2 if real else 5),
                sms_per_user=args.sms_per_user or (10 if real else 60),
                malformed=max(0, args.malformed), latency_ms=max(0.0, args.latency_ms),
                kill_at=min(max(args.kill_at, 0.05), 1.0), timeout=args.timeout, real_llm=real)
    if real:
        from ..config import LlmSettings
        plan.base_url = os.environ.get("SMSD_LLM_BASE_URL") or LlmSettings().base_url
        plan.model = os.environ.get("SMSD_LLM_MODEL") or LlmSettings().model
        plan.batch_size, plan.concurrency = 2, 1
    else:
        plan.model = "smsd-local"
    return plan


def main(argv: list[str] | None = None) -> int:
    """``smsd demo [--workdir DIR] ...``: returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.users is not None and args.users < 1 or args.sms_per_user is not None and args.sms_per_user < 2:
        print("smsd demo: --users must be >= 1 and --sms-per-user >= 2", file=sys.stderr)
        return EXIT_USAGE
    plan = _plan(args)
    out = Out()
    cleanups: list[Callable[[], None]] = []

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_demo(plan, out, cleanups)
    except KeyboardInterrupt:
        print("\nsmsd demo: interrupted; stopping everything it started", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except DemoFailed as exc:
        print(f"smsd demo: {exc}", file=sys.stderr, flush=True)
        return EXIT_INVARIANT
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not skip the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for stop in reversed(cleanups):
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    print(f"smsd demo: clean-up step failed: {type(exc).__name__}: {exc}",
                          file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
