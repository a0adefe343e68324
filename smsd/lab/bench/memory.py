"""``memory`` benchmark: RSS and USS of the supervisor and its workers during ``smsd run``.

Sampled from the control socket's ``status`` (what the supervisor reads with psutil
and holds against ``worker_rss_limit_mb``), plus psutil's USS: what each extra
worker really costs.
"""
from __future__ import annotations

import time

from .harness import Bench, BenchResult, Figure, median


def bench_memory(bench: Bench) -> BenchResult:
    """RSS of the supervisor and of its workers while ``smsd run`` works (control socket status)."""
    import psutil

    from ... import control
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
