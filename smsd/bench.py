"""``smsd bench``: how fast smsd is, measured against real servers on this host.

The bench starts its own MongoDB-wire server (:class:`smsd.embedded.EmbeddedMongo`
in a temporary directory) and the local OpenAI-compatible server
(``python -m smsd.llmserver`` as a subprocess, so its CPU is not charged to
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
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

log = logging.getLogger("smsd.bench")

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
        from .model import SmsResult
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
        from .model import SmsResult
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
    """``python -m smsd.llmserver`` as a subprocess, driven through its admin API."""

    def __init__(self, answers: Path, log_path: Path) -> None:
        self.answers = answers
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.base = ""

    def start(self, timeout: float = 30.0) -> "LlmProcess":
        """Start the server and wait for its ready line."""
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "smsd.llmserver", "--host", "127.0.0.1", "--port", "0",
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
        if getattr(self, "_log", None):
            self._log.close()


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
            from .embedded import EmbeddedMongo
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
            "supervisor": {"runtime_dir": str(directory / "run"), "discovery_interval": 0.5,
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

    def wait_processed(self, db_name: str, users: list[str], total: int, proc: subprocess.Popen,
                       timeout: float, poll: float = 0.25,
                       on_poll: Callable[[], None] | None = None) -> float:
        """Poll MongoDB until ``total`` SMS of ``users`` are processed; return the wall time
        (``time.time()``) of the last ``processed_at``.  Raises if smsd exits or times out."""
        raw = self.client[db_name]["sms_fin_rawdata"]
        flt = {"user_id": {"$in": users}, "isprocessed": True}
        deadline = time.monotonic() + timeout
        while True:
            if on_poll is not None:
                on_poll()
            done = raw.count_documents(flt)
            if done >= total:
                break
            if proc.poll() is not None:
                raise RuntimeError(f"smsd exited with {proc.returncode} after {done}/{total} SMS")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out with {done}/{total} SMS processed")
            time.sleep(poll)
        last = raw.find_one(flt, {"processed_at": 1}, sort=[("processed_at", -1)])
        return last["processed_at"].timestamp()


# --------------------------------------------------------------------------- 1. journal

def _journal_items(bench: Bench, n: int, offset: int) -> list[tuple[Any, Any]]:
    from bson import ObjectId
    from .model import sms_key
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
    from .journal import Journal
    from .model import Usage
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

def _smsd_trial(bench: Bench, n: int) -> tuple[float, dict]:
    """One ``smsd once``-equivalent run in this process; returns (SMS/s, summary)."""
    from .config import load_settings
    from .journal import Journal
    from .worker import make_pipeline, make_store
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
    from .model import FlushItem, Provenance
    from .store import Store
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


def bench_overhead(bench: Bench) -> BenchResult:
    """smsd SMS/s ÷ minimal-loop SMS/s, A/B/A/B on the same server, medians."""
    from .cli import setup_logging
    p = bench.params
    res = BenchResult("overhead")
    bench.llm.set_faults(latency_ms=0, latency_jitter_ms=0, rpm_limit=0)
    # Log like `smsd once` does (INFO), to a file instead of the terminal.
    setup_logging("INFO", str(bench.root / "inprocess.log"))
    smsd_rates: list[float] = []
    base_rates: list[float] = []
    ratios: list[float] = []
    try:
        _baseline_trial(bench, min(200, p.overhead_sms))     # warm-up: server caches, imports
        _smsd_trial(bench, min(200, p.overhead_sms))
        for r in range(p.runs):
            pair: dict[str, float] = {}
            order = ("smsd", "baseline") if r % 2 == 0 else ("baseline", "smsd")
            for which in order:
                rate, info = (_smsd_trial if which == "smsd" else _baseline_trial)(bench, p.overhead_sms)
                pair[which] = rate
                bench.say(f"    run {r + 1} {which}: {rate:.1f} SMS/s ({info})")
            smsd_rates.append(pair["smsd"])
            base_rates.append(pair["baseline"])
            ratios.append(pair["smsd"] / pair["baseline"])
    finally:
        logging.getLogger().handlers[:] = []
    ratio = median(ratios)
    res.figures += [
        Figure("overhead", "smsd end to end (zero-latency LLM)", median(smsd_rates), "SMS/s", runs=smsd_rates),
        Figure("overhead", "minimal MongoDB loop (read batch, upsert, mark)", median(base_rates), "SMS/s",
               runs=base_rates),
        Figure("overhead", "pipeline overhead ratio (smsd ÷ minimal loop)", ratio, "ratio", "≥ 0.8",
               ratio is not None and ratio >= 0.8, runs=ratios),
    ]
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
        f"known in advance.  {p.runs} A/B pairs in alternating order after one warm-up of each; "
        "the ratio is the median of the per-pair ratios.")
    res.details.append("")
    res.details.append("| run | smsd SMS/s | minimal loop SMS/s | ratio |")
    res.details.append("|---|---|---|---|")
    for i, (a, b, q) in enumerate(zip(smsd_rates, base_rates, ratios), 1):
        res.details.append(f"| {i} | {a:.1f} | {b:.1f} | {q:.3f} |")
    return res


# --------------------------------------------------------------------------- 3. recovery

def _python_startup_s() -> float:
    """Seconds for a fresh interpreter to import what ``smsd once`` imports."""
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import smsd.cli, smsd.pipeline, smsd.worker, smsd.embedded"],
                   check=True, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0


def _fill_journal(bench: Bench, state_dir: Path, user: str, docs: list[dict]) -> set[str]:
    """Journal answers for ``docs`` (10 per call), answered but never flushed; returns the call ids."""
    from .journal import Journal
    from .model import Usage, sms_key
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
    from .journal import journal_path
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


def bench_recovery(bench: Bench) -> BenchResult:
    """Start ``smsd once`` on a journal of unflushed answers; time to flushed and to the first new call."""
    p = bench.params
    res = BenchResult("recovery")
    bench.llm.set_faults(latency_ms=0, latency_jitter_ms=0, rpm_limit=0)
    startup = median([_python_startup_s() for _ in range(3)])
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
        last_flush = max(times)  # type: ignore[type-var]
        rates.append(_replay_rate(times, p.batch_size) or 0.0)  # type: ignore[arg-type]
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
        bench.say(f"    run {r + 1}: replay flushed at {flushed_s[-1]:.2f} s ({rates[-1]:.0f} SMS/s), "
                  f"first new call at {first_s[-1]:.2f} s, exit at {total_s[-1]:.2f} s")
        bench.drop(db_name)
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
    res.details.append(f"A fresh interpreter importing smsd takes {startup:.2f} s of that (median of 3).")
    res.details.append("")
    res.details.append("| run | all replayed rows flushed | first new LLM call | process exit | "
                       "replay flush SMS/s |")
    res.details.append("|---|---|---|---|---|")
    for i, (a, b, c, d) in enumerate(zip(flushed_s, first_s, total_s, rates), 1):
        res.details.append(f"| {i} | {a:.2f} s | {b:.2f} s | {c:.2f} s | {d:.0f} |")
    if fc is not None and fl is not None and fc >= fl - 0.05:
        res.notes.append(
            "**Finding: the first new LLM call waits for the whole replay.** `Pipeline.run()` calls "
            "`_flush_backlog()` (every unflushed row, 64 calls per flush) before it enters the "
            "claim → LLM loop, so the first paid call of the run starts only after the last "
            "replayed row is flushed.")
    return res


def _key(raw: Any) -> str:
    from .model import sms_key
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
        rows.append((len(times), span, overall, rate, stats["rejected_429"], stats["faults"].get("429", 0)))
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
    res.details.append("| run | calls | span | overall calls/s | steady calls/s | 429 (rpm limit) | 429 (other) |")
    res.details.append("|---|---|---|---|---|---|---|")
    for i, (n, span, overall, rate, rej429, other) in enumerate(rows, 1):
        res.details.append(f"| {i} | {n} | {span:.1f} s | {overall:.3f} | {rate:.3f} | {rej429} | {other} |")
    return res


# --------------------------------------------------------------------------- 5. scaling

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
    t0 = time.time()
    proc = bench.smsd(config, "run")
    try:
        t_done = bench.wait_processed(db_name, users, total, proc, p.run_timeout, poll=0.2)
    finally:
        bench.stop_smsd(proc)
    stats = bench.llm.stats()
    t_first = min(stats["call_times"])
    bench.drop(db_name)
    return {"workers": workers, "sms": total, "startup_s": t_first - t0,
            "work_s": t_done - t_first, "sms_per_s": total / (t_done - t_first),
            "calls": stats["calls"]}


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
    res.details.append("| workers | SMS/s (median) | runs | vs 1 worker | start-up (median) |")
    res.details.append("|---|---|---|---|---|")
    for w in p.scaling_workers:
        rates = [t["sms_per_s"] for t in trials[w]]
        m = median(rates)
        res.figures.append(Figure("scaling", f"SMS/s with {w} worker{'s' if w > 1 else ''}", m, "SMS/s",
                                  runs=rates))
        res.details.append(f"| {w} | {m:.1f} | {', '.join(f'{x:.1f}' for x in rates)} | "
                           f"×{(m / base) if base else 0:.2f} | "
                           f"{median([t['startup_s'] for t in trials[w]]):.2f} s |")
    res.scaling = {w: [t["sms_per_s"] for t in trials[w]] for w in p.scaling_workers}  # type: ignore[attr-defined]
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
    from . import control
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
    last_poll = [0.0]

    def sample() -> None:
        if time.monotonic() - last_poll[0] < 0.25:
            return
        last_poll[0] = time.monotonic()
        try:
            status = control.request(socket_path, "status", timeout=2.0)
        except control.ControlClientError:
            return
        if status.get("rss_bytes"):
            sup.append(int(status["rss_bytes"]))
        workers.extend(int(w["rss_bytes"]) for w in status.get("workers", []) if w.get("rss_bytes"))

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
    ]
    res.details.append(f"`smsd run` with {p.memory_users} workers, {p.memory_users} users × "
                       f"{p.memory_sms_each} SMS (one full worker turn of `worker_max_sms` = 500), "
                       f"{p.memory_latency_ms:.0f} ms LLM; `status` on the control socket every 0.25 s "
                       f"({len(sup)} samples of the supervisor, {len(workers)} of workers; "
                       "`rss_bytes` is psutil's RSS).")
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

STATIC_NOTES: dict[str, list[str]] = {}
"""Explanations kept with the code (they survive a re-run): bench name -> paragraphs."""


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
            out += ["", f"![SMS/s against workers]({Path(chart).name})"]
        notes = res.notes + STATIC_NOTES.get(res.name, [])
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
                log.debug("bench %s failed", name, exc_info=True)
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
    print_summary(results)
    scaling = next((getattr(r, "scaling", None) for r in results if r.name == "scaling"), None)
    if chart and scaling:
        write_chart(Path(chart), scaling, params)
        print(f"chart: {chart}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(render_markdown(results, machine, params, argv, started, elapsed,
                                             chart if scaling else None), encoding="utf-8")
        print(f"report: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "params": asdict(params), "elapsed_s": elapsed,
            "results": [{"name": r.name, "error": r.error, "elapsed_s": r.elapsed_s,
                         "figures": [asdict(f) for f in r.figures], "notes": r.notes}
                        for r in results]}, indent=2), encoding="utf-8")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
