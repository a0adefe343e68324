"""``smsd demo``: the whole job on one machine, with a crash in the middle.

What a new user sees after ``make demo`` (no MongoDB, no API key needed):

1. a fresh work directory (``./var/demo``) with a ``config.toml`` in which
   ``mongo.uri = "embedded"``: ``smsd run`` starts and supervises its own
   MongoDB-wire server (``secantusd-py``, the ``embedded`` extra);
2. a local OpenAI-compatible server (:mod:`smsd.lab.llmserver`) answering with the
   offline rules extractor (:mod:`smsd.rules`), with a little latency so
   that calls are in flight at any moment — or, when ``OPENAI_API_KEY`` is
   set, the real LLM (``SMSD_LLM_BASE_URL``, ``SMSD_LLM_MODEL`` optional);
3. SMS seeded for a few users: labelled real bank SMS
   (``smsd/data/sms_fixtures.jsonl``), synthetic OTP and promotion texts, and
   malformed documents (no text) that must end up quarantined;
4. ``smsd run``, SIGKILLed about halfway (its workers and the embedded server
   die with it), started again, run to the end, ``smsctl status``, SIGTERM
   (drain);
5. a summary and the invariant check of :func:`smsd.lab.invariants.verify`:
   nothing lost, nothing duplicated.

Exit 0 when every invariant holds, 1 when one does not, 3 when the demo could
not run (e.g. the embedded extra is missing).  Every process the demo starts
is stopped, also on Ctrl-C.  SMS text and the API key are never printed.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from .demo_plan import DemoFailed, Out, Plan, _show
from .demo_processes import (Progress, SmsdRun, _descendants, _is_embedded, _wait_gone,
                             smsctl_status, wait_settled, watch)
from .demo_report import check, journal_totals, metrics_glance, print_summary, print_transactions
from .demo_seed import build_documents, prepare_workdir, seed_database, write_config

EXIT_OK = 0
EXIT_INVARIANT = 1
EXIT_USAGE = 2
EXIT_CANNOT_RUN = 3
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------- the demo

def run_demo(plan: Plan, out: Out, cleanups: list[Callable[[], None]]) -> int:
    """Every step of the demo; ``cleanups`` collects what must be stopped whatever happens."""
    from ..embedded import EmbeddedUnavailable, find_executable, free_port

    try:
        find_executable()
    except EmbeddedUnavailable as exc:
        print(f"smsd demo: the embedded MongoDB-wire server is missing: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN

    deadline = time.monotonic() + plan.timeout
    prepare_workdir(plan.workdir)
    mongo_port = free_port()
    plan.metrics_port = free_port()

    llm_server = None
    if plan.real_llm:
        out(f"LLM: {plan.base_url}, model {plan.model} (API key from OPENAI_API_KEY)")
    else:
        from .llmserver import LlmServer, rules_extractor
        llm_server = LlmServer(rules_extractor(), "127.0.0.1", 0, latency_ms=plan.latency_ms,
                               latency_jitter_ms=plan.latency_ms / 2, seed=1).start()
        cleanups.append(llm_server.stop)
        plan.base_url = llm_server.url
        out(f"local OpenAI-compatible LLM server on {plan.base_url} "
            f"(offline rules extractor, {plan.latency_ms:.0f} ms latency; no API key needed)")
    write_config(plan, mongo_port)
    out(f"work dir {_show(plan.workdir)}: config.toml with mongo.uri = \"embedded\" "
        f"(port {mongo_port}), smsd's log in {_show(plan.log)}")

    docs, seeded = build_documents(plan)
    seed_database(plan, mongo_port, docs)
    out(f"seeded {seeded.total} SMS for {len(seeded.users)} users: {seeded.fixtures} real bank SMS "
        f"(labelled fixtures), {seeded.synthetic} OTP/promotion texts, "
        f"{len(seeded.malformed)} malformed (no text)")

    # ---- run 1, killed halfway
    run = SmsdRun(plan, 1)
    cleanups.append(lambda r=run: r.terminate(15))
    out(f"starting smsd run (pid {run.pid}); it starts its own embedded MongoDB")
    run.wait_ready(min(60.0, deadline - time.monotonic()))
    progress = Progress(f"mongodb://127.0.0.1:{mongo_port}/", seeded.users)
    cleanups.append(progress.close)
    half = max(1, int(seeded.total * plan.kill_at))
    watch(run, progress, seeded.total, out, until=lambda d: d >= half, deadline=deadline, every=0.5)

    victims = _descendants(run.pid)
    workers = [p.pid for p in victims if not _is_embedded(p)]
    embedded = [p.pid for p in victims if _is_embedded(p)]
    status = run.status(timeout=1.0) or {}
    worker_pids = {w["pid"] for w in status.get("workers") or []} or set(workers)
    run.kill9()
    out(f"kill -9 {run.pid} (the supervisor, mid-run): {len(worker_pids)} workers were busy")
    left = _wait_gone(workers + embedded, timeout=15.0)
    if left:
        raise DemoFailed(f"processes of the killed supervisor still run: {left}")
    out(f"its workers {sorted(worker_pids)} and the embedded MongoDB {embedded} are gone too "
        "(they die with their parent: PR_SET_PDEATHSIG)")

    # ---- run 2, to the end
    run = SmsdRun(plan, 2)
    cleanups.append(lambda r=run: r.terminate(15))
    out(f"starting smsd run again (pid {run.pid}): it replays the journals and carries on")
    run.wait_ready(min(60.0, max(1.0, deadline - time.monotonic())))
    watch(run, progress, seeded.total, out, until=lambda d: d >= seeded.total, deadline=deadline)
    wait_settled(run, seeded.users, deadline)
    out("every SMS is processed or quarantined; `smsctl status`:")
    out.block(smsctl_status(plan))
    out(f"Prometheus metrics while smsd runs: {plan.metrics_url} "
        f"({metrics_glance(plan.metrics_url)}; supervisor.metrics_listen / SMSD_METRICS_LISTEN)")
    progress.close()

    out("stopping smsd (SIGTERM: drain) ...")
    code = run.terminate(timeout=30)
    out(f"smsd run {run.pid} exited with code {code}")

    billed = llm_server.stats()["billed"] if llm_server else None
    server_calls = llm_server.stats()["calls"] if llm_server else None
    if llm_server:
        llm_server.stop()
        cleanups.remove(llm_server.stop)
    out("checking the invariants on the stopped system (journals + database) ...")
    outcome = check(plan, mongo_port, seeded, billed)
    totals = journal_totals(plan.state_dir)
    print_summary(plan, out, seeded, outcome, totals, server_calls, code)
    print_transactions(out, outcome.samples)
    out(f"metrics: {plan.metrics_url} whenever smsd runs with {_show(plan.config)} "
        "(supervisor.metrics_listen); Grafana dashboard docs/grafana/smsd.json, "
        "alerts docs/prometheus/smsd-rules.yml")
    return EXIT_OK if outcome.ok and code == 0 else EXIT_INVARIANT


# --------------------------------------------------------------------------- entry point

def build_parser() -> argparse.ArgumentParser:
    """The ``smsd demo`` argument parser."""
    p = argparse.ArgumentParser(prog="smsd demo", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="var/demo",
                   help="work directory, wiped at the start (default ./var/demo)")
    p.add_argument("--users", type=int, help="users to seed (default 5; 2 with a real LLM)")
    p.add_argument("--sms-per-user", type=int, help="SMS per user (default 60; 10 with a real LLM)")
    p.add_argument("--malformed", type=int, default=2, help="malformed SMS documents (default 2)")
    p.add_argument("--latency-ms", type=float, default=150.0,
                   help="local LLM server latency per call (default 150)")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="share of SMS done when the supervisor is killed (default 0.5)")
    p.add_argument("--timeout", type=float, default=110.0, help="give up after this many seconds")
    return p


def _plan(args: argparse.Namespace) -> Plan:
    real = bool(os.environ.get("OPENAI_API_KEY"))
    plan = Plan(workdir=Path(args.workdir).absolute(),
                users=args.users or (2 if real else 5),
                sms_per_user=args.sms_per_user or (10 if real else 60),
                malformed=max(0, args.malformed), latency_ms=max(0.0, args.latency_ms),
                kill_at=min(max(args.kill_at, 0.05), 1.0), timeout=args.timeout, real_llm=real)
    if real:
        from ..config import LlmSettings
        plan.base_url = os.environ.get("SMSD_LLM_BASE_URL") or LlmSettings().base_url
        plan.model = os.environ.get("SMSD_LLM_MODEL") or LlmSettings().model
        plan.batch_size, plan.concurrency = 2, 1
    else:
        plan.model = "smsd-local"
    return plan


def main(argv: list[str] | None = None) -> int:
    """``smsd demo [--workdir DIR] ...``: returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.users is not None and args.users < 1 or args.sms_per_user is not None and args.sms_per_user < 2:
        print("smsd demo: --users must be >= 1 and --sms-per-user >= 2", file=sys.stderr)
        return EXIT_USAGE
    plan = _plan(args)
    out = Out()
    cleanups: list[Callable[[], None]] = []

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        return run_demo(plan, out, cleanups)
    except KeyboardInterrupt:
        print("\nsmsd demo: interrupted; stopping everything it started", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except DemoFailed as exc:
        print(f"smsd demo: {exc}", file=sys.stderr, flush=True)
        return EXIT_INVARIANT
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not skip the clean-up
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for stop in reversed(cleanups):
                try:
                    stop()
                except Exception as exc:  # noqa: BLE001 - keep stopping the rest
                    print(f"smsd demo: clean-up step failed: {type(exc).__name__}: {exc}",
                          file=sys.stderr, flush=True)
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
