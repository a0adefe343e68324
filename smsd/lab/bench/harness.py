"""The bench's shared parts: sizes, result records, the synthetic SMS and the servers.

Every benchmark module uses what is here: :class:`Params` (the sizes, ``--quick``),
:class:`Figure` / :class:`BenchResult` (what a benchmark reports), the synthetic
SMS corpus the LLM server knows, the LLM server subprocess, and :class:`Bench`
(the MongoDB-wire server, the temporary directory, seeding, config files, smsd
subprocesses and the polls that time them).  It is apart from the benchmarks so
that each of them reads as its own measurement, on top of one harness.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Callable

from ..subproc import admin_json, ready_line

log = logging.getLogger("smsd.bench")  # the convention; the bench reports on stdout/stderr

#: Distinct SMS texts the LLM server knows (the SMS cycle through them).
N_TEXTS = 4000
BENCH_MODEL = "smsd-bench"
READY_PREFIX = "smsd-llmserver listening on "
PR_SET_PDEATHSIG = 1


# --------------------------------------------------------------------------- parameters

@dataclass
class Params:
    """Sizes of every benchmark; ``--quick`` shrinks them to a smoke run."""

    runs: int = 3
    overhead_sms: int = 2000
    batch_size: int = 10                # LLM batch = flush batch of the minimal loop
    page_size: int = 200                # smsd's claim page = read page of the minimal loop
    llm_concurrency: int = 2
    discovery_interval: float = 5.0     # smsd's default: discovery scans MongoDB, keep it realistic
    ratelimit_rps: float = 5.0
    ratelimit_workers: int = 4
    ratelimit_seconds: float = 65.0     # > 60 s: the LLM server's rpm window is fully exercised
    ratelimit_latency_ms: float = 200.0
    journal_answers: int = 1000         # per mode
    journal_rounds: int = 10            # FULL and NORMAL alternate this many times
    recovery_sms: int = 10_000
    recovery_extra: int = 200
    scaling_workers: tuple[int, ...] = (1, 2, 4, 8)
    scaling_sms_each: int = 300
    scaling_latency_ms: float = 100.0
    memory_users: int = 4
    memory_sms_each: int = 500
    memory_latency_ms: float = 50.0
    bare_shapes: tuple[tuple[int, int], ...] = ((300, 4), (4, 1000))   # (users, SMS each)
    bare_pairs: int = 2
    commit_users: int = 4
    commit_sms_each: int = 300
    commit_latency_ms: float = 100.0    # LLM latency, so that calls are in flight when MongoDB slows
    commit_slow_ms: float = 200.0       # the proxy's delay of every MongoDB command
    commit_down_s: float = 8.0          # how long MongoDB is down (proxy closed)
    steady_users: int = 500
    steady_history: int = 20            # processed SMS per user before the run (the backfill done)
    steady_rate: float = 20.0           # new SMS per second, all users together
    steady_seconds: float = 120.0
    steady_latency_ms: float = 200.0
    steady_drain_s: float = 60.0        # after the inserts stop, how long to wait for the rest
    ops_shapes: tuple[tuple[int, int], ...] = ((300, 4), (4, 1000))
    discovery_users: int = 10_000
    discovery_processed_each: int = 5
    cost_sms: int = 1000                # SMS of the cost bench's backfill corpus and runs
    cost_trickle_users: int = 20        # users with 2 new SMS each in its trickle run
    cost_cache_users: int = 4           # users sharing 30% of their texts in its cache run
    cost_group_users: int = 100         # users with 2 new SMS each under `smsd run`, grouped or not
    run_timeout: float = 600.0

    @classmethod
    def quick(cls) -> "Params":
        """Small sizes: every bench in well under a minute."""
        return cls(runs=1, overhead_sms=200, ratelimit_seconds=6.0, journal_answers=100,
                   journal_rounds=2, recovery_sms=500, recovery_extra=20,
                   scaling_workers=(1, 2), scaling_sms_each=40, memory_users=2,
                   memory_sms_each=60, bare_shapes=((20, 4), (2, 100)), bare_pairs=1,
                   commit_users=2, commit_sms_each=80, commit_down_s=3.0, steady_users=30,
                   steady_history=3, steady_rate=6.0, steady_seconds=10.0, steady_drain_s=30.0,
                   ops_shapes=((10, 4), (2, 60)), discovery_users=500,
                   discovery_processed_each=2, cost_sms=200, cost_trickle_users=4,
                   cost_cache_users=2, cost_group_users=12, run_timeout=120.0)


# --------------------------------------------------------------------------- results

@dataclass
class Figure:
    """One measured figure, with its target when it has one."""

    bench: str
    name: str
    value: float | None
    unit: str
    target: str = ""
    met: bool | None = None        # None: no target (informative)
    runs: list[float] = field(default_factory=list)

    def shown(self) -> str:
        """The value formatted for a table."""
        return _fmt(self.value, self.unit)


@dataclass
class BenchResult:
    """What one benchmark produced: figures, per-run details and notes."""

    name: str
    figures: list[Figure] = field(default_factory=list)
    details: list[str] = field(default_factory=list)   # markdown lines
    notes: list[str] = field(default_factory=list)     # findings, markdown paragraphs
    elapsed_s: float = 0.0
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)   # raw data for the chart / JSON


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "ratio":
        return f"{value:.3f}"
    if unit == "ms":
        return f"{value:.3f} ms" if value < 10 else f"{value:.1f} ms"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "MiB":
        return f"{value:.1f} MiB"
    if unit == "count":
        return f"{value:.0f}"
    if unit == "USD":
        return f"${value:.4f}"
    if unit == "cmd/SMS":
        return f"{value:.3f} {unit}"
    return f"{value:.1f} {unit}"


def median(values: list[float]) -> float | None:
    """Median, or None for no values."""
    return statistics.median(values) if values else None


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


# --------------------------------------------------------------------------- synthetic SMS

_BANKS = (("hdfc", "HDFC Bank"), ("sbi", "SBI"), ("icici", "ICICI Bank"), ("axis", "Axis Bank"))


def synthetic_sms(i: int) -> tuple[str, str | None, dict]:
    """The ``i``-th synthetic SMS: ``(text, sender, expected answer)``.

    Half are UPI debits, three in ten NEFT credits with a balance, two in ten
    OTPs: the kinds and field counts of a real inbox, with unique texts.
    """
    bank, bank_name = _BANKS[i % len(_BANKS)]
    amount = f"{(i * 37) % 50000 + 100}.{i % 100:02d}"
    account = f"XX{1000 + (i * 7) % 9000}"
    day = 1 + i % 28
    kind = i % 10
    if kind < 5:
        ref = f"{600000000000 + i:012d}"
        shop = f"SHOP{i % 977}"
        text = (f"INR {amount} debited from A/c {account} on {day:02d}-09-26 "
                f"UPI/P2M/{ref}/{shop} - {bank_name}")
        txn = {"direction": "debit", "amount": amount, "currency": "INR", "channel": "upi",
               "account_mask": account, "card_mask": None, "counterparty": shop, "reference": ref,
               "balance": None, "occurred_at": f"2026-09-{day:02d}", "bank": bank}
        return text, f"VM-{bank.upper()}BK", {"kind": "transaction", "transactions": [txn]}
    if kind < 8:
        ref = f"N{2600000000 + i:010d}"
        balance = f"{(i * 91) % 900000 + 1000}.00"
        text = (f"Rs.{amount} credited to A/c {account} on {day:02d}-09-26 by NEFT ref {ref}. "
                f"Avl Bal Rs.{balance} - {bank_name}")
        txn = {"direction": "credit", "amount": amount, "currency": "INR", "channel": "neft",
               "account_mask": account, "card_mask": None, "counterparty": None, "reference": ref,
               "balance": balance, "occurred_at": f"2026-09-{day:02d}", "bank": bank}
        return text, f"AD-{bank.upper()}BK", {"kind": "transaction", "transactions": [txn]}
    text = f"{100000 + (i * 7919) % 900000} is your OTP for login ({i}). Do not share it with anyone. - {bank_name}"
    return text, f"VK-{bank.upper()}BK", {"kind": "otp", "transactions": []}


class Corpus:
    """The synthetic texts, their answers (for the LLM server and the baseline) and seeding."""

    def __init__(self, n_texts: int = N_TEXTS) -> None:
        from ...model import SmsResult
        self.items = [synthetic_sms(i) for i in range(n_texts)]
        self._templates: dict[str, SmsResult] = {}
        for text, _, expected in self.items:
            self._templates[text] = SmsResult.from_json({"id": "", **expected})

    def write_answers(self, path: Path) -> Path:
        """The LLM server's ``--answers`` JSONL (``{text, expected}`` lines)."""
        with open(path, "w", encoding="utf-8") as fh:
            for text, _, expected in self.items:
                fh.write(json.dumps({"text": text, "expected": expected}) + "\n")
        return path

    def result(self, key: str, text: str) -> Any:
        """The known :class:`~smsd.model.SmsResult` of an SMS (what the LLM would answer)."""
        from ...model import SmsResult
        t = self._templates[text]
        return SmsResult(key=key, kind=t.kind, transactions=t.transactions)

    def docs(self, user_id: str, n: int, start: int = 0) -> list[dict]:
        """``n`` raw SMS documents of ``user_id`` (ObjectIds, increasing)."""
        from bson import ObjectId
        base = datetime(2026, 9, 1, tzinfo=timezone.utc)
        out = []
        for j in range(start, start + n):
            text, sender, _ = self.items[j % len(self.items)]
            out.append({"_id": ObjectId(), "user_id": user_id, "body": text, "sender": sender,
                        "received_at": base + timedelta(seconds=j), "isprocessed": False})
        return out


# --------------------------------------------------------------------------- processes

def compile_smsd() -> None:
    """Write the bytecode of smsd's modules, as installing a wheel does.

    Why: from a source checkout (``pip install -e``, and with
    ``PYTHONDONTWRITEBYTECODE`` set, as on CI machines) every ``smsd run`` would
    compile its modules again at start, about half a CPU-second the bare loop
    (pymongo's bytecode is installed) does not pay: a cost of the checkout, not
    of smsd.  Python checks each file's timestamp, so stale bytecode is never used.
    """
    import compileall
    compileall.compile_dir(str(Path(__file__).resolve().parents[2]), quiet=2)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # pragma: no cover - not Linux
        pass


class LlmProcess:
    """``python -m smsd.lab.llmserver`` as a subprocess, driven through its admin API."""

    def __init__(self, answers: Path, log_path: Path) -> None:
        self.answers = answers
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.base = ""
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 30.0) -> "LlmProcess":
        """Start the server and wait for its ready line."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsd.lab.llmserver", "--host", "127.0.0.1", "--port", "0",
             "--answers", str(self.answers), "--model", BENCH_MODEL, "--log-level", "WARNING",
             "--prefix-cache"],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True,
            preexec_fn=_die_with_parent)
        url = ready_line(self.proc, READY_PREFIX, timeout)
        if url is None:
            self.stop()
            raise RuntimeError(f"LLM server did not start (see {self.log_path})")
        self.url = url
        self.base = self.url.rsplit("/v1", 1)[0]
        return self

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        return admin_json(self.base + path, method, body)

    def stats(self) -> dict:
        """``/_admin/stats``: calls, call_times (wall clock), asked, rejected_429..."""
        return self._admin("GET", "/_admin/stats")

    def set_faults(self, **faults: Any) -> dict:
        """Change latency, rpm_limit, ... live."""
        return self._admin("POST", "/_admin/faults", faults)

    def reset(self) -> None:
        """Clear counters and the rpm window."""
        self._admin("POST", "/_admin/reset", {})

    def stop(self) -> None:
        """SIGTERM, then SIGKILL; reap."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _stop_process(proc, signal.SIGTERM, 10.0)
            if proc.stdout:
                proc.stdout.close()
        if self._log is not None:
            self._log.close()
            self._log = None


def _stop_process(proc: subprocess.Popen, sig: int, timeout: float, group: bool = False) -> None:
    """Send ``sig``, wait ``timeout``, then SIGKILL (the process group when ``group``)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig) if group and sig != signal.SIGTERM else proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)   # workers and children left behind, if any
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)


# --------------------------------------------------------------------------- the bench context

class Bench:
    """The servers, the temporary directory and the helpers every benchmark uses.

    MongoDB and the LLM server start on first use, so ``--only journal`` needs neither.
    """

    def __init__(self, params: Params, tmp_root: str | None = None, verbose: bool = True) -> None:
        self.params = params
        self.verbose = verbose
        self.root = Path(tempfile.mkdtemp(prefix="smsd-bench-", dir=tmp_root))
        self.corpus = Corpus()
        self._mongo = None
        self._llm: LlmProcess | None = None
        self._client = None
        self._procs: list[subprocess.Popen] = []
        self._seq = 0

    # -- servers
    @property
    def mongo_uri(self) -> str:
        """URI of the bench's MongoDB-wire server (started on first use)."""
        if self._mongo is None:
            from ...embedded import EmbeddedMongo
            self._mongo = EmbeddedMongo(self.root / "mongo", log_path=self.root / "mongo.log")
            self._mongo.start()
            self.say(f"  MongoDB-wire server (secantusd-py) pid {self._mongo.pid} on {self._mongo.uri}")
        return self._mongo.uri

    @property
    def client(self) -> Any:
        """A pymongo client of the bench's own (seeding, polling)."""
        if self._client is None:
            import pymongo
            self._client = pymongo.MongoClient(self.mongo_uri, tz_aware=True)
        return self._client

    @property
    def llm(self) -> LlmProcess:
        """The LLM server (started on first use)."""
        if self._llm is None:
            answers = self.corpus.write_answers(self.root / "answers.jsonl")
            self._llm = LlmProcess(answers, self.root / "llmserver.log").start()
            self.say(f"  LLM server pid {self._llm.proc.pid} on {self._llm.url}")
        return self._llm

    def close(self) -> None:
        """Stop every process the bench started and remove the temporary directory."""
        for proc in self._procs:
            _stop_process(proc, signal.SIGKILL, 5.0, group=True)
        self._procs.clear()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._llm is not None:
            self._llm.stop()
            self._llm = None
        if self._mongo is not None:
            self._mongo.stop()
            self._mongo = None
        shutil.rmtree(self.root, ignore_errors=True)

    def say(self, text: str) -> None:
        """Progress on stderr."""
        if self.verbose:
            print(text, file=sys.stderr, flush=True)

    # -- per-trial resources
    def fresh(self, label: str) -> tuple[str, Path]:
        """A new database name and a new empty directory for one trial."""
        self._seq += 1
        name = f"bench_{label}_{self._seq}"
        path = self.root / name
        path.mkdir(mode=0o700)
        return name, path

    def seed(self, db_name: str, user_id: str, n: int, start: int = 0) -> list[dict]:
        """Insert ``n`` pending SMS of ``user_id``; returns the documents."""
        docs = self.corpus.docs(user_id, n, start)
        coll = self.client[db_name]["sms_fin_rawdata"]
        for i in range(0, len(docs), 1000):
            coll.insert_many(docs[i:i + 1000], ordered=False)
        return docs

    def drop(self, db_name: str) -> None:
        """Drop a trial's database (keeps the server's storage small)."""
        with contextlib.suppress(Exception):
            self.client.drop_database(db_name)

    def write_config(self, directory: Path, db_name: str, **sections: dict) -> Path:
        """A ``config.toml`` for the bench's servers, state and runtime under ``directory``."""
        p = self.params
        conf: dict[str, dict] = {
            "mongo": {"uri": self.mongo_uri, "db": db_name, "timeout_ms": 5000},
            "llm": {"base_url": self.llm.url, "model": BENCH_MODEL, "key_header": True, "batch_size": p.batch_size,
                    "concurrency": p.llm_concurrency, "timeout": 30.0, "max_retries": 4,
                    "backoff_base": 0.05, "backoff_max": 1.0},
            "journal": {"state_dir": str(directory / "state")},
            "pipeline": {"page_size": p.page_size},
            "supervisor": {"runtime_dir": str(directory / "run"), "discovery_interval": p.discovery_interval,
                           "restart_backoff": 0.2, "drain_timeout": 20.0},
        }
        for section, values in sections.items():
            conf.setdefault(section, {}).update(values)
        lines = []
        for section, values in conf.items():
            lines.append(f"[{section}]")
            lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        path = directory / "config.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def smsd(self, config: Path, *args: str, log_name: str = "smsd.log",
             env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start ``python -m smsd.cli ARGS`` in its own session (stopped by :meth:`stop_smsd`),
        with ``env`` added to a clean environment (no ``SMSD_*`` of the caller)."""
        extra = env or {}
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SMSD_") and k not in ("OPENAI_API_KEY", "NOTIFY_SOCKET",
                                                          "STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
        env["SMSD_CONFIG"] = str(config)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        logf = open(config.parent / log_name, "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "smsd.cli", *args], env=env,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    cwd=str(config.parent), start_new_session=True,
                                    preexec_fn=_die_with_parent)
        finally:
            logf.close()
        self._procs.append(proc)
        return proc

    def stop_smsd(self, proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
        """Drain (SIGTERM), wait, then kill the whole process group; returns the exit code."""
        _stop_process(proc, signal.SIGTERM, timeout, group=True)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def cpu_snapshot(self) -> dict[str, float]:
        """CPU seconds so far of the MongoDB-wire server, the LLM server, this process's reaped
        children (a stopped ``smsd run`` and its workers) and the host's idle time."""
        import resource

        import psutil

        def proc_cpu(pid: int | None) -> float:
            if pid is None:
                return 0.0
            try:
                t = psutil.Process(pid).cpu_times()
                return t.user + t.system
            except psutil.Error:
                return 0.0

        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        host = psutil.cpu_times()
        return {"mongo": proc_cpu(self._mongo.pid if self._mongo else None),
                "llm": proc_cpu(self._llm.proc.pid if self._llm and self._llm.proc else None),
                "children": ru.ru_utime + ru.ru_stime,
                "idle": host.idle + getattr(host, "iowait", 0.0)}

    def wait_processed(self, db_name: str, users: list[str], total: int, proc: subprocess.Popen,
                       timeout: float, poll: float = 0.25,
                       on_poll: Callable[[bool], None] | None = None) -> float:
        """Poll MongoDB until no SMS of ``users`` is pending; return the wall time
        (``time.time()``) of the last ``processed_at``.  Raises if smsd exits or times out,
        or if fewer than ``total`` SMS ended up processed.

        A poll is one index-served ``find_one`` on the pending filter per user still
        working, so watching costs the server next to nothing.  ``on_poll(started)`` is
        called after each poll; ``started`` turns true once any SMS is processed."""
        from ...store import Store
        raw = self.client[db_name]["sms_fin_rawdata"]
        left = list(users)
        deadline = time.monotonic() + timeout
        started = False
        while True:
            left = [u for u in left if raw.find_one(Store.pending_filter(u), {"_id": 1}) is not None]
            if not started:
                started = len(left) < len(users) or raw.find_one(
                    {"user_id": {"$in": users}, "isprocessed": True}, {"_id": 1}) is not None
            if on_poll is not None:
                on_poll(started)
            if not left:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"smsd exited with {proc.returncode}; {len(left)} users still pending")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out; {len(left)} of {len(users)} users still pending")
            time.sleep(poll)
        flt = {"user_id": {"$in": users}, "isprocessed": True}
        done = raw.count_documents(flt)
        if done < total:
            raise RuntimeError(f"only {done} of {total} SMS processed")
        last = raw.find_one(flt, {"processed_at": 1}, sort=[("processed_at", -1)])
        return last["processed_at"].timestamp()
