"""``commit`` benchmark: from the last byte of an LLM answer to its journal commit.

Issue 12, item 1: a paid answer must be committed the moment it arrives, whatever
MongoDB is doing.  Measured from both ends, per call:

* the local LLM server records, for every answered completion, the wall-clock time
  its last byte was written (``/_admin/stats`` → ``responses``, keyed by the
  ``x-request-id`` it sent);
* the journal keeps the same request id per call and the time of the answer's
  commit: ``committed_at``, the time its ``COMMIT`` returned (the answer durable,
  WAL fsync included; see :mod:`smsd.journal`).  A journal without that column
  has only ``answered_at``, stamped when ``record_answer`` starts its
  transaction: the figure then stops short of the commit.

Both are ``time.time()`` on this host (the LLM server and smsd run here), so the
two ends are on one clock.

Three conditions, each a ``smsd run`` with the shipped defaults whose MongoDB URI
goes through :mod:`smsd.lab.mongoproxy` (a separate process): *normal* (no
delay), *slow* (every client→server MongoDB message delayed 200 ms) and *down*
(the proxy cuts every connection and refuses new ones for a few seconds while
LLM calls are in flight, then comes back).  For *down* the figure is over the
answers whose last byte was written while MongoDB was down.  Answers never
committed are counted, never dropped from the figures silently.

The data is sized in LLM calls of the shipped ``llm.batch_size`` (SMS per call):
MongoDB goes down once each worker's first wave of calls (``llm.concurrency``) is
in, so every user needs more calls than one wave, or no answer would arrive while
it is down; the bench refuses a smaller size rather than report figures over
nothing, and counts the answers the *down* window holds.
"""
from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from ..mongoproxy import ProxyProcess
from .contract_run import ContractRun, seed_users, shipped_settings
from .harness import Bench, BenchResult, Figure, percentile

TARGET_P99_MS = 50.0
CONDITIONS = ("normal", "slow", "down")


def journal_commits(state_dir: Path) -> tuple[dict[str, float], str]:
    """``({request_id: commit time (wall clock)}, column used)`` from every journal under
    ``state_dir``, opened read-only."""
    out: dict[str, float] = {}
    used = "none"
    for path in sorted((state_dir / "journal").glob("*.sqlite")):
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
        try:
            cols = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
            col = "committed_at" if "committed_at" in cols else "answered_at"
            used = col
            for rid, at in conn.execute(f"SELECT request_id, {col} FROM calls"
                                        f" WHERE request_id IS NOT NULL AND {col} IS NOT NULL"):
                out[rid] = float(at)
        finally:
            conn.close()
    return out, used


def _wait_calls(bench: Bench, n: int, run: ContractRun, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while bench.llm.stats()["calls"] < n:
        if not run.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"smsd made fewer than {n} LLM calls")
        time.sleep(0.05)


def calls_per_user(sms_each: int, batch_size: int) -> int:
    """LLM calls a user of ``sms_each`` SMS needs at ``batch_size`` SMS per call."""
    return -(-sms_each // batch_size)


def _trial(bench: Bench, proxy: ProxyProcess, condition: str, first_wave: int) -> dict:
    p = bench.params
    db_name, directory = bench.fresh(f"commit_{condition}")
    total = p.commit_users * p.commit_sms_each
    seed_users(bench, db_name, p.commit_users, p.commit_sms_each)
    bench.llm.reset()
    proxy.configure(delay_ms=p.commit_slow_ms if condition == "slow" else 0.0, down=False)
    run = ContractRun(bench, db_name, directory, mongo_uri=proxy.uri).start()
    window = None
    try:
        if condition == "down":
            _wait_calls(bench, first_wave, run, p.run_timeout)
            down_at = time.time()
            proxy.configure(down=True)
            time.sleep(p.commit_down_s)
            window = (down_at, time.time())
            proxy.configure(down=False)
        run.wait_done(total, p.run_timeout)
    finally:
        proxy.configure(down=False, delay_ms=0.0)
        run.stop()
    responses = bench.llm.stats()["responses"]
    commits, column = journal_commits(directory / "state")
    bench.drop(db_name)
    if window is not None:
        responses = [r for r in responses if window[0] <= r["written_at"] <= window[1]]
    lat = [(commits[r["request_id"]] - r["written_at"]) * 1000.0 for r in responses
           if r["request_id"] in commits]
    return {"latencies_ms": lat, "answers": len(responses), "not_committed": len(responses) - len(lat),
            "column": column, "window_s": (window[1] - window[0]) if window else None}


def bench_commit(bench: Bench) -> BenchResult:
    """p50/p95/p99/max of answer → journal commit, normal, MongoDB slow and MongoDB down."""
    p = bench.params
    res = BenchResult("commit")
    llm = shipped_settings().llm
    calls = calls_per_user(p.commit_sms_each, llm.batch_size)
    if calls <= llm.concurrency:
        res.error = (f"commit_sms_each={p.commit_sms_each} is {calls} LLM call(s) per user at "
                     f"llm.batch_size={llm.batch_size}: MongoDB would go down after the last answer; "
                     f"give each user more than llm.concurrency={llm.concurrency} calls")
        return res
    first_wave = p.commit_users * llm.concurrency
    bench.llm.set_faults(latency_ms=p.commit_latency_ms, latency_jitter_ms=0, rpm_limit=0)
    proxy = ProxyProcess(bench.mongo_uri, bench.root / "mongoproxy-commit.log").start()
    got: dict[str, dict] = {}
    try:
        for condition in CONDITIONS:
            got[condition] = t = _trial(bench, proxy, condition, first_wave)
            bench.say(f"    {condition}: {len(t['latencies_ms'])} answers joined, "
                      f"{t['not_committed']} not committed, column {t['column']}")
    finally:
        proxy.stop()
        bench.llm.set_faults(latency_ms=0)
    column = next(iter(got.values()))["column"]
    res.details.append(
        f"{p.commit_users} users × {p.commit_sms_each} SMS per condition ({calls} LLM calls per user at "
        f"{llm.batch_size} SMS per call), `smsd run` with the shipped defaults, LLM server latency "
        f"{p.commit_latency_ms:.0f} ms, MongoDB through the proxy "
        f"(`smsd.lab.mongoproxy`): *normal* no delay, *slow* {p.commit_slow_ms:.0f} ms added to every "
        f"MongoDB command, *down* connections cut and refused for {p.commit_down_s:.0f} s once LLM calls "
        "are in flight (figures over the answers written while it was down).  Latency = journal time "
        f"(`calls.{column}`) − the LLM server's time of the response's last byte, joined by request id.")
    if column != "committed_at":
        res.details.append("")
        res.details.append("This journal has no commit time: `answered_at` (stamped when `record_answer` "
                           "begins its transaction) is used, so each figure is a few ms short of the commit.")
    res.details += ["", "| condition | answers | not committed | p50 | p95 | p99 | max |",
                    "|---|---|---|---|---|---|---|"]
    for condition, t in got.items():
        lat = t["latencies_ms"]
        p50, p95, p99 = (percentile(lat, q) for q in (50, 95, 99))
        top = max(lat) if lat else None
        res.details.append(f"| {condition} | {t['answers']} | {t['not_committed']} | "
                           + " | ".join(f"{v if v is None else round(v, 1)} ms" for v in (p50, p95, p99, top))
                           + " |")
        res.figures += [
            Figure("commit", f"{condition}: answer → commit p50", p50, "ms"),
            Figure("commit", f"{condition}: answer → commit p95", p95, "ms"),
            Figure("commit", f"{condition}: answer → commit p99", p99, "ms", f"≤ {TARGET_P99_MS:.0f} ms",
                   p99 is not None and p99 <= TARGET_P99_MS and t["not_committed"] == 0),
            Figure("commit", f"{condition}: answer → commit max", top, "ms"),
            Figure("commit", f"{condition}: answers never committed", float(t["not_committed"]), "count"),
        ]
        if condition == "down":
            res.figures.append(Figure("commit", "down: answers written while MongoDB was down",
                                      float(t["answers"]), "count"))
    res.extra["latencies_ms"] = {c: t["latencies_ms"] for c, t in got.items()}
    return res
