"""``bare`` benchmark: ``smsd run`` ÷ the bare loop, for many small users and for a backfill.

Issue 12's first "must show": smsd's SMS/s divided by the bare loop's
(:mod:`.bare_loop`) for 300 users × 4 SMS and for 4 users × 1000 SMS, on the same
MongoDB-wire server in the same run, alternating smsd / bare / smsd / bare, smsd
with the shipped ``config.toml`` defaults (:mod:`.contract_run`) and the local LLM
server answering at once.  Each trial gets a fresh database.

Both sides are timed from the start of their processes to the last
``processed_at`` (end to end: what a user waits for), and after start-up: the
bare loop from the moment its processes are connected and told to go, smsd from
its first LLM call (as the LLM server saw it; so smsd's discovery and first page
read are left out, which favours smsd slightly).  The ratio of a pair is
bare time ÷ smsd time, i.e. smsd SMS/s ÷ bare SMS/s; the figure is the median of
the pairs.
"""
from __future__ import annotations

from .bare_loop import run_bare, templates
from .contract_run import ContractRun, seed_users, shipped_settings
from .harness import Bench, BenchResult, Figure, median

TARGET = 0.8


def _smsd_trial(bench: Bench, n_users: int, sms_each: int) -> dict:
    db_name, directory = bench.fresh("smsd")
    total = n_users * sms_each
    seed_users(bench, db_name, n_users, sms_each)
    bench.llm.reset()
    before = bench.cpu_snapshot()
    run = ContractRun(bench, db_name, directory).start()
    try:
        first, last = run.wait_done(total, bench.params.run_timeout)
    finally:
        run.stop()
    after = bench.cpu_snapshot()
    stats = bench.llm.stats()
    bench.drop(db_name)
    first_call = min(stats["call_times"]) if stats["call_times"] else first
    return {"end_to_end_s": last - run.launched, "after_startup_s": max(1e-6, last - first_call),
            "llm_calls": stats["calls"], **_cpu(before, after)}


def _cpu(before: dict, after: dict) -> dict:
    """CPU seconds of the MongoDB-wire server and of the side's own processes (reaped
    children: ``smsd run`` and its workers, or the bare loop's processes) over a trial."""
    return {"server_cpu_s": after["mongo"] - before["mongo"], "own_cpu_s": after["children"] - before["children"]}


def _bare_trial(bench: Bench, n_users: int, sms_each: int, tmpl: dict) -> dict:
    db_name, _ = bench.fresh("bare")
    total = n_users * sms_each
    users = seed_users(bench, db_name, n_users, sms_each)
    before = bench.cpu_snapshot()
    res = run_bare(bench, db_name, users, total, processes=4, page_size=200, tmpl=tmpl)
    after = bench.cpu_snapshot()
    bench.drop(db_name)
    return {"end_to_end_s": res.end_to_end_s, "after_startup_s": res.after_startup_s, "pages": res.pages,
            **_cpu(before, after)}


def bench_bare(bench: Bench) -> BenchResult:
    """smsd ÷ bare loop, A/B/A/B, for each shape of :attr:`Params.bare_shapes`."""
    p = bench.params
    res = BenchResult("bare")
    bench.llm.set_faults(latency_ms=0, latency_jitter_ms=0, rpm_limit=0)
    tmpl = templates(bench)
    cfg = shipped_settings()
    _bare_trial(bench, 4, 20, tmpl)          # warm-up: server caches, imports, page cache
    res.details.append(
        "**smsd**: `smsd run` with the shipped `config.toml` copied unchanged (defaults: "
        f"{cfg.supervisor.max_workers} workers, batch {cfg.llm.batch_size}, concurrency {cfg.llm.concurrency}, "
        f"page {cfg.pipeline.page_size}, discovery every {cfg.supervisor.discovery_interval:g} s, "
        f"groups of up to {cfg.pipeline.trickle_group_max_users} small users, journal "
        f"`synchronous={cfg.journal.synchronous}`), only "
        "`SMSD_MONGO_URI`, `SMSD_MONGO_DB`, `SMSD_LLM_BASE_URL`, `SMSD_STATE_DIR` and "
        "`SMSD_RUNTIME_DIR` set; the local LLM server (a separate process) answers at once; done "
        "when no SMS is pending in MongoDB.  **Bare loop**: 4 processes (`spawn`), users dealt "
        "round-robin; per page of 200 pending SMS (index `(user_id, isprocessed, _id)`): one `find`, "
        "one unordered `bulk_write` of upserts with `j: true` (the documents smsd writes for the "
        "same answers), one `update_many` marking the page processed.  **End to end**: from "
        "launching the processes to the last `processed_at`; **after start-up**: smsd from its first "
        "LLM call (seen by the LLM server), the bare loop from the moment its processes are connected "
        "and told to go, to the last `processed_at`.  **CPU**: the MongoDB-wire server's (psutil) and "
        "the side's own processes' (rusage of the reaped children: `smsd run` and its workers, or the bare "
        "loop's processes) during the trial.  Ratio = smsd SMS/s ÷ bare SMS/s of the same pair; order "
        f"smsd, bare, smsd, bare…; {p.bare_pairs} pairs per shape, fresh database per trial.")
    res.details += ["", "| shape | pair | smsd end to end | bare end to end | ratio | smsd after start-up | "
                    "bare after start-up | ratio, after start-up | LLM calls | server CPU, smsd / bare | "
                    "own processes' CPU, smsd / bare |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n_users, sms_each in p.bare_shapes:
        total = n_users * sms_each
        shape = f"{n_users} users × {sms_each} SMS"
        ratios: list[float] = []
        ratios_a: list[float] = []
        rates: dict[str, list[float]] = {"smsd": [], "bare": []}
        for pair in range(p.bare_pairs):
            s = _smsd_trial(bench, n_users, sms_each)
            bench.say(f"    {shape} pair {pair + 1} smsd: {s['end_to_end_s']:.2f} s ({s})")
            b = _bare_trial(bench, n_users, sms_each, tmpl)
            bench.say(f"    {shape} pair {pair + 1} bare: {b['end_to_end_s']:.2f} s ({b})")
            ratios.append(b["end_to_end_s"] / s["end_to_end_s"])
            ratios_a.append(b["after_startup_s"] / s["after_startup_s"])
            rates["smsd"].append(total / s["end_to_end_s"])
            rates["bare"].append(total / b["end_to_end_s"])
            res.details.append(
                f"| {shape} | {pair + 1} | {s['end_to_end_s']:.2f} s ({total / s['end_to_end_s']:.0f} SMS/s) | "
                f"{b['end_to_end_s']:.2f} s ({total / b['end_to_end_s']:.0f} SMS/s) | {ratios[-1]:.3f} | "
                f"{s['after_startup_s']:.2f} s | {b['after_startup_s']:.2f} s | {ratios_a[-1]:.3f} | {s['llm_calls']} | "
                f"{s['server_cpu_s']:.2f} s / {b['server_cpu_s']:.2f} s | {s['own_cpu_s']:.2f} s / {b['own_cpu_s']:.2f} s |")
        ratio, ratio_a = median(ratios), median(ratios_a)
        res.figures += [
            Figure("bare", f"{shape}: smsd end to end", median(rates["smsd"]), "SMS/s", runs=rates["smsd"]),
            Figure("bare", f"{shape}: bare loop end to end", median(rates["bare"]), "SMS/s",
                   runs=rates["bare"]),
            Figure("bare", f"{shape}: smsd ÷ bare loop (end to end)", ratio, "ratio", f"≥ {TARGET}",
                   ratio is not None and ratio >= TARGET, runs=ratios),
            Figure("bare", f"{shape}: smsd ÷ bare loop (after start-up)", ratio_a, "ratio", runs=ratios_a),
        ]
        res.extra.setdefault("pairs", {})[shape] = {"ratios": ratios, "ratios_after_startup": ratios_a,
                                                   "rates": rates}
    met = [f.met for f in res.figures if f.met is not None]
    res.notes.append(f"The ≥ {TARGET} goal (end to end, both shapes) is "
                     f"{'met' if met and all(met) else 'NOT met'} in this run.")
    return res
