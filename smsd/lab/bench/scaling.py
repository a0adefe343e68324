"""``scaling`` benchmark: SMS/s of ``smsd run`` with 1, 2, 4 and 8 workers.

One user per worker against a 100 ms LLM, start-up subtracted, with the CPU each
process (MongoDB-wire server, smsd, LLM server) spends per SMS to say what bounds
the throughput.  The chart of these figures is drawn by :mod:`.report`.
"""
from __future__ import annotations

import os
import time

from .harness import Bench, BenchResult, Figure, median


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
