"""``smsd bench`` entry point: the options, the ``--only`` selection and the run loop.

:func:`main` parses the command line, runs the selected benchmarks one after the
other (an error in one is reported and the others still run), stops every process
on the way out, and writes the summary, report, chart and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .batch import bench_batch
from .discovery import bench_discovery
from .fence import bench_fence
from .harness import Bench, BenchResult, Params, compile_smsd
from .hosts import bench_hosts
from .cost import bench_cost
from .journal import bench_journal
from .machine import machine_info
from .memory import bench_memory
from .overhead import bench_overhead
from .ratelimit import bench_ratelimit
from .recovery import bench_recovery
from .report import _cross_reference, print_summary, render_markdown, write_chart
from .scaling import bench_scaling
from .steady import bench_steady
from .commit_latency import bench_commit
from .commands import bench_mongoops
from .versus_bare import bench_bare

BENCHES = ("journal", "overhead", "recovery", "ratelimit", "scaling", "memory", "bare", "commit", "steady",
           "mongoops", "batch", "discovery", "hosts", "cost", "fence")
DEFAULT_OUT = "docs/BENCHMARKS.md"
DEFAULT_CHART = "docs/scaling.png"


RUNNERS: dict[str, Callable[[Bench], BenchResult]] = {
    "journal": bench_journal,
    "overhead": bench_overhead,
    "recovery": bench_recovery,
    "ratelimit": bench_ratelimit,
    "scaling": bench_scaling,
    "memory": bench_memory,
    "bare": bench_bare,
    "commit": bench_commit,
    "steady": bench_steady,
    "mongoops": bench_mongoops,
    "batch": bench_batch,
    "discovery": bench_discovery,
    "hosts": bench_hosts,
    "cost": bench_cost,
    "fence": bench_fence,
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
    if chart and "scaling" in selected:
        try:
            import matplotlib  # noqa: F401 - only checked here, used by write_chart
        except ImportError:
            print("smsd bench: matplotlib is not installed (pip install 'smsd[bench]'); no chart",
                  file=sys.stderr)
            chart = None

    # SIGTERM unwinds like Ctrl-C so that the finally below stops every process.
    def _term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, _term)
    started = datetime.now(timezone.utc)
    t_start = time.monotonic()
    compile_smsd()
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
                bench.say(traceback.format_exc().rstrip())
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
    _cross_reference(results)
    print_summary(results)
    scaling = next((r.extra.get("scaling") for r in results if r.name == "scaling"), None)
    if chart and scaling:
        write_chart(Path(chart), scaling, params)
        print(f"chart: {chart}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        link = os.path.relpath(Path(chart).resolve(), Path(out).resolve().parent) if chart and scaling else None
        Path(out).write_text(render_markdown(results, machine, params, argv, started, elapsed, link),
                             encoding="utf-8")
        print(f"report: {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "params": asdict(params), "elapsed_s": elapsed,
            "results": [{"name": r.name, "error": r.error, "elapsed_s": r.elapsed_s,
                         "figures": [asdict(f) for f in r.figures], "notes": r.notes,
                         "extra": r.extra}
                        for r in results]}, indent=2, default=str), encoding="utf-8")
    return 1 if any(r.error for r in results) else 0
