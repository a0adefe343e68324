"""The demo's verdict: the invariant check on the stopped system and the closing summary.

:func:`check` runs :func:`smsd.lab.invariants.verify` on the demo's database
and journals (against the fixture labels, or the journaled answers of a real
LLM); :func:`print_summary` prints the table a new user reads.  Apart from
:mod:`smsd.lab.demo` because it only reads what the run left behind.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .demo_plan import DB_NAME, Out, Plan, Seeded, _show
from .demo_seed import OTHER

# --------------------------------------------------------------------------- checking

def journal_answers(state_dir: Path) -> dict[str, dict]:
    """Every journaled answer, ``{sms_key: {"kind", "transactions"}}`` (read-only)."""
    answers: dict[str, dict] = {}
    for path in sorted((state_dir / "journal").glob("*.sqlite")):
        conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=2.0)
        try:
            for key, kind, txs in conn.execute("SELECT sms_key, kind, transactions FROM results"):
                answers[key] = {"kind": kind, "transactions": json.loads(txs)}
        finally:
            conn.close()
    return answers


def journal_totals(state_dir: Path) -> dict[str, Any]:
    """Call counters summed over every user's journal (see :meth:`smsd.journal.Journal.stats`)."""
    from ..journal import scan
    totals: dict[str, int] = {}
    from ..ledger import totals as bill_totals
    journals = scan(state_dir)
    for stats in journals.values():
        for key in ("calls", "repeated_calls", "repeated_sms", "sent_calls", "failed_calls"):
            totals[key] = totals.get(key, 0) + int(stats.get(key) or 0)
    totals["bill"] = bill_totals(journals)[0]   # cost_usd, repeated_usd, saved_usd: Decimal strings
    return totals


@dataclass
class Outcome:
    """The figures the summary prints."""

    report: Any
    transactions: int
    quarantined_malformed: int
    checks: list[str]
    samples: list[dict]   # a few stored transactions, for the closing table

    @property
    def ok(self) -> bool:
        return self.report.ok and not self.checks


def check(plan: Plan, mongo_port: int, seeded: Seeded, billed: dict[str, int] | None) -> Outcome:
    """Run :func:`smsd.lab.invariants.verify` on the stopped system (its own short-lived server).

    With the local server the transactions are compared with the fixture
    labels; with a real LLM with what it answered (the journal), since its
    answers may differ from the labels.
    """
    import pymongo

    from ..embedded import EmbeddedMongo
    from .invariants import verify
    from ..model import sms_key

    expected = seeded.expected
    if plan.real_llm:
        answers = journal_answers(plan.state_dir)
        expected = {raw_id: answers.get(sms_key(raw_id), dict(OTHER)) for raw_id in seeded.expected}
    server = EmbeddedMongo(plan.mongo_path, port=mongo_port,
                           log_path=plan.mongo_path.parent / "embedded-mongo.log")
    try:
        client = pymongo.MongoClient(server.start(), directConnection=True, serverSelectionTimeoutMS=5000)
        try:
            db = client[DB_NAME]
            report = verify(db, expected, state_dir=plan.state_dir, billed=billed)
            transactions = db["financial_transactions"].count_documents({"user_id": {"$in": seeded.users}})
            quarantined_malformed = db["sms_fin_rawdata"].count_documents(
                {"_id": {"$in": seeded.malformed}, "smsd_quarantine": {"$exists": True}})
            samples = sample_transactions(db, seeded.users)
        finally:
            client.close()
    finally:
        server.stop()
    checks = []
    if quarantined_malformed != len(seeded.malformed):
        checks.append(f"{len(seeded.malformed) - quarantined_malformed} malformed SMS not quarantined")
    if not plan.real_llm and report.sms_quarantined != len(seeded.malformed):
        checks.append(f"{report.sms_quarantined - quarantined_malformed} well-formed SMS quarantined")
    return Outcome(report, transactions, quarantined_malformed, checks, samples)


SAMPLE_FIELDS = ("amount", "currency", "direction", "channel", "counterparty", "account_mask")


def sample_transactions(db: Any, users: list[str], n: int = 6) -> list[dict]:
    """A few stored transactions, the most complete first (only these fields: never SMS text)."""
    docs = list(db["financial_transactions"].find({"user_id": {"$in": users}},
                                                  {f: 1 for f in SAMPLE_FIELDS}).sort("_id", 1).limit(300))
    docs.sort(key=lambda d: -sum(d.get(f) is not None for f in SAMPLE_FIELDS))
    return [{f: d.get(f) for f in SAMPLE_FIELDS} for d in docs[:n]]


def print_transactions(out: Out, samples: list[dict]) -> None:
    """The closing table of a few stored transactions (amount is the stored Decimal128, exactly)."""
    if not samples:
        return
    rows = [(f"{s['amount']} {s.get('currency') or ''}".strip(), s.get("direction") or "-",
             s.get("channel") or "-", s.get("counterparty") or "-", s.get("account_mask") or "-")
            for s in samples]
    head = ("AMOUNT", "DIRECTION", "CHANNEL", "COUNTERPARTY", "ACCOUNT")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    out("a few of the stored transactions (financial_transactions):")
    for row in [head] + rows:
        print("    " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip(), flush=True)


def metrics_glance(url: str) -> str:
    """Two figures from ``/metrics``, to show it answers (or why it does not)."""
    import urllib.request
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
    except OSError as exc:
        return f"not answering: {exc}"
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("smsd_sms_processed_total", 'smsd_llm_calls_total{outcome="answered"}'):
            found[name] = value.split(".")[0]
    return ", ".join(f"{k} {v}" for k, v in found.items()) or "no smsd figures"


def _bill_text(plan: Plan, bill: dict) -> str:
    text = (f"USD {bill.get('cost_usd', '0')} (repeated by the kill USD {bill.get('repeated_usd', '0')}, "
            f"{bill.get('cached_tokens', 0)} cached tokens)")
    return text + ("" if plan.real_llm else " at gpt-4o-mini's list prices")


def print_summary(plan: Plan, out: Out, seeded: Seeded, outcome: Outcome, totals: dict[str, Any],
                  server_calls: int | None, stop_code: int | None) -> None:
    """The closing table: what was done, what the crash cost, and the invariants."""
    r = outcome.report
    calls = totals.get("calls", 0)
    repeated = totals.get("repeated_calls", 0)
    in_flight = totals.get("sent_calls", 0)
    reasons = []
    if in_flight:
        sms = "" if totals.get("failed_calls") else f" ({totals.get('repeated_sms', 0)} SMS)"
        reasons.append(f"{in_flight} calls were in flight at the kill and were asked again{sms}")
    if totals.get("failed_calls"):
        reasons.append(f"{totals['failed_calls']} calls failed and their SMS were asked again")
    if repeated or reasons:
        repeat_text = f"{repeated} ({'; '.join(reasons) or 'see the journal'})"
    else:
        repeat_text = "0 (no call was in flight at the kill)"
    rows = [
        ("users", str(len(seeded.users))),
        ("SMS", f"{seeded.total} ({seeded.fixtures} bank, {seeded.synthetic} OTP/promotion, "
                f"{len(seeded.malformed)} malformed)"),
        ("SMS processed", str(r.sms_processed)),
        ("transactions stored", str(outcome.transactions)),
        ("SMS quarantined", f"{r.sms_quarantined} (malformed: {outcome.quarantined_malformed} "
                            f"of {len(seeded.malformed)})"),
        ("LLM calls", str(calls) + (f" (the local server counted {server_calls})"
                                    if server_calls is not None else "")),
        ("repeated calls", repeat_text),
        ("LLM bill", _bill_text(plan, totals.get("bill") or {})),
        ("drain exit code", str(stop_code)),
    ]
    if plan.real_llm:
        rows.append(("checked against", "the LLM's journaled answers (real LLM: no fixture labels)"))
    else:
        rows.append(("checked against", f"the fixture labels ({r.tx_expected} transactions expected)"))
    invariants = (f"{r.sms_lost} lost, {r.tx_duplicated} duplicated, {r.tx_missing} missing, "
                  f"{r.tx_wrong} wrong, {r.asked_after_answer} asked again after an answer, "
                  f"{r.unflushed_left} unflushed")
    rows.append(("invariants", invariants + (": OK" if outcome.ok else ": FAILED")))
    out("summary")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"    {key:<{width}}  {value}", flush=True)
    for problem in r.violations + outcome.checks:
        print(f"    FAILED: {problem}", flush=True)
    out(f"demo {'passed' if outcome.ok and stop_code == 0 else 'FAILED'} in {out.elapsed():.0f} s "
        f"(files in {_show(plan.workdir)})")
