"""What a bench run produces besides its JSON: the markdown report, the summary, the chart.

``BENCHMARKS.md`` (:func:`render_markdown`, with the explanations kept with the code
in :data:`STATIC_NOTES`), the figures on stdout (:func:`print_summary`), the notes
that compare two benchmarks of one run (:func:`_cross_reference`) and the scaling
PNG (:func:`write_chart`).
"""
from __future__ import annotations

import os
import statistics
from datetime import datetime
from pathlib import Path

from .harness import BenchResult, Params


def write_chart(path: Path, scaling: dict[int, list[float]], params: Params) -> Path:
    """A PNG line chart of SMS/s against workers (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    workers = sorted(scaling)
    meds = [statistics.median(scaling[w]) for w in workers]
    lows = [m - min(scaling[w]) for w, m in zip(workers, meds)]
    highs = [max(scaling[w]) - m for w, m in zip(workers, meds)]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.errorbar(workers, meds, yerr=[lows, highs], marker="o", capsize=4, label="smsd run (median, min–max)")
    ax.plot(workers, [meds[0] * w / workers[0] for w in workers], linestyle="--", color="grey",
            label="linear from 1 worker")
    cpus = os.cpu_count() or 0
    if cpus and workers[0] <= cpus <= workers[-1]:
        ax.axvline(cpus, color="tab:red", linestyle=":", label=f"{cpus} CPUs on this host")
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_xlabel("workers (one user each)")
    ax.set_ylabel("SMS/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"smsd scaling: {params.scaling_sms_each} SMS per user, "
                 f"{params.scaling_latency_ms:.0f} ms LLM")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path




STATIC_NOTES: dict[str, list[str]] = {
    "overhead": [
        "**Fixes (for `pipeline.py` / `journal.py`; not applied here, each changes behaviour "
        "someone may rely on).**  The instrumented run above prices each one:",
        "1. *Checkpoint once a second, not once per flush.*  `Pipeline.flush` calls "
        "`store.checkpoint_progress` after every answer.  Calling it only when a second has passed "
        "since the last call (and always in `_finish_run`, which writes the final counters) keeps "
        "every invariant: the counters move with `$max`, and `_start_run` already resumes from "
        "`max(checkpoint, count_processed_in_batch)`.  Visible change: after a kill, the "
        "checkpoint's `processed_sms` may lag by up to a second of work, so `smsd once --resume` "
        "should print `count_processed_in_batch` (tests/test_pipeline.py "
        "`test_resume_prints_progress_of_an_interrupted_run` asserts the exact figure).",
        "2. *`replace_stale` only where a stale document can exist.*  Every flush passes "
        "`replace_stale=True`, i.e. one more `find` on `financial_transactions` per answer.  Within "
        "one journal an SMS has exactly one result (`results.sms_key` is the primary key, first "
        "answer wins), so stale positions can only come from another journal's earlier flush (a "
        "previous lease owner, a lost state directory).  Doing the find only on the replay of rows "
        "journaled before this process started, and for calls whose `repeated_sms > 0`, removes it "
        "from the steady state.",
        "3. *`mark_flushed` without its own fsync.*  Each answer costs three `FULL` commits "
        "(`begin_call`, `record_answer`, `mark_flushed`).  Losing a `mark_flushed` to a power cut "
        "only makes the replay re-flush idempotently (DESIGN.md's window *after flush, before "
        "marking row*), so it can run under `PRAGMA synchronous = NORMAL` (WAL: the next `FULL` "
        "commit's fsync persists it too) or be folded into the next journal transaction.",
    ],
}
"""Explanations kept with the code (they survive a re-run), shown when the bench misses a
target: bench name -> markdown paragraphs."""


def render_markdown(results: list[BenchResult], machine: dict[str, str], params: Params,
                    argv: list[str], started: datetime, elapsed: float, chart: str | None) -> str:
    """The whole ``BENCHMARKS.md``."""
    out = ["# smsd benchmarks", ""]
    out.append(f"Measured {started.strftime('%Y-%m-%d %H:%M UTC')} in {elapsed / 60:.1f} min by "
               f"`smsd bench{(' ' + ' '.join(argv)) if argv else ''}`.  Reproduce with **`make bench`** "
               "(installs the `bench` extra, i.e. matplotlib, then runs `smsd bench`; "
               "`smsd bench --quick` is a smoke run, `--only NAME` runs one benchmark).")
    out.append("")
    out.append(f"Every figure is the median of {params.runs} runs made in the same process run; ratios "
               "are taken from runs made side by side (A/B/A/B).  The host is shared and noisy, so "
               "compare ratios rather than absolute rates across machines.  The bench starts its own "
               "MongoDB-wire server and LLM server on loopback and stops every process it starts.")
    out += ["", "## Machine", "", "| | |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in machine.items()]
    out += ["", "## Summary", "", "| benchmark | figure | value | target | result |", "|---|---|---|---|---|"]
    for res in results:
        if res.error:
            out.append(f"| {res.name} | **failed**: {res.error} | | | |")
        for f in res.figures:
            verdict = "" if f.met is None else ("met" if f.met else "**missed**")
            out.append(f"| {res.name} | {f.name} | {f.shown()} | {f.target} | {verdict} |")
    titles = {"journal": "Journal commit per answer", "overhead": "Pipeline overhead",
              "recovery": "Recovery after a SIGKILL", "ratelimit": "Rate-limit use",
              "scaling": "Scaling with workers", "memory": "Memory",
              "bare": "smsd ÷ bare loop (issue 12)", "commit": "Answer → journal commit (issue 12)",
              "steady": "Steady state: SMS keep arriving (issue 12)",
              "mongoops": "MongoDB operations per SMS (issue 12)",
              "discovery": "Discovery tick and status at 10,000 users (issue 12)",
              "hosts": "Several hosts",
              "cost": "LLM cost (issue 14)"}
    for res in results:
        out += ["", f"## {titles.get(res.name, res.name)}", ""]
        if res.error:
            out += [f"Failed: `{res.error}`", ""]
        out += res.details
        if res.name == "scaling" and chart:
            out += ["", f"![SMS/s against workers]({chart})"]
        missed = any(f.met is False for f in res.figures)
        notes = res.notes + (STATIC_NOTES.get(res.name, []) if missed else [])
        if notes:
            out.append("")
            for n in notes:
                out += [n, ""]
        out.append(f"\n_{res.elapsed_s:.0f} s of bench time._")
    return "\n".join(out).rstrip() + "\n"


def print_summary(results: list[BenchResult]) -> None:
    """The figures on stdout, one per line: ``bench | figure | value | target | met``."""
    print("benchmark  | figure | value | target | result")
    for res in results:
        if res.error:
            print(f"{res.name} | FAILED: {res.error}")
        for f in res.figures:
            verdict = "" if f.met is None else ("met" if f.met else "MISSED")
            print(f"{res.name} | {f.name} | {f.shown()} | {f.target} | {verdict}")
        for n in res.notes:
            print(f"{res.name} | note: {n}")



def _cross_reference(results: list[BenchResult]) -> None:
    """Notes that compare figures of two benchmarks of the same run."""
    by_name = {r.name: r for r in results}
    rec, ovh = by_name.get("recovery"), by_name.get("overhead")
    if rec and ovh and not rec.error and not ovh.error:
        replay = next((f.value for f in rec.figures if f.name == "replay flush throughput"), None)
        loop = next((f.value for f in ovh.figures if f.name.startswith("minimal MongoDB loop")), None)
        if replay and loop:
            rec.notes.append(
                f"The replay flushed {replay:.0f} SMS/s; in the same run the minimal MongoDB loop "
                f"(no LLM, no journal) reached {loop:.0f} SMS/s on the same server, i.e. "
                f"{10_000 / loop:.0f} s for 10,000 SMS at that rate.")
