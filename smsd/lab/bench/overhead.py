"""``overhead`` benchmark: smsd's SMS/s end to end against a minimal MongoDB loop.

A/B/A/B trials of a ``smsd once``-equivalent pipeline (LLM over HTTP, and with the
answers looked up in process), and of a loop doing only the unavoidable MongoDB
work; then one instrumented run of each that splits the pipeline's main-thread
time by call, and the cost of one LLM round trip.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator

from .harness import BENCH_MODEL, Bench, BenchResult, Corpus, Figure, _fmt, median


class TableExtractor:
    """Answers like the LLM client, from the corpus table, in process: no HTTP, no SDK.

    Used to split smsd's overhead into the pipeline's own work and the cost of an LLM
    round trip (openai SDK, HTTP, JSON) on this host."""

    model = BENCH_MODEL

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus

    def extract(self, sms: list[Any], *, stop: threading.Event | None = None,
                wire_ids: list[str] | None = None) -> Any:
        """The known results of ``sms`` as an :class:`~smsd.llm.LlmAnswer`."""
        from ...llm import LlmAnswer
        from ...model import Usage
        return LlmAnswer(results={m.key: self.corpus.result(m.key, m.text) for m in sms}, failed={},
                         unknown_ids=[], request_id="req_table", model=self.model,
                         usage=Usage(400, 300), attempts=1)

    def close(self) -> None:
        """Nothing to close."""


def _smsd_trial(bench: Bench, n: int, in_process: bool = False) -> tuple[float, dict]:
    """One ``smsd once``-equivalent run in this process; returns (SMS/s, info).

    ``in_process`` swaps the LLM client for :class:`TableExtractor`."""
    from ...config import load_settings
    from ...journal import Journal
    from ...worker import make_pipeline, make_store
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
    from ...model import FlushItem, Provenance
    from ...store import Store
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
    from ... import journal as journal_mod, pipeline as pipeline_mod, store as store_mod
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

    from ...llm import LlmClient
    from ...model import Sms, sms_key
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
    from ...logsetup import setup_logging
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
