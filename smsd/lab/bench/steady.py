"""``steady`` benchmark: SMS keep arriving for many users (issue 12, item 5).

The backfill is done (every user has processed SMS already), ``smsd run`` runs
with the shipped defaults, and new SMS arrive at a fixed total rate, each for a
user picked at random (seeded), for a fixed time.  Measured:

* insert → stored transaction latency, p50 / p95, an SMS not stored by the end of
  the wait counting as infinitely late (insert time taken by the bench
  just before its ``insert_one``; "stored" is the transaction document's
  ``created_at``, and for SMS without a transaction (OTPs) the raw SMS's
  ``processed_at``, which smsd sets only after the transactions are stored);
* worker starts per minute: distinct worker pids seen in the control socket's
  ``status`` (polled every 0.5 s, so a lower bound) and the supervisor's
  ``worker N started`` log lines (exact, when the supervisor logs them);
* that nothing piles up: pending SMS sampled during the run, pending when the
  inserts stop, and how long the rest takes to drain.
"""
from __future__ import annotations

import math
import random
import re
import threading
import time
from datetime import datetime, timedelta, timezone

from .contract_run import PENDING, ContractRun, shipped_settings
from .harness import Bench, BenchResult, Figure, percentile

WORKER_STARTED = re.compile(r"worker \d+ started")
#: The arrival schedule's tick: SMS due within it are inserted together.
TICK_S = 0.1


def _seed_history(bench: Bench, db_name: str, users: list[str], each: int) -> None:
    done_at = datetime.now(timezone.utc) - timedelta(days=1)
    docs = []
    for k, user in enumerate(users):
        for d in bench.corpus.docs(user, each, start=k * each):
            d.update(isprocessed=True, processed_at=done_at)
            docs.append(d)
    coll = bench.client[db_name]["sms_fin_rawdata"]
    for i in range(0, len(docs), 1000):
        coll.insert_many(docs[i:i + 1000], ordered=False)


def _insert_loop(bench: Bench, db_name: str, users: list[str], rate: float, seconds: float,
                 inserted: dict, stop: threading.Event) -> None:
    """Insert SMS on a fixed schedule of ``rate`` per second for ``seconds``.

    Every tick inserts the SMS that are due by then in one ``insert_many``, so a slow
    server makes the batches bigger rather than the arrival rate lower; each SMS's
    insert time is taken just before the call that inserts it."""
    coll = bench.client[db_name]["sms_fin_rawdata"]
    rng = random.Random(12)
    t0 = time.monotonic()
    total = int(rate * seconds)
    k = 0
    while k < total and not stop.wait(TICK_S):
        due = min(total, int((time.monotonic() - t0) * rate) + 1)
        docs = []
        for j in range(k, due):
            [doc] = bench.corpus.docs(rng.choice(users), 1, start=1_000_000 + j)
            docs.append(doc)
        if not docs:
            continue
        now = time.time()
        for doc in docs:
            inserted[doc["_id"]] = now
        coll.insert_many(docs, ordered=False)
        k = due


def _growth(samples: list[int]) -> float:
    """Mean of the second half of ``samples`` minus the mean of the first half (0 if too few)."""
    half = len(samples) // 2
    if half == 0:
        return 0.0
    return sum(samples[-half:]) / half - sum(samples[:half]) / half


def _discovery_interval() -> float:
    """The shipped config's discovery interval (the wait an arriving SMS has before it is seen)."""
    return float(shipped_settings().supervisor.discovery_interval)


def bench_steady(bench: Bench) -> BenchResult:
    """Latency, worker starts per minute and backlog while SMS keep arriving."""
    p = bench.params
    res = BenchResult("steady")
    bench.llm.set_faults(latency_ms=p.steady_latency_ms, latency_jitter_ms=0, rpm_limit=0)
    bench.llm.reset()
    db_name, directory = bench.fresh("steady")
    users = [f"s{i:05d}" for i in range(p.steady_users)]
    _seed_history(bench, db_name, users, p.steady_history)
    raw = bench.client[db_name]["sms_fin_rawdata"]
    run = ContractRun(bench, db_name, directory).start()
    inserted: dict = {}
    stop = threading.Event()
    pids: set[int] = set()
    backlog: list[tuple[float, int]] = []
    try:
        deadline = time.monotonic() + 60
        while run.status() is None:
            if not run.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"smsd run did not open its control socket: {run.log_tail()}")
            time.sleep(0.2)
        inserter = threading.Thread(target=_insert_loop, args=(bench, db_name, users, p.steady_rate,
                                                               p.steady_seconds, inserted, stop),
                                    daemon=True)
        t0 = time.monotonic()
        inserter.start()
        next_sample = t0
        while inserter.is_alive():
            st = run.status(timeout=2.0)
            if st:
                pids.update(int(w["pid"]) for w in st.get("workers") or [])
            if time.monotonic() >= next_sample:
                backlog.append((time.monotonic() - t0, raw.count_documents(PENDING)))
                next_sample += 5.0
            if not run.alive():
                raise RuntimeError(f"smsd run exited with {run.proc.returncode}: {run.log_tail()}")
            time.sleep(0.5)
        inserted_for = time.monotonic() - t0
        pending_at_end = raw.count_documents(PENDING)
        drain_deadline = time.monotonic() + p.steady_drain_s
        while raw.find_one(PENDING, {"_id": 1}) is not None and time.monotonic() < drain_deadline:
            st = run.status(timeout=2.0)
            if st:
                pids.update(int(w["pid"]) for w in st.get("workers") or [])
            time.sleep(0.5)
        left = raw.count_documents(PENDING)
        drained_s = time.monotonic() - t0 - inserted_for
    finally:
        stop.set()
        run.stop()
    log_path = directory / "smsd.log"
    log_starts = len(WORKER_STARTED.findall(log_path.read_text(errors="replace"))) if log_path.exists() else 0
    ids = list(inserted)
    stored: dict = {}
    for i in range(0, len(ids), 1000):
        chunk = ids[i:i + 1000]
        for d in raw.find({"_id": {"$in": chunk}, "isprocessed": True}, {"processed_at": 1}):
            stored[d["_id"]] = d["processed_at"].timestamp()
        for t in bench.client[db_name]["financial_transactions"].find(
                {"sms_id": {"$in": chunk}}, {"sms_id": 1, "created_at": 1}):
            at = t["created_at"].timestamp()
            stored[t["sms_id"]] = min(at, stored.get(t["sms_id"], at))
    bench.drop(db_name)
    lat = [stored[i] - inserted[i] for i in ids if i in stored]
    minutes = inserted_for / 60.0
    # An SMS never stored counts as infinitely late: a backlog cannot hide in the percentiles.
    ranked = lat + [math.inf] * (len(ids) - len(lat))
    p50, p95 = percentile(ranked, 50), percentile(ranked, 95)
    res.figures += [
        Figure("steady", "insert → stored transaction p50", p50, "s"),
        Figure("steady", "insert → stored transaction p95", p95, "s"),
        Figure("steady", "SMS not stored by the end of the drain wait", float(len(ids) - len(lat)), "count"),
        Figure("steady", "worker starts per minute (supervisor log)", log_starts / minutes, "/min"),
        Figure("steady", "distinct worker pids per minute (status, lower bound)", len(pids) / minutes, "/min"),
        Figure("steady", "pending SMS when the inserts stopped", float(pending_at_end), "count"),
        Figure("steady", "arrival rate achieved", len(ids) / inserted_for, "SMS/s"),
    ]
    res.details.append(
        f"{p.steady_users} users, each with {p.steady_history} SMS already processed; `smsd run` with "
        f"the shipped defaults; new SMS at {p.steady_rate:g}/s in total (a seeded random user each) for "
        f"{inserted_for:.0f} s: {len(ids)} SMS inserted ({len(ids) / inserted_for:.1f}/s achieved; "
        f"what is due is inserted every {TICK_S:g} s); LLM server latency **{p.steady_latency_ms:.0f} ms** per "
        f"call.  After the inserts stop, up to {p.steady_drain_s:.0f} s for the rest: "
        f"{'all stored' if left == 0 else f'{left} still pending'} after {drained_s:.1f} s.  "
        f"{bench.llm.stats()['calls']} LLM calls.")
    res.details += ["", "Pending SMS during the run (every 5 s): " +
                    ", ".join(f"{t:.0f} s: {n}" for t, n in backlog)]
    # A backlog of about one discovery interval's arrivals is the wait for the next tick;
    # it piles up when it grows: the second half of the run holds more than the first
    # (past the first interval) by over 3 s of arrivals, or the drain did not finish.
    interval = _discovery_interval()
    growth = _growth([n for t, n in backlog if t >= interval])
    piled = left > 0 or growth > 3 * p.steady_rate
    res.figures.append(Figure("steady", "backlog growth (mean pending, second half − first half)",
                              growth, "SMS"))
    res.notes.append(f"Backlog when the inserts stopped: {pending_at_end} SMS (about "
                     f"{pending_at_end / p.steady_rate:.1f} s of arrivals; discovery looks every "
                     f"{interval:g} s); from the first half of the run to the second "
                     f"it moved by {growth:+.0f}: {'it piles up' if piled else 'nothing piles up'}.")
    res.extra.update(latencies_s=lat, backlog=backlog, worker_pids=len(pids), log_starts=log_starts)
    return res
