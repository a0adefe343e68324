"""``hosts`` benchmark: several ``smsd run`` hosts against one MongoDB-wire server.

* SMS/s of 1, 2 and 3 hosts (2 workers each, the same 6 users) side by side in
  one run, with each host's own CPU per SMS (psutil, the host's process tree)
  and how busy the one MongoDB-wire server was: on one machine the server is
  the ceiling, not the hosts.
* Take-over: host ``a`` holds 2 users; it is SIGKILLed (or SIGSTOPped) and the
  time until host ``b`` holds both leases is measured, against the lease TTL.
* SMS re-bought per freeze: the SIGSTOP trial runs to the end; the SMS both
  hosts paid for (``verify``'s ``repeats_other_host``) next to the SMS in
  flight on the frozen host when it stopped.
"""
from __future__ import annotations

import time

from ...lease import LEASES_COLLECTION
from ..invariants import verify
from ..multihost import HostProcess, in_flight
from .harness import BENCH_MODEL, Bench, BenchResult, Figure, median
from .scaling import tree_cpu

TTL = 5.0
USERS = 6


def _host(bench: Bench, directory, name: str, db_name: str, workers: int, **llm) -> HostProcess:
    p = bench.params
    return HostProcess(name, directory / name, mongo_uri=bench.mongo_uri, db=db_name, llm_url=bench.llm.url,
                       llm=dict({"model": BENCH_MODEL, "batch_size": p.batch_size,
                                 "concurrency": p.llm_concurrency, "timeout": 30.0}, **llm),
                       pipeline={"page_size": p.page_size},
                       supervisor={"max_workers": workers, "discovery_interval": 1.0},
                       lease={"ttl": TTL}).start()


def _throughput(bench: Bench, n_hosts: int, sms_each: int) -> dict:
    db_name, directory = bench.fresh(f"hosts{n_hosts}")
    users = [f"h{n_hosts}-{i}" for i in range(USERS)]
    bench.llm.reset()
    bench.llm.set_faults(latency_ms=100, latency_jitter_ms=0, rpm_limit=0)
    hosts = [_host(bench, directory, f"host{i}", db_name, 2) for i in range(n_hosts)]
    try:
        time.sleep(1.5)   # every host heartbeating before there is work: shares are fair
        mongo0 = bench.cpu_snapshot()["mongo"]
        cpu0 = [tree_cpu(h.proc.pid) for h in hosts]
        t0 = time.time()
        for u in users:
            bench.seed(db_name, u, sms_each)
        t_done = bench.wait_processed(db_name, users, sms_each * USERS, hosts[0].proc, 600, poll=0.2)
        cpu = [tree_cpu(h.proc.pid) - c for h, c in zip(hosts, cpu0)]
        mongo = bench.cpu_snapshot()["mongo"] - mongo0
    finally:
        for h in hosts:
            h.stop(30)
    first = min(bench.llm.stats()["call_times"])
    total = sms_each * USERS
    bench.drop(db_name)
    return {"hosts": n_hosts, "sms_per_s": total / max(1e-9, t_done - first),
            "host_cpu_ms_per_sms": sum(cpu) * 1000 / total,
            "mongo_cpu_ms_per_sms": mongo * 1000 / total,
            "mongo_busy": mongo / max(1e-9, t_done - t0)}


def _takeover(bench: Bench, how: str, sms_each: int) -> dict:
    db_name, directory = bench.fresh(f"take{how}")
    bench.llm.reset()
    bench.llm.set_faults(latency_ms=300, latency_jitter_ms=0, rpm_limit=0)
    users = ["t-0", "t-1"]
    docs = {u: bench.seed(db_name, u, sms_each) for u in users}
    answers = {text: exp for text, _, exp in bench.corpus.items}
    expected = {d["_id"]: answers[d["body"]] for u in users for d in docs[u]}
    leases = bench.client[db_name][LEASES_COLLECTION]
    a = _host(bench, directory, "a", db_name, 2, batch_size=2)
    b = None
    try:
        deadline = time.monotonic() + 60
        while leases.count_documents({"owner": a.host_id}) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        b = _host(bench, directory, "b", db_name, 2, batch_size=2)
        time.sleep(2.0)    # b heartbeating, a well into both users
        cut = in_flight(a.state_dir)
        t0 = time.monotonic()
        a.freeze() if how == "stop" else a.kill()
        while leases.count_documents({"owner": b.host_id}) < 2:
            if time.monotonic() - t0 > 10 * TTL:
                raise RuntimeError("no take-over within 10 TTLs")
            time.sleep(0.05)
        took = time.monotonic() - t0
        if how == "stop":
            time.sleep(max(0.0, TTL + 2 - took))
            a.thaw()
        else:
            bench.wait_processed(db_name, users, 0, b.proc, 600)
            a = _host(bench, directory, "a", db_name, 2, batch_size=2)   # reconciles its journal
        deadline = time.monotonic() + 300
        while True:
            report = verify(bench.client[db_name], expected, state_dir=[a.state_dir, b.state_dir])
            if report.ok or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        a.stop(30)
        if b is not None:
            b.stop(30)
    bench.drop(db_name)
    return {"how": how, "takeover_s": took, "in_flight": cut, "rebought": report.repeats_other_host,
            "ok": report.ok, "violations": report.violations}


def bench_hosts(bench: Bench) -> BenchResult:
    """1/2/3 hosts side by side, take-over after SIGKILL and SIGSTOP, SMS re-bought per freeze."""
    p = bench.params
    res = BenchResult("hosts")
    quick = p.runs == 1 and p.scaling_sms_each < 100
    sms_each = 30 if quick else 150
    trials: dict[int, list[dict]] = {n: [] for n in (1, 2, 3)}
    for r in range(p.runs):
        for n in ((1, 2, 3) if r % 2 == 0 else (3, 2, 1)):
            t = _throughput(bench, n, sms_each)
            trials[n].append(t)
            bench.say(f"    run {r + 1}, {n} host(s): {t['sms_per_s']:.1f} SMS/s")
    res.details.append(f"{USERS} users × {sms_each} SMS, every host `smsd run` with 2 workers, LLM "
                       f"latency 100 ms, batch {p.batch_size}, concurrency {p.llm_concurrency}; all "
                       "hosts and the one MongoDB-wire server on this machine.")
    res.details.append("")
    res.details.append("| hosts | SMS/s (median) | runs | hosts' CPU ms / SMS | MongoDB server CPU ms / SMS "
                       "| MongoDB server busy |")
    res.details.append("|---|---|---|---|---|---|")
    for n, ts in trials.items():
        rates = [t["sms_per_s"] for t in ts]
        m = median(rates) or 0.0
        res.figures.append(Figure("hosts", f"SMS/s with {n} host{'s' if n > 1 else ''}", m, "SMS/s", runs=rates))
        res.details.append(
            f"| {n} | {m:.1f} | {', '.join(f'{x:.1f}' for x in rates)} | "
            f"{median([t['host_cpu_ms_per_sms'] for t in ts]):.1f} | "
            f"{median([t['mongo_cpu_ms_per_sms'] for t in ts]):.1f} | "
            f"{median([t['mongo_busy'] for t in ts]) * 100:.0f} % of a CPU |")
    takes = {how: [_takeover(bench, how, 60 if quick else 120) for _ in range(p.runs)]
             for how in ("kill", "stop")}
    res.details.append("")
    res.details.append(f"Take-over (lease TTL {TTL:.0f} s, discovery every 1 s): host a holds 2 users, "
                       "then is SIGKILLed or SIGSTOPped (whole process group); time until host b holds "
                       "both leases.  The frozen host is resumed after TTL + 2 s and its stale flush is "
                       "refused; the run goes to the end and every invariant is checked.")
    res.details.append("")
    res.details.append("| host a | take-over s (median) | runs | SMS in flight on a | SMS re-bought | invariants |")
    res.details.append("|---|---|---|---|---|---|")
    for how, ts in takes.items():
        secs = [t["takeover_s"] for t in ts]
        res.figures.append(Figure("hosts", f"take-over after SIG{how.upper()}", median(secs), "s", runs=secs))
        res.details.append(f"| SIG{how.upper()} | {median(secs):.1f} | {', '.join(f'{x:.1f}' for x in secs)} | "
                           f"{', '.join(str(t['in_flight']) for t in ts)} | "
                           f"{', '.join(str(t['rebought']) for t in ts)} | "
                           f"{'ok' if all(t['ok'] for t in ts) else '; '.join(v for t in ts for v in t['violations'])} |")
    res.extra["hosts"] = {"throughput": trials, "takeover": takes}
    return res
