"""``mongoops`` benchmark: MongoDB commands per SMS, counted from the server's side.

Every MongoDB connection of ``smsd run`` (supervisor, discovery children, workers)
goes through :mod:`smsd.lab.mongoproxy`, a separate process that counts each
client→server message by command name and times each one from the server's
side (how long the server had it, shared among the commands it had at once:
where its time goes).  One run per shape of
:attr:`Params.ops_shapes` (shipped defaults, zero-latency LLM), and the same shape
through the bare loop (:mod:`.bare_loop`) for the floor.  The driver's own
monitoring (``hello``, ``ping``, ``endSessions``...) is counted apart: it depends on
time and on the number of processes, not on the SMS.
"""
from __future__ import annotations

from ..mongoproxy import MONITORING, ProxyProcess
from .bare_loop import run_bare, templates
from .contract_run import ContractRun, seed_users
from .harness import Bench, BenchResult, Figure


def _split(commands: dict[str, int]) -> tuple[dict[str, int], int]:
    work = {k: v for k, v in commands.items() if k not in MONITORING}
    return work, sum(v for k, v in commands.items() if k in MONITORING)


def _smsd(bench: Bench, proxy: ProxyProcess, n_users: int, sms_each: int) -> dict:
    db_name, directory = bench.fresh("ops_smsd")
    total = n_users * sms_each
    seed_users(bench, db_name, n_users, sms_each)
    proxy.reset()
    run = ContractRun(bench, db_name, directory, mongo_uri=proxy.uri).start()
    try:
        first, last = run.wait_done(total, bench.params.run_timeout)
    finally:
        run.stop()
    stats = proxy.stats()
    bench.drop(db_name)
    return {"commands": stats["commands"], "server_time": stats["server_time"], "seconds": last - run.launched}


def _bare(bench: Bench, proxy: ProxyProcess, n_users: int, sms_each: int, tmpl: dict) -> dict:
    db_name, _ = bench.fresh("ops_bare")
    users = seed_users(bench, db_name, n_users, sms_each)
    proxy.reset()
    run = run_bare(bench, db_name, users, n_users * sms_each, tmpl=tmpl, uri=proxy.uri)
    stats = proxy.stats()
    bench.drop(db_name)
    return {"commands": stats["commands"], "server_time": stats["server_time"], "seconds": run.end_to_end_s}


def _server_time_table(shape: str, sides: dict[str, dict]) -> list[str]:
    """Markdown: each side's server time by command and collection, the largest first."""
    labels = set(sides["smsd"]["server_time"]) | set(sides["bare"]["server_time"])

    def cell(side: str, label: str) -> str:
        t = sides[side]["server_time"].get(label)
        return f"{t['busy_s']:.2f} ({t['n']})" if t else "-"

    order = sorted(labels, key=lambda k: -max(sides[s]["server_time"].get(k, {}).get("busy_s", 0.0)
                                                for s in sides))
    rows = [f"Server time of {shape} by command and collection, seconds (commands): while k commands "
            "are out, each is charged 1/k of the time.", "",
            "| command | smsd | bare loop |", "|---|---|---|"]
    rows += [f"| `{label}` | {cell('smsd', label)} | {cell('bare', label)} |" for label in order]
    totals = {s: sum(t["busy_s"] for t in sides[s]["server_time"].values()) for s in sides}
    rows.append(f"| **server busy** | **{totals['smsd']:.2f}** | **{totals['bare']:.2f}** |")
    return rows


def bench_mongoops(bench: Bench) -> BenchResult:
    """Commands per SMS by name, smsd and the bare loop, per shape."""
    p = bench.params
    res = BenchResult("mongoops")
    bench.llm.set_faults(latency_ms=0, latency_jitter_ms=0, rpm_limit=0)
    tmpl = templates(bench)
    proxy = ProxyProcess(bench.mongo_uri, bench.root / "mongoproxy-ops.log").start()
    runs: dict[str, dict[str, dict]] = {}
    sizes: dict[str, int] = {}
    try:
        for n_users, sms_each in p.ops_shapes:
            shape = f"{n_users} users × {sms_each} SMS"
            sizes[shape] = n_users * sms_each
            runs[shape] = {"smsd": _smsd(bench, proxy, n_users, sms_each),
                           "bare": _bare(bench, proxy, n_users, sms_each, tmpl)}
            bench.say(f"    {shape}: {runs[shape]}")
    finally:
        proxy.stop()
    res.details.append(
        "Commands each side sent, counted by the proxy (`smsd.lab.mongoproxy`) by the first key of each "
        "`OP_MSG`/`OP_QUERY`, divided by the SMS processed.  smsd: `smsd run`, shipped defaults, "
        "zero-latency LLM, every process's connections through the proxy; bare loop: 4 processes, page "
        "200.  *Monitoring* is the drivers' `hello`/`ping`/`endSessions`, which grows with time and "
        "processes, not SMS.")
    for shape, sides in runs.items():
        total = sizes[shape]
        per = {}
        names: set[str] = set()
        for side, r in sides.items():
            work, monitoring = _split(r["commands"])
            names |= set(work)
            per[side] = (work, monitoring)
            res.figures.append(Figure("mongoops", f"{shape}: {side} commands per SMS (monitoring apart)",
                                      sum(work.values()) / total, "cmd/SMS"))
        res.details += ["", f"**{shape}** ({total} SMS; smsd took {sides['smsd']['seconds']:.1f} s, the "
                        f"bare loop {sides['bare']['seconds']:.1f} s)", "",
                        "| command | smsd, per SMS | bare loop, per SMS |", "|---|---|---|"]
        for name in sorted(names, key=lambda n: -per["smsd"][0].get(n, 0)):
            res.details.append(f"| `{name}` | {per['smsd'][0].get(name, 0) / total:.3f} | "
                               f"{per['bare'][0].get(name, 0) / total:.3f} |")
        res.details.append(f"| **all but monitoring** | **{sum(per['smsd'][0].values()) / total:.3f}** | "
                           f"**{sum(per['bare'][0].values()) / total:.3f}** |")
        res.details.append(f"| monitoring (whole run) | {per['smsd'][1]} | {per['bare'][1]} |")
        res.details += ["", *_server_time_table(shape, sides)]
        for side, r in sides.items():
            res.figures.append(Figure("mongoops", f"{shape}: {side} server busy (proxy)",
                                      sum(t["busy_s"] for t in r["server_time"].values()), "s"))
    res.extra["commands"] = {shape: {side: r["commands"] for side, r in sides.items()}
                             for shape, sides in runs.items()}
    return res
