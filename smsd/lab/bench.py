"""``smsd bench``: how fast smsd is, measured against real servers on this host.

The bench starts its own MongoDB-wire server (:class:`smsd.embedded.EmbeddedMongo`
in a temporary directory) and the local OpenAI-compatible server
(``python -m smsd.lab.llmserver`` as a subprocess, so its CPU is not charged to
the process being measured), seeds synthetic bank SMS whose answers the LLM
server knows, and measures:

``overhead``
    smsd's SMS/s end to end (a :class:`~smsd.pipeline.Pipeline` for one user,
    built like ``smsd once`` does, zero-latency LLM) divided by the SMS/s of a
    minimal loop doing only the unavoidable MongoDB work on the same server:
    read a batch of pending SMS, upsert its transactions, mark the batch
    processed (same write concern, same batch size).  A/B/A/B, medians.
``ratelimit``
    ``smsd run`` with 4 workers and 4 users against a 200 ms LLM, limited to
    R requests/s host-wide: calls/s achieved over the steady window ÷ R, and
    the 429s of an LLM server whose own limit is slightly above R.
``journal``
    commit time of one 10-SMS answer (``Journal.record_answer``), median and
    p99, ``synchronous=FULL`` and ``NORMAL`` interleaved.
``recovery``
    a journal holding 10,000 answered-but-unflushed SMS (as if a worker was
    SIGKILLed after its commits) plus more pending SMS: ``smsd once`` is
    started and timed to all replayed rows flushed and to its first new LLM call.
``scaling``
    SMS/s of ``smsd run`` with 1, 2, 4 and 8 workers (one user each) against a
    100 ms LLM, start-up subtracted; a PNG line chart.
``memory``
    RSS of the supervisor and of its workers during ``smsd run`` (read from
    the control socket's ``status``, which the supervisor fills with psutil).

Every figure is a median of ``--runs`` runs (3 by default), taken in the same
process run so that ratios compare like with like on a shared, noisy host.
``docs/BENCHMARKS.md`` and ``docs/scaling.png`` are written by a full run
(``make bench``); ``--quick`` / ``--only`` runs print their figures and write
files only when ``--out`` / ``--chart`` are given.  Nothing here is a test of
speed: the test suite only checks that the bench runs.

Every process the bench starts (MongoDB-wire server, LLM server, smsd
supervisors with their workers) is stopped before it returns, also on errors
and on SIGINT/SIGTERM.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Callable, Iterator

log = logging.getLogger("smsd.bench")  # the convention; the bench reports on stdout/stderr

BENCHES = ("journal", "overhead", "recovery", "ratelimit", "scaling", "memory")
DEFAULT_OUT = "docs/BENCHMARKS.md"
DEFAULT_CHART = "docs/scaling.png"
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
    run_timeout: float = 600.0

    @classmethod
    def quick(cls) -> "Params":
        """Small sizes: every bench in well under a minute."""
        return cls(runs=1, overhead_sms=200, ratelimit_seconds=6.0, journal_answers=100,
                   journal_rounds=2, recovery_sms=500, recovery_extra=20,
                   scaling_workers=(1, 2), scaling_sms_each=40, memory_users=2,
                   memory_sms_each=60, run_timeout=120.0)


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
        from ..model import SmsResult
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
        from ..model import SmsResult
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
             "--answers", str(self.answers), "--model", BENCH_MODEL, "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, text=True,
            preexec_fn=_die_with_parent)
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not line or not line[0].startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"LLM server did not start (see {self.log_path})")
        self.url = line[0][len(READY_PREFIX):].strip()
        self.base = self.url.rsplit("/v1", 1)[0]
        return self

    def _admin(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

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
            from ..embedded import EmbeddedMongo
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
            "llm": {"base_url": self.llm.url, "model": BENCH_MODEL, "batch_size": p.batch_size,
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

    def smsd(self, config: Path, *args: str, log_name: str = "smsd.log") -> subprocess.Popen:
        """Start ``python -m smsd.cli ARGS`` in its own session (stopped by :meth:`stop_smsd`)."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SMSD_") and k not in ("OPENAI_API_KEY", "NOTIFY_SOCKET",
                                                          "STATE_DIRECTORY", "RUNTIME_DIRECTORY")}
        env["SMSD_CONFIG"] = str(config)
        env["PYTHONUNBUFFERED"] = "1"
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
        from ..store import Store
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


# --------------------------------------------------------------------------- 1. journal

def _journal_items(bench: Bench, n: int, offset: int) -> list[tuple[Any, Any]]:
    from bson import ObjectId
    from ..model import sms_key
    out = []
    for j in range(n):
        raw = ObjectId()
        text = bench.corpus.items[(offset + j) % N_TEXTS][0]
        out.append((raw, bench.corpus.result(sms_key(raw), text)))
    return out


def fsync_floor_ms(directory: Path, n: int = 200) -> list[float]:
    """Durations (ms) of ``write(4 KiB) + fdatasync`` appends in ``directory``: the disk's
    flush latency, the floor of any durable commit there."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    block = os.urandom(4096)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, block)
            os.fdatasync(fd)
            out.append((time.perf_counter() - t0) * 1000.0)
    finally:
        os.close(fd)
        path.unlink()
    return out


def bench_journal(bench: Bench) -> BenchResult:
    """Commit time of one 10-SMS answer, FULL and NORMAL interleaved in one run."""
    from ..journal import Journal
    from ..model import Usage
    p = bench.params
    res = BenchResult("journal")
    _, directory = bench.fresh("journal")
    fs = filesystem_of(directory)
    journals = {mode: Journal.open(directory / mode.lower(), f"bench-{mode.lower()}", synchronous=mode)
                for mode in ("FULL", "NORMAL")}
    begin: dict[str, list[float]] = {m: [] for m in journals}
    marks: dict[str, list[float]] = {m: [] for m in journals}
    per_round = max(1, p.journal_answers // p.journal_rounds)
    n = 0
    try:
        for r in range(p.journal_rounds):
            order = ("FULL", "NORMAL") if r % 2 == 0 else ("NORMAL", "FULL")
            for mode in order:
                j = journals[mode]
                for _ in range(per_round):
                    items = _journal_items(bench, p.batch_size, n)
                    n += 1
                    t0 = time.perf_counter()
                    call_id = j.begin_call([(res_.key, raw) for raw, res_ in items], owner="bench",
                                           epoch=0, model=BENCH_MODEL)
                    begin[mode].append(time.perf_counter() - t0)
                    j.record_answer(call_id, items, failed={}, request_id="req_bench",
                                    usage=Usage(400, 300), model=BENCH_MODEL)
                    t0 = time.perf_counter()
                    j.mark_flushed([call_id])
                    marks[mode].append(time.perf_counter() - t0)
        timings = {m: [t * 1000.0 for t in j.commit_timings()] for m, j in journals.items()}
    finally:
        for j in journals.values():
            j.close()
    floor = fsync_floor_ms(directory, max(50, p.journal_answers // 5))
    for mode in ("FULL", "NORMAL"):
        t = timings[mode]
        med, p99 = median(t), percentile(t, 99)
        if mode == "FULL":
            res.figures.append(Figure("journal", "record_answer commit, synchronous=FULL, median", med,
                                      "ms", "≤ 1 ms", med is not None and med <= 1.0))
        else:
            res.figures.append(Figure("journal", "record_answer commit, synchronous=NORMAL, median", med, "ms"))
        res.figures.append(Figure("journal", f"record_answer commit, synchronous={mode}, p99", p99, "ms"))
    res.figures.append(Figure("journal", "raw write(4 KiB) + fdatasync on the same filesystem, median",
                              median(floor), "ms"))
    res.details.append(f"{len(timings['FULL'])} answers of {p.batch_size} SMS per mode, "
                       f"{p.journal_rounds} alternating rounds; journal directory on **{fs}**.")
    res.details.append("")
    res.details.append("| synchronous | record_answer median | p99 | max | begin_call median | "
                       "mark_flushed median | commits per answer |")
    res.details.append("|---|---|---|---|---|---|---|")
    for mode in ("FULL", "NORMAL"):
        t = timings[mode]
        res.details.append(
            f"| {mode} | {_fmt(median(t), 'ms')} | {_fmt(percentile(t, 99), 'ms')} | "
            f"{_fmt(max(t), 'ms')} | {_fmt(median([x * 1000 for x in begin[mode]]), 'ms')} | "
            f"{_fmt(median([x * 1000 for x in marks[mode]]), 'ms')} | 3 |")
    res.details.append("")
    res.details.append(f"Disk flush floor: `write(4 KiB) + fdatasync` in the same directory, {len(floor)} "
                       f"times: median {_fmt(median(floor), 'ms')}, p99 {_fmt(percentile(floor, 99), 'ms')}. "
                       "In WAL mode a `FULL` commit appends its pages to the WAL and fsyncs it once, so "
                       "its median cannot go below this floor; `NORMAL` skips the fsync (durable against "
                       "a process crash, not against power loss).")
    fm = median(timings["FULL"])
    if fm is not None and fm > 1.0 and median(floor) is not None and median(floor) > 0.6 * fm:
        res.notes.append(
            f"**Why FULL misses 1 ms here:** the commit is bound by the disk's flush latency "
            f"({_fmt(median(floor), 'ms')} for a bare 4 KiB `fdatasync` on this filesystem, "
            f"{_fmt(fm, 'ms')} for the whole commit); SQLite's own work is what `NORMAL` shows "
            f"({_fmt(median(timings['NORMAL']), 'ms')}).  No code change in smsd can take a durable "
            "commit below the device's flush time; the 1 ms target needs a device with a faster "
            "(e.g. battery- or capacitor-backed) write cache.")
    return res


# --------------------------------------------------------------------------- 2. overhead

class TableExtractor:
    """Answers like the LLM client, from the corpus table, in process: no HTTP, no SDK.

    Used to split smsd's overhead into the pipeline's own work and the cost of an LLM
    round trip (openai SDK, HTTP, JSON) on this host."""

    model = BENCH_MODEL

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    def extract(self, sms: list[Any], *, stop: threading.Event | None = None) -> Any:
        """The known results of ``sms`` as an :class:`~smsd.llm.LlmAnswer`."""
        from ..llm import LlmAnswer
        from ..model import Usage
        return LlmAnswer(results={m.key: self.corpus.result(m.key, m.text) for m in sms}, failed={},
                         unknown_ids=[], request_id="req_table", model=self.model,
                         usage=Usage(400, 300), attempts=1)

    def close(self) -> None:
        """Nothing to close."""


def _smsd_trial(bench: Bench, n: int, in_process: bool = False) -> tuple[float, dict]:
    """One ``smsd once``-equivalent run in this process; returns (SMS/s, info).

    ``in_process`` swaps the LLM client for :class:`TableExtractor`."""
    from ..config import load_settings
    from ..journal import Journal
    from ..worker import make_pipeline, make_store
    db_name, directory = bench.fresh("smsd")
    user = "bench-user"
    bench.seed(db_name, user, n)
    bench.llm.reset()
    config = bench.write_config(directory, db_name)
    settings = load_settings(config, env={})
    store = make_store(settings)
    store.ensure_indexes()            # connects, as `smsd once` does before its pipeline
    journal = Journal.open(settings.state_dir, user, synchronous=settings.journal.synchronous)
    pipeline = make_pipeline(settings, user, journal, store, stop=threading.Event(),
                             abort=threading.Event())
    if in_process:
        pipeline.extractor.close()
        pipeline.extractor = TableExtractor(bench.corpus)
    try:
        t0 = time.perf_counter()
        summary = pipeline.run(resume=True)
        elapsed = time.perf_counter() - t0
    finally:
        journal.close()
        store.close()
        with contextlib.suppress(Exception):
            pipeline.extractor.close()
    if summary.newly_processed != n:
        raise RuntimeError(f"smsd processed {summary.newly_processed} of {n} SMS")
    bench.drop(db_name)
    return n / elapsed, {"elapsed_s": elapsed, "llm_calls": summary.llm_calls}


def _baseline_trial(bench: Bench, n: int) -> tuple[float, dict]:
    """The unavoidable MongoDB work alone: read a batch, upsert, mark; returns (SMS/s, info)."""
    from ..model import FlushItem, Provenance
    from ..store import Store
    db_name, _ = bench.fresh("baseline")
    user = "bench-user"
    bench.seed(db_name, user, n)
    store = Store(bench.mongo_uri, db_name)
    store.ensure_indexes()
    batch = bench.params.batch_size
    page_size = bench.params.page_size
    prov = Provenance(call_id="baseline", model="baseline", request_id=None,
                      answered_at=datetime.now(timezone.utc))
    done = batches = 0
    try:
        t0 = time.perf_counter()
        while True:
            # Read like smsd claims (a page of pending SMS), write like smsd flushes (a batch).
            page, _ = store.fetch_pending(user, limit=page_size)
            if not page:
                break
            for i in range(0, len(page), batch):
                chunk = page[i:i + batch]
                items = [FlushItem(raw_id=m.raw_id, user_id=user,
                                   result=bench.corpus.result(m.key, m.text), provenance=prov)
                         for m in chunk]
                store.upsert_transactions(items)
                done += store.mark_processed(user, [m.raw_id for m in chunk], "baseline")
                batches += 1
        elapsed = time.perf_counter() - t0
    finally:
        store.close()
    if done != n:
        raise RuntimeError(f"baseline processed {done} of {n} SMS")
    bench.drop(db_name)
    return n / elapsed, {"elapsed_s": elapsed, "batches": batches}


#: (label, owner, method, also done by the minimal loop?) timed on the pipeline's main thread.
_BREAKDOWN = (
    ("MongoDB: read pending page", "store", "fetch_pending", True),
    ("MongoDB: upsert transactions", "store", "upsert_transactions", True),
    ("MongoDB: stale-transaction find (replace_stale)", "store", "_delete_stale", False),
    ("MongoDB: mark processed", "store", "mark_processed", True),
    ("MongoDB: checkpoint per flush", "store", "checkpoint_progress", False),
    ("journal: begin_call commit", "journal", "begin_call", False),
    ("journal: record_answer commit", "journal", "record_answer", False),
    ("journal: mark_flushed commit", "journal", "mark_flushed", False),
    ("journal: unflushed reads", "journal", "unflushed", False),
    ("waiting for LLM answers", "pipeline", "wait", False),
)


@contextlib.contextmanager
def _time_main_thread(acc: dict[str, list[float]]) -> Iterator[None]:
    """Record the main thread's inclusive time (s) in each call of the methods of
    :data:`_BREAKDOWN` (``acc["owner.name"]`` = list of durations)."""
    from .. import journal as journal_mod, pipeline as pipeline_mod, store as store_mod
    owners = {"store": store_mod.Store, "journal": journal_mod.Journal, "pipeline": pipeline_mod}
    main_thread = threading.main_thread()
    saved = []
    for _, owner, name, _ in _BREAKDOWN:
        target = owners[owner]
        orig = getattr(target, name)

        def timed(*a: Any, _orig: Callable = orig, _key: str = f"{owner}.{name}", **k: Any) -> Any:
            if threading.current_thread() is not main_thread:
                return _orig(*a, **k)
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                acc.setdefault(_key, []).append(time.perf_counter() - t0)

        saved.append((target, name, orig))
        setattr(target, name, timed)
    try:
        yield
    finally:
        for target, name, orig in saved:
            setattr(target, name, orig)


def _breakdown(bench: Bench, n: int) -> dict[str, Any]:
    """One more smsd trial and one more minimal-loop trial, instrumented.

    Returns ``rows`` = [(label, share of the smsd run, minimal loop does it too)] and
    ``per_call`` = {label: (mean ms in smsd, mean ms in the minimal loop)} for the
    MongoDB calls both make."""
    acc: dict[str, list[float]] = {}
    with _time_main_thread(acc):
        _, info = _smsd_trial(bench, n)
    base: dict[str, list[float]] = {}
    with _time_main_thread(base):
        _baseline_trial(bench, n)
    elapsed = info["elapsed_s"]
    # upsert_transactions includes _delete_stale: report them apart.
    stale = sum(acc.get("store._delete_stale", []))
    total = {k: sum(v) for k, v in acc.items()}
    total["store.upsert_transactions"] = total.get("store.upsert_transactions", 0.0) - stale
    rows = [(label, total.get(f"{owner}.{name}", 0.0) / elapsed, minimal)
            for label, owner, name, minimal in _BREAKDOWN]
    rows.append(("everything else (Python in the loop, validation, logging)",
                 max(0.0, 1.0 - sum(r[1] for r in rows)), False))

    def mean_ms(d: dict[str, list[float]], key: str) -> float:
        v = d.get(key) or [0.0]
        return 1000.0 * sum(v) / len(v)

    per_call = {label: (mean_ms(acc, f"{owner}.{name}"), mean_ms(base, f"{owner}.{name}"))
                for label, owner, name, minimal in _BREAKDOWN if minimal}
    # the minimal loop never replaces stale documents: compare like with like
    key = "MongoDB: upsert transactions"
    n_up = len(acc.get("store.upsert_transactions", [])) or 1
    per_call[key] = (per_call[key][0] - 1000.0 * stale / n_up, per_call[key][1])
    return {"rows": rows, "per_call": per_call}


def _llm_round_trip(bench: Bench, calls: int = 50) -> tuple[float, float]:
    """(wall ms, client CPU ms) of one 10-SMS call through the openai SDK to the LLM server
    at zero latency, serially, on this thread."""
    from bson import ObjectId

    from ..llm import LlmClient
    from ..model import Sms, sms_key
    client = LlmClient(base_url=bench.llm.url, api_key=None, model=BENCH_MODEL, timeout=30,
                       max_retries=0)
    batch = []
    for j in range(bench.params.batch_size):
        raw = ObjectId()
        text, sender, _ = bench.corpus.items[j]
        batch.append(Sms(raw_id=raw, key=sms_key(raw), user_id="rtt", text=text, sender=sender))
    try:
        client.extract(batch)
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            client.extract(batch)
        return ((time.perf_counter() - t0) * 1000 / calls, (time.thread_time() - c0) * 1000 / calls)
    finally:
        client.close()


def bench_overhead(bench: Bench) -> BenchResult:
    """smsd SMS/s ÷ minimal-loop SMS/s, A/B/A/B on the same server, medians."""
    from ..logsetup import setup_logging
    p = bench.params
    res = BenchResult("overhead")
    bench.llm.set_faults(latency_ms=0, latency_jitter_ms=0, rpm_limit=0)
    # Log like `smsd once` does (INFO), to a file instead of the terminal.
    setup_logging("INFO", str(bench.root / "inprocess.log"))
    kinds = ("smsd", "baseline", "smsd-in-process")
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    ratios: list[float] = []
    ratios_ip: list[float] = []
    trial: dict[str, Callable[[], tuple[float, dict]]] = {
        "smsd": lambda: _smsd_trial(bench, p.overhead_sms),
        "smsd-in-process": lambda: _smsd_trial(bench, p.overhead_sms, in_process=True),
        "baseline": lambda: _baseline_trial(bench, p.overhead_sms),
    }
    try:
        _baseline_trial(bench, min(200, p.overhead_sms))     # warm-up: server caches, imports
        _smsd_trial(bench, min(200, p.overhead_sms))
        for r in range(p.runs):
            order = kinds[r % 3:] + kinds[:r % 3]             # rotate: no kind always goes first
            got: dict[str, float] = {}
            for which in order:
                got[which], info = trial[which]()
                rates[which].append(got[which])
                bench.say(f"    run {r + 1} {which}: {got[which]:.1f} SMS/s ({info})")
            ratios.append(got["smsd"] / got["baseline"])
            ratios_ip.append(got["smsd-in-process"] / got["baseline"])
        bd = _breakdown(bench, p.overhead_sms)
        rtt_ms, rtt_cpu_ms = _llm_round_trip(bench)
    finally:
        logging.getLogger().handlers[:] = []
    rows, per_call = bd["rows"], bd["per_call"]
    ratio, ratio_ip = median(ratios), median(ratios_ip)
    res.figures += [
        Figure("overhead", "smsd end to end (zero-latency LLM server)", median(rates["smsd"]), "SMS/s",
               runs=rates["smsd"]),
        Figure("overhead", "minimal MongoDB loop (read page, upsert, mark)", median(rates["baseline"]),
               "SMS/s", runs=rates["baseline"]),
        Figure("overhead", "pipeline overhead ratio (smsd ÷ minimal loop)", ratio, "ratio", "≥ 0.8",
               ratio is not None and ratio >= 0.8, runs=ratios),
        Figure("overhead", "same, answers in process instead of over HTTP (smsd's own overhead)",
               ratio_ip, "ratio", runs=ratios_ip),
    ]
    res.extra["per_call_ms"] = per_call
    res.extra["llm_round_trip_ms"] = {"wall": rtt_ms, "client_cpu": rtt_cpu_ms}
    res.extra["main_thread_shares"] = [{"what": label, "share": share, "minimal_loop_too": minimal}
                                       for label, share, minimal in rows]
    res.details.append(
        f"{p.overhead_sms} SMS of one user per run on a fresh database.  **smsd**: a `Pipeline` built "
        "with `worker.make_store` / `make_pipeline` and `Journal.open` (what `smsd once` runs, "
        f"without the interpreter start-up), LLM batch {p.batch_size}, concurrency "
        f"{p.llm_concurrency}, claim page {p.page_size}, journal `synchronous=FULL`, logging at INFO "
        "to a file, against the LLM server (a separate process) with zero latency.  **Minimal loop**: "
        f"the same MongoDB work and nothing else, with the same sizes: read a page of {p.page_size} "
        f"pending SMS (`Store.fetch_pending`, the pending index), then per batch of {p.batch_size}: "
        "upsert its transactions (`Store.upsert_transactions`, same documents, same `j: true` / "
        "majority write concern) and mark it processed (`Store.mark_processed`); the answers are "
        "known in advance.  **smsd, answers in process**: the same pipeline with the LLM client "
        "swapped for a table lookup (no openai SDK, no HTTP, no LLM server work): what is left is "
        f"the pipeline's own overhead.  {p.runs} rounds of the three, order rotating, after a "
        "warm-up; each ratio is the median of the per-round ratios.  One LLM call of "
        f"{p.batch_size} SMS to the zero-latency server takes {rtt_ms:.1f} ms (serial, of which "
        f"{rtt_cpu_ms:.1f} ms is the SDK's CPU on the calling thread).")
    res.details.append("")
    res.details.append("| round | smsd SMS/s | smsd, answers in process | minimal loop SMS/s | ratio | "
                       "ratio, in process |")
    res.details.append("|---|---|---|---|---|---|")
    for i in range(len(ratios)):
        res.details.append(f"| {i + 1} | {rates['smsd'][i]:.1f} | {rates['smsd-in-process'][i]:.1f} | "
                           f"{rates['baseline'][i]:.1f} | {ratios[i]:.3f} | {ratios_ip[i]:.3f} |")
    res.details += ["", "Where the pipeline's main thread spends a run (one more, instrumented smsd run of "
                    f"{p.overhead_sms} SMS; the LLM calls themselves run on the pool threads):", "",
                    "| main thread | share of the run | minimal loop does it too |", "|---|---|---|"]
    for label, share, minimal in rows:
        res.details.append(f"| {label} | {share * 100:.1f} % | {'yes' if minimal else 'no'} |")
    res.details += ["", "The same MongoDB calls, mean time per call (instrumented runs):", "",
                    "| call | in the smsd run | in the minimal loop |", "|---|---|---|"]
    for label, (a, b) in per_call.items():
        res.details.append(f"| {label.replace('MongoDB: ', '')} | {a:.1f} ms | {b:.1f} ms |")
    smsd_only = sum(share for label, share, minimal in rows if not minimal)
    if ratio is not None and ratio < 0.8:
        up = per_call.get("MongoDB: upsert transactions", (0.0, 0.0))
        mk = per_call.get("MongoDB: mark processed", (0.0, 0.0))
        res.notes.append(
            f"**Why the ratio is below 0.8.**  smsd's main thread does the minimal loop's MongoDB "
            f"work (per call, smsd vs the loop: upsert {up[0]:.1f} vs {up[1]:.1f} ms, mark "
            f"{mk[0]:.1f} vs {mk[1]:.1f} ms) plus work "
            f"the loop does not do, {smsd_only * 100:.0f} % of its time: per answer of "
            f"{p.batch_size} SMS, three fsync'd journal commits (`begin_call`, `record_answer`, "
            "`mark_flushed`) and two more MongoDB round trips (the `replace_stale` find on "
            "`financial_transactions`, the checkpoint update); it waits for an LLM answer "
            f"{_share(rows, 'waiting for LLM answers')} of the time.  This MongoDB-wire server spends "
            "milliseconds per document and per command, so every extra round trip shows.  With the "
            + (f"answers in process the ratio is {_fmt(ratio_ip, 'ratio')}; the rest is the LLM "
               f"client's and server's CPU ({rtt_cpu_ms:.1f} ms of SDK Python per call on the pool "
               f"threads, sharing the GIL with the main thread, and the LLM server process) on "
               f"{os.cpu_count()} shared CPUs — a cost a remote LLM API mostly does not put on "
               "this host."
               if ratio_ip is not None and ratio_ip > ratio + 0.03 else
               f"answers in process the ratio is {_fmt(ratio_ip, 'ratio')}: the LLM round trips "
               "(SDK, HTTP, LLM server) are not what costs here; the pipeline's own extra work is."))
    return res


def _share(rows: list[tuple[str, float, bool]], label: str) -> str:
    return next((f"{share * 100:.1f} %" for lab, share, _ in rows if lab == label), "n/a")


# --------------------------------------------------------------------------- 3. recovery

def _python_startup_s(code: str = "import smsd.cli, smsd.pipeline, smsd.worker, smsd.embedded") -> float:
    """Seconds for a fresh interpreter to run ``code`` (by default: import what ``smsd once``
    imports)."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0


def _import_share_s(module: str,
                    code: str = "import smsd.cli, smsd.pipeline, smsd.worker, smsd.embedded") -> float:
    """Seconds that importing ``module`` takes inside ``code`` (``python -X importtime``)."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", code], check=True,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    for line in done.stderr.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[2].strip() == module:
            return int(parts[1].strip()) / 1e6
    return 0.0


def _fill_journal(bench: Bench, state_dir: Path, user: str, docs: list[dict]) -> set[str]:
    """Journal answers for ``docs`` (10 per call), answered but never flushed; returns the call ids."""
    from ..journal import Journal
    from ..model import Usage, sms_key
    calls: set[str] = set()
    # NORMAL only to fill faster: the rows are the same; smsd reopens with FULL.
    journal = Journal.open(state_dir, user, synchronous="NORMAL")
    try:
        b = bench.params.batch_size
        for i in range(0, len(docs), b):
            chunk = docs[i:i + b]
            items = [(d["_id"], bench.corpus.result(sms_key(d["_id"]), d["body"])) for d in chunk]
            call_id = journal.begin_call([(r.key, raw) for raw, r in items], owner="killed-worker",
                                         epoch=0, model=BENCH_MODEL)
            journal.record_answer(call_id, items, failed={}, request_id=f"req_{i}",
                                  usage=Usage(400, 300), model=BENCH_MODEL)
            calls.add(call_id)
        if journal.unflushed_count() != len(docs):
            raise RuntimeError("journal fill went wrong")
    finally:
        journal.close()
    return calls


def _flush_times(state_dir: Path, user: str, call_ids: set[str]) -> list[float | None]:
    """``flushed_at`` (wall clock, None if not flushed) of each of ``call_ids``, read-only."""
    from ..journal import journal_path
    path = journal_path(state_dir, user)
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT call_id, flushed, flushed_at FROM calls").fetchall()
    finally:
        conn.close()
    return [at if flushed else None for cid, flushed, at in rows if cid in call_ids]


def _replay_rate(times: list[float], sms_per_call: int) -> float | None:
    """SMS/s of the replay flush: the calls marked after the first mark_flushed commit,
    over the time from that commit to the last one."""
    first, last = min(times), max(times)
    later = sum(1 for t in times if t > first)
    return later * sms_per_call / (last - first) if last > first else None


@contextlib.contextmanager
def _record_calls(targets: list[tuple[Any, str]], out: dict[str, list[tuple[float, float]]]) -> Iterator[None]:
    """Record ``(start, end)`` (``time.perf_counter``) of every call of ``owner.name`` for each
    ``(owner, name)`` in ``targets`` that exists; restore the originals afterwards."""
    saved = []
    for owner, name in targets:
        orig = getattr(owner, name, None)
        if orig is None:
            continue
        key = f"{getattr(owner, '__name__', owner)}.{name}"

        def rec(*a: Any, _orig: Callable = orig, _key: str = key, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                out.setdefault(_key, []).append((t0, time.perf_counter()))

        saved.append((owner, name, orig))
        setattr(owner, name, rec)
    try:
        yield
    finally:
        for owner, name, orig in saved:
            setattr(owner, name, orig)


def _recovery_timeline(bench: Bench) -> dict[str, Any]:
    """The recovery run once more, in process, with the time (s after ``Pipeline.run()``
    began) of its first claim, first LLM call and replay flushes."""
    from .. import pipeline as pipeline_mod
    from ..config import load_settings
    from ..journal import Journal
    from ..store import Store
    from ..worker import make_pipeline, make_store
    p = bench.params
    user = "recover-timeline"
    db_name, directory = bench.fresh("timeline")
    docs = bench.seed(db_name, user, p.recovery_sms + p.recovery_extra)
    config = bench.write_config(directory, db_name)
    settings = load_settings(config, env={})
    _fill_journal(bench, settings.state_dir, user, docs[:p.recovery_sms])
    store = make_store(settings)
    store.ensure_indexes()
    journal = Journal.open(settings.state_dir, user, synchronous=settings.journal.synchronous)
    pipe = make_pipeline(settings, user, journal, store, stop=threading.Event(), abort=threading.Event())
    calls: dict[str, list[tuple[float, float]]] = {}
    targets = [(pipeline_mod.Pipeline, "_start_run"), (Store, "fetch_pending"),
               (Journal, "begin_call"), (pipeline_mod.Pipeline, "flush")]
    try:
        with _record_calls(targets, calls):
            t0 = time.perf_counter()
            pipe.run(resume=True)
            elapsed = time.perf_counter() - t0
    finally:
        journal.close()
        store.close()
        with contextlib.suppress(Exception):
            pipe.extractor.close()
        bench.drop(db_name)

    def first(key: str, end: bool = True) -> float | None:
        spans = calls.get(key) or []
        return (spans[0][1] if end else spans[0][0]) - t0 if spans else None

    fetch = (calls.get("Store.fetch_pending") or [(t0, t0)])[0]
    flushes = calls.get("Pipeline.flush") or []
    return {"start_run_done": first("Pipeline._start_run"),
            "first_fetch_start": fetch[0] - t0, "first_fetch_s": fetch[1] - fetch[0],
            "first_call": first("Journal.begin_call"),
            "first_flush_done": first("Pipeline.flush"),
            "replay_done": max(e for _, e in flushes) - t0 if flushes else None,
            "run_s": elapsed}


def bench_recovery(bench: Bench) -> BenchResult:
    """Start ``smsd once`` on a journal of unflushed answers; time to flushed and to the first new call."""
    p = bench.params
    res = BenchResult("recovery")
    bench.llm.set_faults(latency_ms=0, latency_jitter_ms=0, rpm_limit=0)
    startup = median([_python_startup_s() for _ in range(3)]) or 0.0
    bare = median([_python_startup_s("pass") for _ in range(3)]) or 0.0
    openai_import = median([_import_share_s("openai") for _ in range(3)]) or 0.0
    flushed_s: list[float] = []
    first_s: list[float] = []
    total_s: list[float] = []
    rates: list[float] = []
    user = "recover-me"
    for r in range(p.runs):
        db_name, directory = bench.fresh("recovery")
        docs = bench.seed(db_name, user, p.recovery_sms + p.recovery_extra)
        config = bench.write_config(directory, db_name)
        state_dir = directory / "state"
        replay_docs = docs[:p.recovery_sms]
        calls = _fill_journal(bench, state_dir, user, replay_docs)
        replay_keys = {_key(d["_id"]) for d in replay_docs}
        bench.llm.reset()
        t0 = time.time()
        proc = bench.smsd(config, "once", "--user-id", user, "--quiet")
        try:
            code = proc.wait(p.run_timeout)
        except subprocess.TimeoutExpired:
            code = None
        t_exit = time.time()
        bench.stop_smsd(proc, 5.0)
        if code != 0:
            raise RuntimeError(f"smsd once exited with {code} (see {config.parent / 'smsd.log'})")
        stats = bench.llm.stats()
        times = _flush_times(state_dir, user, calls)
        if len(times) != len(calls) or None in times:
            raise RuntimeError(f"only {sum(t is not None for t in times)} of {len(calls)} replayed "
                               "calls were flushed")
        flushed = [t for t in times if t is not None]
        last_flush = max(flushed)
        rate = _replay_rate(flushed, p.batch_size)
        if rate is not None:
            rates.append(rate)
        reasked = replay_keys & set(stats["asked"])
        if reasked:
            raise RuntimeError(f"{len(reasked)} journaled SMS were asked again (invariant 5)")
        if not stats["call_times"]:
            raise RuntimeError("no new LLM call was made")
        processed = bench.client[db_name]["sms_fin_rawdata"].count_documents({"isprocessed": True})
        if processed != len(docs):
            raise RuntimeError(f"{processed} of {len(docs)} SMS processed after recovery")
        flushed_s.append(last_flush - t0)
        first_s.append(min(stats["call_times"]) - t0)
        total_s.append(t_exit - t0)
        bench.say(f"    run {r + 1}: replay flushed at {flushed_s[-1]:.2f} s "
                  f"({_fmt(rate, 'SMS/s')}), "
                  f"first new call at {first_s[-1]:.2f} s, exit at {total_s[-1]:.2f} s")
        bench.drop(db_name)
    timeline = _recovery_timeline(bench)
    res.extra["timeline"] = timeline
    fl, fc = median(flushed_s), median(first_s)
    res.figures += [
        Figure("recovery", f"start → {p.recovery_sms:,} journaled SMS flushed", fl, "s", "≤ 5 s",
               fl is not None and fl <= 5.0, runs=flushed_s),
        Figure("recovery", "start → first new LLM call", fc, "s", "≤ 1 s",
               fc is not None and fc <= 1.0, runs=first_s),
        Figure("recovery", "replay flush throughput", median(rates), "SMS/s", runs=rates),
        Figure("recovery", "interpreter start-up + smsd imports (part of both times above)", startup, "s"),
    ]
    res.details.append(f"Journal: {p.recovery_sms:,} SMS in {p.recovery_sms // p.batch_size:,} answered, "
                       f"unflushed calls (as left by a worker SIGKILLed after its commits), plus "
                       f"{p.recovery_extra} more pending SMS; `smsd once --user-id {user}` started as a "
                       "subprocess, times from `Popen` (wall clock), first call from the LLM "
                       "server's `call_times`, flush from the journal's `flushed_at`.")
    res.details.append(f"A fresh interpreter importing smsd takes {startup:.2f} s of that (median of 3; "
                       f"a bare interpreter {bare:.2f} s, `import openai` alone {openai_import:.2f} s).")
    res.details.append("")
    res.details.append("| run | all replayed rows flushed | first new LLM call | process exit | "
                       "replay flush SMS/s |")
    res.details.append("|---|---|---|---|---|")
    for i, (a, b, c) in enumerate(zip(flushed_s, first_s, total_s), 1):
        d = _fmt(rates[i - 1], "SMS/s") if len(rates) == len(flushed_s) else "n/a (one flush)"
        res.details.append(f"| {i} | {a:.2f} s | {b:.2f} s | {c:.2f} s | {d} |")
    tl = timeline

    def at(key: str) -> str:
        v = tl.get(key)
        return "n/a" if v is None else f"{v:.2f} s"

    res.details += [
        "", "The same recovery once more in process (no interpreter start-up), times after "
        "`Pipeline.run()` began:", "",
        "| `_start_run` done | first claim's `fetch_pending` | first LLM call begun | first flush done "
        "| replay done | run done |", "|---|---|---|---|---|---|",
        f"| {at('start_run_done')} | {tl['first_fetch_start']:.2f} s → "
        f"{tl['first_fetch_start'] + tl['first_fetch_s']:.2f} s ({tl['first_fetch_s']:.2f} s) | "
        f"{at('first_call')} | {at('first_flush_done')} | {at('replay_done')} | {tl['run_s']:.2f} s |"]
    waits = fc is not None and fl is not None and fc >= fl - 0.05
    if waits:
        res.notes.append(
            "**Finding: the first new LLM call waits for the whole replay.**  The pipeline flushes "
            "every unflushed journal row before it claims and asks anything new, so the first paid "
            "call of the run starts only after the last replayed row is flushed.  Fix (in "
            "`pipeline.py`): replay in chunks interleaved with claims and calls; let the "
            "`max_backlog` gate of `_submit` count only what is unflushed *because MongoDB fails* "
            "(else 10,000 replayed rows still hold the first call); and exclude the unflushed keys "
            "from the claim with a key-only journal query instead of decoding every unflushed "
            "answer.")
    elif fc is not None and fl is not None:
        res.notes.append(
            f"The replay runs between new calls: the first new LLM call starts at {fc:.2f} s, long "
            f"before the replay is done ({fl:.2f} s).")
    if fc is not None and fc > 1.0:
        parts = [f"The first new call comes {fc:.2f} s after the process starts, and a fresh "
                 f"interpreter alone needs {startup:.2f} s to import smsd (`import openai` "
                 f"{openai_import:.2f} s; the first paid call needs the SDK): 1 s from process start "
                 "is out of reach on this host."]
        first_call = tl.get("first_call")
        if not waits and first_call is not None and not (
                tl["first_fetch_s"] > 0.25 and tl["first_fetch_s"] > 0.3 * first_call):
            parts.append(f"In process the first call begins {first_call:.2f} s after `Pipeline.run()`.")
        elif not waits and first_call is not None:
            parts.append(
                f"In process the first call begins {first_call:.2f} s after `Pipeline.run()`; its "
                f"first claim's `fetch_pending` alone takes {tl['first_fetch_s']:.2f} s: the claim "
                f"excludes the {p.recovery_sms:,} answered-but-unflushed keys, so MongoDB is asked for "
                f"`page_size` + {p.recovery_sms:,} pending documents and the client reads them all.  "
                "The replayed SMS are the oldest pending ones (claims go by `_id`), so claiming "
                "after the newest replayed `_id` while the replay runs (and normally once it is "
                "done, which also picks up the calls cut by the crash), or reading only `_id`s for "
                "the exclusion, would take that off the first call.")
        res.notes.append("  ".join(parts))
    if fl is not None and fl > 5.0:
        res.notes.append(
            "**Why the flush misses 5 s:** the replay writes the same MongoDB documents as the "
            "minimal loop of the overhead benchmark (upsert, mark, plus the stale find and the "
            "checkpoint per flush), and this MongoDB-wire server spends milliseconds of CPU per "
            "document on a 2-CPU shared host (see the scaling section's CPU figures): at the "
            f"measured {_fmt(median(rates), 'SMS/s')}, {p.recovery_sms:,} SMS take tens of seconds "
            "whatever smsd does.  5 s needs about 2,000 SMS/s of flush throughput, which a `mongod` "
            "on real hardware gives.")
    return res


def _key(raw: Any) -> str:
    from ..model import sms_key
    return sms_key(raw)


# --------------------------------------------------------------------------- 4. rate limit

def bench_ratelimit(bench: Bench) -> BenchResult:
    """``smsd run``, 4 workers, 200 ms LLM, limit R/s: calls/s ÷ R and the 429s."""
    p = bench.params
    res = BenchResult("ratelimit")
    rps = p.ratelimit_rps
    rpm = rps * 60.0
    server_rpm = int(math.ceil(rpm * 1.05))
    n_calls = int(math.ceil(rps * p.ratelimit_seconds))
    per_user = int(math.ceil(n_calls * p.batch_size / p.ratelimit_workers))
    users = [f"rl-{i}" for i in range(p.ratelimit_workers)]
    ratios: list[float] = []
    rejected: list[float] = []
    rows = []
    for r in range(p.runs):
        db_name, directory = bench.fresh("ratelimit")
        for u in users:
            bench.seed(db_name, u, per_user)
        config = bench.write_config(directory, db_name,
                                    llm={"requests_per_minute": rpm},
                                    supervisor={"max_workers": p.ratelimit_workers})
        bench.llm.reset()
        bench.llm.set_faults(latency_ms=p.ratelimit_latency_ms, latency_jitter_ms=0, rpm_limit=server_rpm)
        proc = bench.smsd(config, "run")
        try:
            bench.wait_processed(db_name, users, per_user * len(users), proc, p.run_timeout, poll=0.5)
        finally:
            bench.stop_smsd(proc)
        stats = bench.llm.stats()
        times = sorted(stats["call_times"])
        span = times[-1] - times[0] if len(times) > 1 else 0.0
        lo, hi = times[0] + 0.1 * span, times[-1] - 0.1 * span
        window = [t for t in times if lo <= t <= hi]
        rate = (len(window) - 1) / (window[-1] - window[0]) if len(window) > 2 else 0.0
        overall = (len(times) - 1) / span if span > 0 else 0.0
        ratios.append(rate / rps)
        rejected.append(float(stats["rejected_429"]))
        res.extra.setdefault("call_times", []).append(times)
        gaps = [b - a for a, b in zip(times, times[1:])]
        lost = sum(g - 1.0 / rps for g in gaps if g > 1.5 / rps)
        rows.append((len(times), span, overall, rate, stats["rejected_429"], stats["faults"].get("429", 0),
                     max(gaps) if gaps else 0.0, lost))
        bench.say(f"    run {r + 1}: {len(times)} calls over {span:.1f} s, steady {rate:.3f}/s "
                  f"(÷ R = {rate / rps:.3f}), overall {overall:.3f}/s, 429s: {stats['rejected_429']}")
        bench.drop(db_name)
    bench.llm.set_faults(latency_ms=0, rpm_limit=0)
    q, rej = median(ratios), max(rejected) if rejected else None
    res.figures += [
        Figure("ratelimit", f"calls/s ÷ R (R = {rps:g}/s, {p.ratelimit_workers} workers, "
                            f"{p.ratelimit_latency_ms:.0f} ms LLM)", q, "ratio", "≥ 0.95",
               q is not None and q >= 0.95, runs=ratios),
        Figure("ratelimit", f"429s from the LLM server (its limit {server_rpm}/min)", rej, "count",
               "0", rej == 0, runs=rejected),
    ]
    res.details.append(f"`smsd run`, max_workers {p.ratelimit_workers}, {len(users)} users × {per_user} SMS, "
                       f"`requests_per_minute = {rpm:g}` (R = {rps:g}/s), LLM latency "
                       f"{p.ratelimit_latency_ms:.0f} ms, LLM server `rpm_limit = {server_rpm}` (sliding 60 s "
                       f"window); about {p.ratelimit_seconds:.0f} s of calls per run, so the server's "
                       "window is fully exercised.  Steady window: the calls between 10 % and 90 % of "
                       "the span from the first to the last call; rate = (calls − 1) ÷ (last − first) "
                       "inside it.")
    res.details.append("")
    res.details.append("| run | calls | span | overall calls/s | steady calls/s | longest gap | time lost in "
                       "gaps > 1.5 slots | 429 (rpm limit) | 429 (other) |")
    res.details.append("|---|---|---|---|---|---|---|---|---|")
    for i, (n, span, overall, rate, rej429, other, gap, lost) in enumerate(rows, 1):
        res.details.append(f"| {i} | {n} | {span:.1f} s | {overall:.3f} | {rate:.3f} | {gap:.2f} s | "
                           f"{lost:.2f} s | {rej429} | {other} |")
    if q is not None and q < 0.95:
        res.notes.append(
            "**Below 0.95:** the limiter (GCRA, burst 1) does not bank unused slots, so every moment "
            "no worker is waiting for a slot is lost for good; the gap columns show how much.  "
            "Gaps come from workers that are busy journaling and flushing instead of asking (a "
            "slow MongoDB) and from worker turns ending (`worker_max_sms`).")
    return res


# --------------------------------------------------------------------------- 5. scaling

def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants, live and reaped."""
    import psutil
    total = 0.0
    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def _scaling_trial(bench: Bench, workers: int) -> dict:
    p = bench.params
    db_name, directory = bench.fresh(f"scale{workers}")
    users = [f"sc{workers}-{i}" for i in range(workers)]
    for u in users:
        bench.seed(db_name, u, p.scaling_sms_each)
    config = bench.write_config(directory, db_name, supervisor={"max_workers": workers})
    bench.llm.reset()
    bench.llm.set_faults(latency_ms=p.scaling_latency_ms, latency_jitter_ms=0, rpm_limit=0)
    total = p.scaling_sms_each * workers
    cpu0 = bench.cpu_snapshot()
    t0 = time.time()
    proc = bench.smsd(config, "run")
    window: dict[str, float] = {}

    def on_poll(started: bool) -> None:
        # smsd's own CPU while it works (start-up excluded): the supervisor's process tree
        if started and "cpu" not in window:
            done = bench.client[db_name]["sms_fin_rawdata"].count_documents(
                {"user_id": {"$in": users}, "isprocessed": True})
            window.update(cpu=tree_cpu(proc.pid), done=done, t=time.time(),
                          mongo=bench.cpu_snapshot()["mongo"])

    try:
        t_done = bench.wait_processed(db_name, users, total, proc, p.run_timeout, poll=0.2,
                                      on_poll=on_poll)
        cpu1 = bench.cpu_snapshot()
        smsd_work_cpu = tree_cpu(proc.pid) - window.get("cpu", 0.0)
    finally:
        bench.stop_smsd(proc)
    cpu2 = bench.cpu_snapshot()
    stats = bench.llm.stats()
    t_first = min(stats["call_times"])
    bench.drop(db_name)
    wall = time.time() - t0
    return {"workers": workers, "sms": total, "startup_s": t_first - t0,
            "work_s": t_done - t_first, "sms_per_s": total / (t_done - t_first),
            "calls": stats["calls"],
            # CPU seconds per 1000 SMS of each process (smsd = supervisor + workers, reaped)
            "cpu_mongo_per_k": (cpu2["mongo"] - cpu0["mongo"]) * 1000 / total,
            "cpu_smsd_per_k": (cpu2["children"] - cpu0["children"]) * 1000 / total,
            "cpu_smsd_work_per_k": smsd_work_cpu * 1000 / max(1.0, total - window.get("done", 0)),
            "cpu_llm_per_k": (cpu2["llm"] - cpu0["llm"]) * 1000 / total,
            # share of one CPU the MongoDB-wire server used while smsd ran
            "mongo_busy": (cpu1["mongo"] - window.get("mongo", cpu0["mongo"]))
            / max(1e-9, t_done - window.get("t", t0)),
            "host_busy": 1.0 - (cpu1["idle"] - cpu0["idle"]) / max(1e-9, (t_done - t0) * (os.cpu_count() or 1)),
            "wall_s": wall}


def bench_scaling(bench: Bench) -> BenchResult:
    """SMS/s of ``smsd run`` with 1, 2, 4, 8 workers (start-up subtracted), plus a chart."""
    p = bench.params
    res = BenchResult("scaling")
    trials: dict[int, list[dict]] = {w: [] for w in p.scaling_workers}
    for r in range(p.runs):
        order = p.scaling_workers if r % 2 == 0 else tuple(reversed(p.scaling_workers))
        for w in order:
            t = _scaling_trial(bench, w)
            trials[w].append(t)
            bench.say(f"    run {r + 1}, {w} workers: {t['sms_per_s']:.1f} SMS/s "
                      f"(start-up {t['startup_s']:.2f} s, work {t['work_s']:.2f} s)")
    bench.llm.set_faults(latency_ms=0)
    base = median([t["sms_per_s"] for t in trials[p.scaling_workers[0]]]) or 0.0
    res.details.append(f"`smsd run` with max_workers = users = N, {p.scaling_sms_each} SMS per user, "
                       f"LLM latency {p.scaling_latency_ms:.0f} ms, batch {p.batch_size}, concurrency "
                       f"{p.llm_concurrency} per worker.  SMS/s = SMS ÷ (last `processed_at` − first LLM "
                       f"call): the supervisor's start-up (interpreter, first discovery, fork) is "
                       f"subtracted and shown apart.  Host: {os.cpu_count()} CPUs.")
    res.details.append("")
    res.details.append("| workers | SMS/s (median) | runs | vs 1 worker | start-up | MongoDB server busy "
                       "| host CPUs busy | CPU s / 1000 SMS: MongoDB server · smsd working · "
                       "smsd whole run · LLM server |")
    res.details.append("|---|---|---|---|---|---|---|---|")

    def med(w: int, key: str) -> float:
        return median([t[key] for t in trials[w]]) or 0.0

    for w in p.scaling_workers:
        rates = [t["sms_per_s"] for t in trials[w]]
        m = median(rates)
        res.figures.append(Figure("scaling", f"SMS/s with {w} worker{'s' if w > 1 else ''}", m, "SMS/s",
                                  runs=rates))
        res.details.append(f"| {w} | {m:.1f} | {', '.join(f'{x:.1f}' for x in rates)} | "
                           f"×{(m / base) if base else 0:.2f} | {med(w, 'startup_s'):.2f} s | "
                           f"{med(w, 'mongo_busy') * 100:.0f} % of a CPU | {med(w, 'host_busy') * 100:.0f} % | "
                           f"{med(w, 'cpu_mongo_per_k'):.1f} · {med(w, 'cpu_smsd_work_per_k'):.1f} · "
                           f"{med(w, 'cpu_smsd_per_k'):.1f} · {med(w, 'cpu_llm_per_k'):.1f} |")
    res.details.append("")
    res.details.append("MongoDB server busy: its CPU time ÷ wall time while smsd worked (one process; "
                       "WiredTiger and socket I/O run outside Python's GIL, so it can exceed 100 %).  "
                       "Host CPUs busy: all "
                       "processes of the host, other tenants included.  CPU per 1000 SMS: the "
                       "MongoDB-wire and LLM servers over the whole trial; smsd (supervisor, discovery "
                       "children, workers) from its first processed SMS to the last (*working*) and "
                       "over its whole run including start-up and drain.")
    last = p.scaling_workers[-1]
    if base and len(p.scaling_workers) > 1:
        best_w = max(p.scaling_workers, key=lambda w: median([t["sms_per_s"] for t in trials[w]]) or 0)
        best = median([t["sms_per_s"] for t in trials[best_w]]) or 0.0
        mongo_cpu = med(best_w, "cpu_mongo_per_k") / 1000.0
        smsd_cpu = med(best_w, "cpu_smsd_work_per_k") / 1000.0
        llm_cpu = med(best_w, "cpu_llm_per_k") / 1000.0
        first = p.scaling_workers[0]
        busy = med(best_w, "mongo_busy")
        text = (f"Throughput peaks at {best:.0f} SMS/s with {best_w} workers (×{best / base:.1f} of one "
                f"worker) and {'flattens or falls' if best_w != last else 'is still rising'} after it.  "
                f"While working, every SMS costs about {smsd_cpu * 1000:.1f} ms of CPU in smsd, "
                f"{mongo_cpu * 1000:.1f} ms in the MongoDB-wire server and {llm_cpu * 1000:.1f} ms in "
                f"the LLM server.  ")
        if busy >= 0.85:
            text += (f"The MongoDB-wire server is the bottleneck: it is {busy * 100:.0f} % busy on one "
                     f"CPU at {best_w} workers (its Python request handling is bound to one CPU), and "
                     f"at {mongo_cpu * 1000:.1f} ms per SMS one CPU serves at most "
                     f"{1 / mongo_cpu:.0f} SMS/s (measured peak: {best:.0f}).  ")
        if med(last, "cpu_mongo_per_k") > 1.3 * med(first, "cpu_mongo_per_k") and best_w != last:
            text += (f"The MongoDB-wire server's CPU per SMS grows with concurrent clients "
                     f"({med(first, 'cpu_mongo_per_k'):.1f} ms with {first} worker, "
                     f"{med(last, 'cpu_mongo_per_k'):.1f} ms with {last}), so more workers lower the "
                     "total.  smsd's own CPU per SMS stays flat.  ")
        text += (f"One worker is bound by its LLM round trips instead (batch {p.batch_size} × "
                 f"concurrency {p.llm_concurrency} ÷ {p.scaling_latency_ms:.0f} ms = at most "
                 f"{p.batch_size * p.llm_concurrency * 1000 / p.scaling_latency_ms:.0f} SMS/s before any "
                 "other cost).  On this host the answer to \"how many workers\" is: as many as keep "
                 f"the MongoDB server busy, here {best_w}; against a real `mongod` the LLM latency and "
                 "the rate limit decide.")
        res.notes.append(text)
    res.extra["scaling"] = {w: [t["sms_per_s"] for t in trials[w]] for w in p.scaling_workers}
    res.extra["trials"] = trials
    return res


def write_chart(path: Path, scaling: dict[int, list[float]], params: Params) -> Path:
    """A PNG line chart of SMS/s against workers (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workers = sorted(scaling)
    meds = [statistics.median(scaling[w]) for w in workers]
    lows = [m - min(scaling[w]) for w, m in zip(workers, meds)]
    highs = [max(scaling[w]) - m for w, m in zip(workers, meds)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.errorbar(workers, meds, yerr=[lows, highs], marker="o", capsize=4, label="smsd run (median, min–max)")
    ax.plot(workers, [meds[0] * w / workers[0] for w in workers], linestyle="--", color="grey",
            label="linear from 1 worker")
    cpus = os.cpu_count() or 0
    if cpus and workers[0] <= cpus <= workers[-1]:
        ax.axvline(cpus, color="tab:red", linestyle=":", label=f"{cpus} CPUs on this host")
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_xlabel("workers (one user each)")
    ax.set_ylabel("SMS/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"smsd scaling: {params.scaling_sms_each} SMS per user, "
                 f"{params.scaling_latency_ms:.0f} ms LLM")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- 6. memory

def bench_memory(bench: Bench) -> BenchResult:
    """RSS of the supervisor and of its workers while ``smsd run`` works (control socket status)."""
    import psutil

    from .. import control
    p = bench.params
    res = BenchResult("memory")
    db_name, directory = bench.fresh("memory")
    users = [f"mem-{i}" for i in range(p.memory_users)]
    for u in users:
        bench.seed(db_name, u, p.memory_sms_each)
    config = bench.write_config(directory, db_name, supervisor={"max_workers": p.memory_users})
    bench.llm.reset()
    bench.llm.set_faults(latency_ms=p.memory_latency_ms, latency_jitter_ms=0, rpm_limit=0)
    socket_path = directory / "run" / "control.sock"
    sup: list[int] = []
    workers: list[int] = []
    sup_uss: list[int] = []
    workers_uss: list[int] = []
    last_poll = [0.0]

    def uss(pid: int) -> int | None:
        try:
            return int(psutil.Process(pid).memory_full_info().uss)
        except (psutil.Error, AttributeError):
            return None

    def sample(_started: bool = False) -> None:
        if time.monotonic() - last_poll[0] < 0.25:
            return
        last_poll[0] = time.monotonic()
        try:
            status = control.request(socket_path, "status", timeout=2.0)
        except control.ControlClientError:
            return
        if status.get("rss_bytes"):
            sup.append(int(status["rss_bytes"]))
            u = uss(int(status["pid"]))
            if u:
                sup_uss.append(u)
        for w in status.get("workers", []):
            if w.get("rss_bytes"):
                workers.append(int(w["rss_bytes"]))
                u = uss(int(w["pid"]))
                if u:
                    workers_uss.append(u)

    proc = bench.smsd(config, "run")
    try:
        bench.wait_processed(db_name, users, p.memory_users * p.memory_sms_each, proc, p.run_timeout,
                             poll=0.25, on_poll=sample)
        sample()
    finally:
        bench.stop_smsd(proc)
    bench.llm.set_faults(latency_ms=0)
    bench.drop(db_name)
    mib = 1024.0 * 1024.0
    sup_peak = max(sup) / mib if sup else None
    w_peak = max(workers) / mib if workers else None
    res.figures += [
        Figure("memory", "supervisor RSS (peak)", sup_peak, "MiB"),
        Figure("memory", "worker RSS (peak over workers)", w_peak, "MiB",
               "< worker_rss_limit_mb (512)", w_peak is not None and w_peak < 512),
        Figure("memory", "worker RSS (median of samples)", median([w / mib for w in workers]), "MiB"),
        Figure("memory", "supervisor USS (peak)", max(sup_uss) / mib if sup_uss else None, "MiB"),
        Figure("memory", "worker USS (peak over workers)",
               max(workers_uss) / mib if workers_uss else None, "MiB"),
    ]
    res.details.append(f"`smsd run` with {p.memory_users} workers, {p.memory_users} users × "
                       f"{p.memory_sms_each} SMS (`worker_max_sms` = 500 per turn), "
                       f"{p.memory_latency_ms:.0f} ms LLM; `status` on the control socket every 0.25 s "
                       f"({len(sup)} samples of the supervisor, {len(workers)} of workers).  RSS is "
                       "what `smsctl status` reports (`rss_bytes`, psutil) and what the supervisor holds "
                       "against `worker_rss_limit_mb`; it counts the pages a forked worker still shares "
                       "with the supervisor.  USS (psutil `memory_full_info`) is the memory only that "
                       "process holds: what each extra worker really costs.")
    return res


# --------------------------------------------------------------------------- the machine

def filesystem_of(path: Path) -> str:
    """``"ext4 (/dev/vda on /)"``: the filesystem holding ``path``."""
    try:
        import psutil
        path = Path(path).resolve()
        best = None
        for part in psutil.disk_partitions(all=True):
            mp = Path(part.mountpoint)
            if path == mp or mp in path.parents:
                if best is None or len(str(mp)) > len(str(best.mountpoint)):
                    best = part
        if best is not None:
            return f"{best.fstype} ({best.device} on {best.mountpoint})"
    except Exception:  # pragma: no cover - psutil missing or odd mounts
        pass
    return "unknown"


def machine_info(state_root: Path) -> dict[str, str]:
    """Cores, RAM, CPU model, kernel, Python, filesystem of the state dir, server versions."""
    import psutil
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    from importlib import metadata
    for dist in ("SecantusDB", "pymongo", "openai"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "CPU": f"{model}, {psutil.cpu_count(logical=True)} logical CPUs "
               f"({psutil.cpu_count(logical=False) or '?'} physical)",
        "RAM": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "OS": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "SQLite": sqlite3.sqlite_version,
        "State dir filesystem": filesystem_of(state_root),
        "MongoDB-wire server": f"SecantusDB {versions['SecantusDB']} (`secantusd-py`, loopback)",
        "Clients": f"pymongo {versions['pymongo']}, openai {versions['openai']}",
        "Load average at start": load,
    }


# --------------------------------------------------------------------------- report

STATIC_NOTES: dict[str, list[str]] = {
    "overhead": [
        "**Fixes (for `pipeline.py` / `journal.py`; not applied here, each changes behaviour "
        "someone may rely on).**  The instrumented run above prices each one:",
        "1. *Checkpoint once a second, not once per flush.*  `Pipeline.flush` calls "
        "`store.checkpoint_progress` after every answer.  Calling it only when a second has passed "
        "since the last call (and always in `_finish_run`, which writes the final counters) keeps "
        "every invariant: the counters move with `$max`, and `_start_run` already resumes from "
        "`max(checkpoint, count_processed_in_batch)`.  Visible change: after a kill, the "
        "checkpoint's `processed_sms` may lag by up to a second of work, so `smsd once --resume` "
        "should print `count_processed_in_batch` (tests/test_pipeline.py "
        "`test_resume_prints_progress_of_an_interrupted_run` asserts the exact figure).",
        "2. *`replace_stale` only where a stale document can exist.*  Every flush passes "
        "`replace_stale=True`, i.e. one more `find` on `financial_transactions` per answer.  Within "
        "one journal an SMS has exactly one result (`results.sms_key` is the primary key, first "
        "answer wins), so stale positions can only come from another journal's earlier flush (a "
        "previous lease owner, a lost state directory).  Doing the find only on the replay of rows "
        "journaled before this process started, and for calls whose `repeated_sms > 0`, removes it "
        "from the steady state.",
        "3. *`mark_flushed` without its own fsync.*  Each answer costs three `FULL` commits "
        "(`begin_call`, `record_answer`, `mark_flushed`).  Losing a `mark_flushed` to a power cut "
        "only makes the replay re-flush idempotently (DESIGN.md's window *after flush, before "
        "marking row*), so it can run under `PRAGMA synchronous = NORMAL` (WAL: the next `FULL` "
        "commit's fsync persists it too) or be folded into the next journal transaction.",
    ],
}
"""Explanations kept with the code (they survive a re-run), shown when the bench misses a
target: bench name -> markdown paragraphs."""


def render_markdown(results: list[BenchResult], machine: dict[str, str], params: Params,
                    argv: list[str], started: datetime, elapsed: float, chart: str | None) -> str:
    """The whole ``BENCHMARKS.md``."""
    out = ["# smsd benchmarks", ""]
    out.append(f"Measured {started.strftime('%Y-%m-%d %H:%M UTC')} in {elapsed / 60:.1f} min by "
               f"`smsd bench{(' ' + ' '.join(argv)) if argv else ''}`.  Reproduce with **`make bench`** "
               "(installs the `bench` extra, i.e. matplotlib, then runs `smsd bench`; "
               "`smsd bench --quick` is a smoke run, `--only NAME` runs one benchmark).")
    out.append("")
    out.append(f"Every figure is the median of {params.runs} runs made in the same process run; ratios "
               "are taken from runs made side by side (A/B/A/B).  The host is shared and noisy, so "
               "compare ratios rather than absolute rates across machines.  The bench starts its own "
               "MongoDB-wire server and LLM server on loopback and stops every process it starts.")
    out += ["", "## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    out += ["", "## Summary", "", "| benchmark | figure | value | target | result |", "|---|---|---|---|---|"]
    for res in results:
        if res.error:
            out.append(f"| {res.name} | **failed**: {res.error} | | | |")
        for f in res.figures:
            verdict = "" if f.met is None else ("met" if f.met else "**missed**")
            out.append(f"| {res.name} | {f.name} | {f.shown()} | {f.target} | {verdict} |")
    titles = {"journal": "Journal commit per answer", "overhead": "Pipeline overhead",
              "recovery": "Recovery after a SIGKILL", "ratelimit": "Rate-limit use",
              "scaling": "Scaling with workers", "memory": "Memory"}
    for res in results:
        out += ["", f"## {titles.get(res.name, res.name)}", ""]
        if res.error:
            out += [f"Failed: `{res.error}`", ""]
        out += res.details
        if res.name == "scaling" and chart:
            out += ["", f"![SMS/s against workers]({chart})"]
        missed = any(f.met is False for f in res.figures)
        notes = res.notes + (STATIC_NOTES.get(res.name, []) if missed else [])
        if notes:
            out.append("")
            for n in notes:
                out += [n, ""]
        out.append(f"\n_{res.elapsed_s:.0f} s of bench time._")
    return "\n".join(out).rstrip() + "\n"


def print_summary(results: list[BenchResult]) -> None:
    """The figures on stdout, one per line: ``bench | figure | value | target | met``."""
    print("benchmark  | figure | value | target | result")
    for res in results:
        if res.error:
            print(f"{res.name} | FAILED: {res.error}")
        for f in res.figures:
            verdict = "" if f.met is None else ("met" if f.met else "MISSED")
            print(f"{res.name} | {f.name} | {f.shown()} | {f.target} | {verdict}")
        for n in res.notes:
            print(f"{res.name} | note: {n}")


# --------------------------------------------------------------------------- main

def _cross_reference(results: list[BenchResult]) -> None:
    """Notes that compare figures of two benchmarks of the same run."""
    by_name = {r.name: r for r in results}
    rec, ovh = by_name.get("recovery"), by_name.get("overhead")
    if rec and ovh and not rec.error and not ovh.error:
        replay = next((f.value for f in rec.figures if f.name == "replay flush throughput"), None)
        loop = next((f.value for f in ovh.figures if f.name.startswith("minimal MongoDB loop")), None)
        if replay and loop:
            rec.notes.append(
                f"The replay flushed {replay:.0f} SMS/s; in the same run the minimal MongoDB loop "
                f"(no LLM, no journal) reached {loop:.0f} SMS/s on the same server, i.e. "
                f"{10_000 / loop:.0f} s for 10,000 SMS at that rate.")


RUNNERS: dict[str, Callable[[Bench], BenchResult]] = {
    "journal": bench_journal,
    "overhead": bench_overhead,
    "recovery": bench_recovery,
    "ratelimit": bench_ratelimit,
    "scaling": bench_scaling,
    "memory": bench_memory,
}


def build_parser() -> argparse.ArgumentParser:
    """``smsd bench`` options."""
    p = argparse.ArgumentParser(prog="smsd bench", description="Benchmarks of smsd on this host.")
    p.add_argument("--quick", action="store_true", help="small sizes, one run: a smoke run")
    p.add_argument("--runs", type=int, help="runs per figure (default 3; 1 with --quick)")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help=f"run only these (repeat or comma-separate): {', '.join(BENCHES)}")
    p.add_argument("--out", help=f"markdown report (default {DEFAULT_OUT} on a full run; "
                                 "none with --quick/--only)")
    p.add_argument("--chart", help=f"scaling chart PNG (default {DEFAULT_CHART} on a full run)")
    p.add_argument("--json", help="also write every figure as JSON to this file")
    p.add_argument("--tmp", help="where the temporary state, journals and database go (default $TMPDIR)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; 0 when every selected bench ran (targets missed or not), 1 otherwise."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    only = [n.strip() for arg in args.only for n in arg.split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHES]
    if unknown:
        print(f"smsd bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHES)}",
              file=sys.stderr)
        return 2
    params = Params.quick() if args.quick else Params()
    if args.runs is not None:
        if args.runs < 1:
            print("smsd bench: --runs must be >= 1", file=sys.stderr)
            return 2
        params.runs = args.runs
    full = not args.quick and not only
    out = args.out or (DEFAULT_OUT if full else None)
    chart = args.chart or (DEFAULT_CHART if full else None)
    selected = [n for n in BENCHES if not only or n in only]
    if chart and "scaling" in selected:
        try:
            import matplotlib  # noqa: F401 - only checked here, used by write_chart
        except ImportError:
            print("smsd bench: matplotlib is not installed (pip install 'smsd[bench]'); no chart",
                  file=sys.stderr)
            chart = None

    # SIGTERM unwinds like Ctrl-C so that the finally below stops every process.
    def _term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, _term)
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    bench = Bench(params, args.tmp, verbose=not args.quiet)
    results: list[BenchResult] = []
    try:
        machine = machine_info(bench.root)
        for name in selected:
            bench.say(f"== {name}")
            t0 = time.monotonic()
            try:
                res = RUNNERS[name](bench)
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - report it, go on with the others
                bench.say(traceback.format_exc().rstrip())
                res = BenchResult(name, error=f"{type(exc).__name__}: {exc}")
            res.elapsed_s = time.monotonic() - t0
            results.append(res)
            for f in res.figures:
                bench.say(f"  {f.name}: {f.shown()}" + (f"  (target {f.target}: "
                          f"{'met' if f.met else 'MISSED'})" if f.met is not None else ""))
            if res.error:
                bench.say(f"  FAILED: {res.error}")
    except KeyboardInterrupt:
        print("smsd bench: interrupted; stopping every process it started", file=sys.stderr)
        return 130
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - t_start
    _cross_reference(results)
    print_summary(results)
    scaling = next((r.extra.get("scaling") for r in results if r.name == "scaling"), None)
    if chart and scaling:
        write_chart(Path(chart), scaling, params)
        print(f"chart: {chart}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        link = os.path.relpath(Path(chart).resolve(), Path(out).resolve().parent) if chart and scaling else None
        Path(out).write_text(render_markdown(results, machine, params, argv, started, elapsed, link),
                             encoding="utf-8")
        print(f"report: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "params": asdict(params), "elapsed_s": elapsed,
            "results": [{"name": r.name, "error": r.error, "elapsed_s": r.elapsed_s,
                         "figures": [asdict(f) for f in r.figures], "notes": r.notes,
                         "extra": r.extra}
                        for r in results]}, indent=2, default=str), encoding="utf-8")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
