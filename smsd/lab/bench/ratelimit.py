"""``ratelimit`` benchmark: how much of a host-wide LLM rate limit ``smsd run`` uses.

Several workers against a slow LLM server limited to R requests/s: the steady
calls/s achieved divided by R, the gaps that lose slots, and the 429s of a server
whose own limit is slightly above R.
"""
from __future__ import annotations

import math

from .harness import Bench, BenchResult, Figure, median


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
