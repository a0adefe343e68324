"""The drill's verdict: the invariant checks on a stopped drill and the report.

:func:`verify_state` runs :func:`smsd.lab.invariants.verify` plus the drill's
own checks (provenance of every transaction, calls cut in flight within the
bound of :func:`_cut_calls_unexplained`); :func:`verify_dir` re-checks a
directory kept by ``--keep``; :class:`ReportMixin` (mixed into
:class:`smsd.lab.drill.Drill`) assembles the report dict and
:func:`format_report` prints it.  Apart from the run loop because checking and
reporting read the results and never drive a process.
"""
from __future__ import annotations

import bisect
import os
import statistics
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .drill_common import (BATCH_SIZE, CONCURRENCY, DB_NAME, KINDS, ORPHAN_GRACE_S, STATE_FILE,
                           SUPERVISOR_KINDS, DrillError)


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


class ReportMixin:
    """The report of :class:`smsd.lab.drill.Drill` (see the module docstring)."""

    def report(self, checks: dict, stats: dict, drain: dict, work_s: float, total_s: float) -> dict:
        """Assemble the report from the checks, the LLM server's stats and the kills."""
        o = self.o
        r = checks["invariants"]
        billed = stats["billed"]
        by_kind = Counter(e.kind for e in self.events)
        rec_by_kind: dict[str, dict] = {}
        for kind in KINDS:
            vals = [e.recovery_s for e in self.events if e.kind == kind and e.recovery_s is not None]
            if by_kind.get(kind):
                rec_by_kind[kind] = {"n": len(vals), "median_s": _median(vals),
                                     "max_s": round(max(vals), 2) if vals else None}
        orphan_workers = [x for x in self.orphans if x["kind"] == "worker"]
        violations = list(checks["violations"]) + self.violations
        if self.orphans:
            violations.append(f"orphans alive {ORPHAN_GRACE_S:.0f} s after a supervisor kill: "
                              f"{len(orphan_workers)} workers, "
                              f"{len(self.orphans) - len(orphan_workers)} other children")
        return {
            "ok": not violations,
            "violations": violations,
            "seed": o.seed,
            "options": {"users": o.users, "sms_per_user": o.sms, "kills": o.kills,
                        "kill_kinds": list(o.kinds), "faults": o.faults, "duration_s": o.duration,
                        "max_workers": o.max_workers, "requests_per_minute": self.rpm,
                        "batch_size": BATCH_SIZE, "llm_concurrency": CONCURRENCY},
            "dir": str(self.dir),
            "work_s": work_s,
            "total_s": round(total_s, 1),
            "sms": {"seeded": r["sms_seeded"], "processed": r["sms_processed"],
                    "quarantined": r["sms_quarantined"], "lost": r["sms_lost"]},
            "transactions": {"expected": r["tx_expected"], "found": r["tx_found"],
                             "missing": r["tx_missing"], "duplicated": r["tx_duplicated"],
                             "wrong": r["tx_wrong"], "stray": checks["tx_stray"],
                             "not_from_journal": checks["tx_not_from_journal"],
                             "money_not_decimal128": r["money_not_decimal128"]},
            "llm": {"http_calls": stats["calls"], "faults": stats["faults"],
                    "sms_billed": sum(billed.values()),
                    "journal_calls": checks["journal_calls"],
                    "calls_cut_in_flight": checks["calls_cut"],
                    "calls_cut_unexplained": checks["calls_cut_unexplained"],
                    "sms_asked_more_than_once": r["sms_asked_more_than_once"],
                    "sms_paid_more_than_once": sum(1 for v in billed.values() if v > 1),
                    "repeats_explained": r["repeats_explained"],
                    "repeats_by_kill_in_flight": r["repeats_in_flight"],
                    "repeats_by_failed_call": r["repeats_failed"],
                    "repeats_by_fault_answer": r["repeats_without_answer"],
                    "repeats_unexplained": r["repeats_unexplained"],
                    "asked_after_answer": r["asked_after_answer"]},
            "kills": {"planned": o.kills, "done": len(self.events),
                      "by_kind": {k: by_kind.get(k, 0) for k in KINDS},
                      "skipped": len(self.skipped),
                      "skipped_why": dict(Counter(x["why"] for x in self.skipped)),
                      "events": [asdict(e) for e in self.events]},
            "orphans": {"supervisor_kills_checked": sum(1 for e in self.events
                                                        if e.kind in SUPERVISOR_KINDS),
                        "workers": len(orphan_workers),
                        "other_children": len(self.orphans) - len(orphan_workers),
                        "details": self.orphans},
            "recovery_s": {"by_kind": rec_by_kind},
            "drain": drain,
            "invariants": r,
            "logs": {"daemon": "smsd.log", "runs": f"smsd-run-1..{len(self.log_files)}.log",
                     "database": "mongo.log"},
        }


# ----------------------------------------------------------------------------- verification

def _cut_calls_unexplained(calls: list[dict], events: list[dict], concurrency: int) -> int:
    """Calls left 'sent' that no kill explains (DESIGN.md invariant 5's bound).

    A call still 'sent' after the drain was cut by a kill of its worker; each
    killed worker can leave at most ``concurrency`` of them.  A worker kill
    explains calls of its user sent before it; a supervisor kill (its workers
    die with it) explains calls of any user sent before it (plus 1 s for the
    death signal).  Matching is greedy, most constrained call first.
    """
    sent = defaultdict(list)
    for c in calls:
        if c["state"] == "sent":
            sent[c["user_id"]].append(float(c["sent_at"]))
    unexplained = 0
    for user, times in sent.items():
        slots = sorted(
            (e["wall"] + (0.2 if e["kind"] == "worker" else 1.0))
            for e in events
            if e["kind"] in SUPERVISOR_KINDS or (e["kind"] == "worker" and e["user_id"] == user))
        cap = [concurrency] * len(slots)
        for t in sorted(times, reverse=True):
            j = bisect.bisect_left(slots, t)
            while j < len(slots) and cap[j] == 0:
                j += 1
            if j < len(slots):
                cap[j] -= 1
            else:
                unexplained += 1
    return unexplained


def verify_state(directory: Path, uri: str, expected: dict[Any, dict], billed: dict[str, int],
                 events: list[dict] | None, concurrency: int) -> dict:
    """Run every check on a stopped drill: :func:`smsd.lab.invariants.verify` plus the drill's own.

    Returns ``{"invariants": Report dict, "violations": [...], "tx_stray",
    "tx_not_from_journal", "processed_without_journal", "journal_calls",
    "calls_cut", "calls_cut_unexplained"}``.
    """
    from pymongo import MongoClient

    from .invariants import journal_answers, journal_calls, verify
    from ..model import sms_key

    state_dir = Path(directory) / "state"
    client = MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=10000)
    try:
        db = client[DB_NAME]
        report = verify(db, expected, state_dir=state_dir, billed=billed)
        violations = list(report.violations)
        answers = journal_answers(state_dir)
        # Invariant 1, from the outside: what MongoDB holds came from a journaled answer.
        not_from_journal = 0
        keys = {sms_key(k) for k in expected}
        for tx in db["financial_transactions"].find({}, {"sms_key": 1, "source.call_id": 1}):
            if tx.get("sms_key") in keys and \
                    (tx.get("source") or {}).get("call_id") != answers.get(tx.get("sms_key")):
                not_from_journal += 1
        processed_without_journal = sum(
            1 for d in db["sms_fin_rawdata"].find({"isprocessed": True}, {"_id": 1})
            if sms_key(d["_id"]) not in answers)
        tx_total = db["financial_transactions"].count_documents({})
        stray = max(0, tx_total - report.tx_found)
    finally:
        client.close()
    calls = journal_calls(state_dir)
    cut = sum(1 for c in calls if c["state"] == "sent")
    cut_unexplained = _cut_calls_unexplained(calls, events, concurrency) if events is not None else 0
    if not_from_journal:
        violations.append(f"transactions whose source call is not the journaled answer: {not_from_journal}")
    if processed_without_journal:
        violations.append(f"SMS processed with no result in the journal: {processed_without_journal}")
    if stray:
        violations.append(f"transactions for SMS that were never seeded: {stray}")
    if cut_unexplained:
        violations.append(f"LLM calls cut in flight that no kill explains (more than "
                          f"llm_concurrency={concurrency} per killed worker): {cut_unexplained}")
    return {"invariants": report.to_dict(), "violations": violations, "tx_stray": stray,
            "tx_not_from_journal": not_from_journal,
            "processed_without_journal": processed_without_journal,
            "journal_calls": len(calls), "calls_cut": cut, "calls_cut_unexplained": cut_unexplained}


def verify_dir(directory: str | os.PathLike) -> dict:
    """Re-check a drill directory kept with ``--keep`` (its own short-lived database server).

    Returns the checks of :func:`verify_state` plus ``ok``; raises
    :class:`DrillError` if the directory is not a drill's.
    """
    from bson import json_util

    from ..embedded import EmbeddedMongo

    directory = Path(directory).resolve()
    path = directory / STATE_FILE
    if not path.is_file():
        raise DrillError(f"{directory} holds no {STATE_FILE}: not a kept drill directory")
    state = json_util.loads(path.read_text())
    expected = {row["_id"]: row["answer"] for row in state["expected"]}
    mongo = EmbeddedMongo(directory / state.get("mongo_path", "mongo"),
                          log_path=directory / "mongo-verify.log")
    mongo.start()
    try:
        checks = verify_state(directory, mongo.uri, expected, state.get("billed") or {},
                              state.get("events"), int(state.get("concurrency") or CONCURRENCY))
    finally:
        mongo.stop()
    checks["ok"] = not checks["violations"]
    checks["dir"] = str(directory)
    return checks


# ----------------------------------------------------------------------------- output

def format_report(rep: dict) -> str:
    """The human-readable report."""
    s, t, llm, k, o = rep["sms"], rep["transactions"], rep["llm"], rep["kills"], rep["orphans"]
    rec = rep["recovery_s"]["by_kind"]
    lines = [
        f"smsd drill (seed {rep['seed']}): {'OK' if rep['ok'] else 'VIOLATIONS'}",
        f"  work          {rep['work_s']} s to finish, {rep['total_s']} s in all; "
        f"{rep['options']['users']} users x {rep['options']['sms_per_user']} SMS, "
        f"max_workers {rep['options']['max_workers']}, rpm cap {rep['options']['requests_per_minute']:g}",
        f"  SMS           {s['seeded']} seeded, {s['processed']} processed, "
        f"{s['quarantined']} quarantined, {s['lost']} lost",
        f"  transactions  {t['expected']} expected, {t['found']} found, {t['missing']} missing, "
        f"{t['duplicated']} duplicated, {t['wrong']} wrong, {t['stray']} stray, "
        f"{t['not_from_journal']} not from the journal",
        f"  LLM           {llm['http_calls']} HTTP calls (faults {llm['faults'] or 'none'}), "
        f"{llm['journal_calls']} journal calls, {llm['sms_billed']} SMS billed",
        f"  repeats       {llm['sms_asked_more_than_once']} SMS asked more than once "
        f"({llm['sms_paid_more_than_once']} paid more than once): "
        f"{llm['repeats_explained']} repeats explained ({llm['repeats_by_kill_in_flight']} in flight "
        f"at a kill, {llm['repeats_by_failed_call']} failed call, {llm['repeats_by_fault_answer']} "
        f"faulty answer), {llm['repeats_unexplained']} unexplained",
        f"  cut calls     {llm['calls_cut_in_flight']} calls cut in flight by kills, "
        f"{llm['calls_cut_unexplained']} beyond the bound",
        f"  kills         {k['done']}/{k['planned']}: "
        + ", ".join(f"{kind} {n}" for kind, n in k["by_kind"].items())
        + (f"; {k['skipped']} skipped ({', '.join(k['skipped_why'])})" if k["skipped"] else ""),
        f"  orphans       {o['workers']} workers, {o['other_children']} other children alive "
        f"{ORPHAN_GRACE_S:.0f} s after {o['supervisor_kills_checked']} supervisor kills",
        "  recovery      " + (", ".join(
            f"{kind} median {v['median_s']} s / max {v['max_s']} s (n={v['n']})"
            for kind, v in rec.items()) or "no kills"),
        f"  drain         exit {rep['drain']['exit_code']} after {rep['drain']['seconds']} s",
    ]
    for ev in k["events"]:
        lines.append(f"    kill {ev['n']:>3} {ev['kind']:<18} at {ev['at_s']:7.1f} s  "
                     + (f"user {ev['user_id']} " if ev["user_id"] else "")
                     + (f"db down {ev['db_down_s']} s " if ev["db_down_s"] is not None else "")
                     + (f"-> flush again after {ev['recovery_s']} s" if ev["recovery_s"] is not None
                        else f"-> {ev['recovery_note']}"))
    for v in rep["violations"]:
        lines.append(f"  VIOLATION: {v}")
    lines.append(f"  directory     {rep['dir']}" + (" (kept)" if rep.get("kept") else " (removed)"))
    return "\n".join(lines)
