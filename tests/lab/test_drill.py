"""``smsd drill``: the kill -9 drill keeps every invariant, for each kind of kill,
and its checker really catches a broken result (it cannot pass vacuously).

Each drill runs as a subprocess (``python -m smsd.cli drill ... --json``): its
own embedded MongoDB-wire server, its own LLM server with faults, its own
``smsd run`` processes, all stopped when it ends.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pymongo import MongoClient

from smsd.lab.drill_common import DB_NAME
from smsd.lab.drill_report import _cut_calls_unexplained
from smsd.embedded import EmbeddedMongo

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def run_drill(*args: str, timeout: float = 180) -> tuple[dict | None, subprocess.CompletedProcess, float]:
    """Run ``smsd drill ARGS`` and return (its JSON report, the process, seconds taken)."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "smsd.cli", "drill", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    took = time.monotonic() - t0
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        report = None
    return report, proc, took


def assert_every_invariant_kept(report: dict | None, proc: subprocess.CompletedProcess) -> None:
    where = proc.stderr[-3000:]
    assert report is not None, f"no JSON report (exit {proc.returncode}): {where}"
    assert proc.returncode == 0 and report["ok"], (report.get("violations"), where)
    assert report["violations"] == []
    sms, tx, llm = report["sms"], report["transactions"], report["llm"]
    assert sms["lost"] == 0 and sms["processed"] + sms["quarantined"] == sms["seeded"] > 0
    assert tx["duplicated"] == tx["wrong"] == tx["missing"] == tx["stray"] == 0
    assert tx["not_from_journal"] == 0
    assert llm["repeats_unexplained"] == 0 and llm["asked_after_answer"] == 0
    assert llm["calls_cut_unexplained"] == 0
    assert report["orphans"]["workers"] == 0 and report["orphans"]["other_children"] == 0
    assert report["drain"]["exit_code"] == 0 and report["drain"]["processes_left"] == []
    assert report["invariants"]["checkpoints_incomplete"] == 0


def test_short_drill_with_every_kind_of_kill_keeps_every_invariant():
    report, proc, took = run_drill("--users", "3", "--sms", "40", "--kills", "6", "--seed", "1",
                                   "--json", timeout=150)
    assert_every_invariant_kept(report, proc)
    assert report["sms"]["seeded"] == 120
    # The kills land while there is work (a kill is skipped only if the work finished first).
    kills = report["kills"]
    assert kills["done"] >= 4 and kills["done"] + kills["skipped"] == 6, kills


@pytest.mark.parametrize("kind", ["worker", "supervisor", "database", "supervisor-db-down"])
def test_each_kind_of_kill_alone_keeps_every_invariant(kind):
    report, proc, took = run_drill("--users", "2", "--sms", "30", "--kills", "2", "--kill-kinds", kind,
                                   "--duration", "15", "--seed", "3", "--json", timeout=90)
    assert_every_invariant_kept(report, proc)
    assert report["kills"]["by_kind"][kind] >= 1, report["kills"]
    assert sum(report["kills"]["by_kind"].values()) == report["kills"]["by_kind"][kind]
    if kind in ("supervisor", "supervisor-db-down"):
        assert report["orphans"]["supervisor_kills_checked"] >= 1


def test_verification_catches_a_tampered_database(tmp_path):
    report, proc, _ = run_drill("--users", "2", "--sms", "20", "--kills", "1", "--kill-kinds", "worker",
                                "--duration", "10", "--seed", "4", "--json", "--keep", timeout=90)
    assert_every_invariant_kept(report, proc)
    kept = Path(report["dir"])
    try:
        # The untouched directory verifies clean ...
        clean = subprocess.run([sys.executable, "-m", "smsd.cli", "drill", "--verify-only", str(kept),
                                "--json"], capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert json.loads(clean.stdout)["ok"] is True
        # ... then one transaction disappears and one processed SMS goes back to pending.
        mongo = EmbeddedMongo(kept / "mongo", log_path=tmp_path / "tamper.log")
        mongo.start()
        try:
            db = MongoClient(mongo.uri, directConnection=True)[DB_NAME]
            tx = db.financial_transactions.find_one({})
            assert db.financial_transactions.delete_one({"_id": tx["_id"]}).deleted_count == 1
            victim = db.sms_fin_rawdata.find_one({"isprocessed": True, "_id": {"$ne": tx["sms_id"]}})
            db.sms_fin_rawdata.update_one({"_id": victim["_id"]}, {"$set": {"isprocessed": False}})
            db.client.close()
        finally:
            mongo.stop()
        broken = subprocess.run([sys.executable, "-m", "smsd.cli", "drill", "--verify-only", str(kept),
                                 "--json"], capture_output=True, text=True, timeout=60, cwd=str(REPO))
        assert broken.returncode == 1, broken.stdout + broken.stderr
        checks = json.loads(broken.stdout)
        assert checks["ok"] is False
        assert "transactions missing: 1" in checks["violations"]
        assert "SMS neither processed nor quarantined: 1" in checks["violations"]
        assert checks["invariants"]["sms_lost"] == 1 and checks["invariants"]["tx_missing"] == 1
    finally:
        shutil.rmtree(kept, ignore_errors=True)


def test_calls_cut_in_flight_are_bounded_by_the_kills():
    """Invariant 5's bound: a killed worker leaves at most llm_concurrency calls 'sent'."""
    calls = [{"user_id": "u", "state": "sent", "sent_at": t} for t in (10.0, 11.0, 12.0)]
    calls.append({"user_id": "u", "state": "answered", "sent_at": 13.0})
    worker_kill = {"kind": "worker", "user_id": "u", "wall": 12.5}
    other_user = {"kind": "worker", "user_id": "v", "wall": 12.5}
    supervisor_kill = {"kind": "supervisor", "user_id": None, "wall": 30.0}
    assert _cut_calls_unexplained(calls, [], 2) == 3
    assert _cut_calls_unexplained(calls, [worker_kill], 2) == 1
    assert _cut_calls_unexplained(calls, [other_user], 2) == 3
    assert _cut_calls_unexplained(calls, [worker_kill, supervisor_kill], 2) == 0
    late = calls + [{"user_id": "u", "state": "sent", "sent_at": 40.0}]
    assert _cut_calls_unexplained(late, [worker_kill, supervisor_kill], 2) == 1


def test_unknown_kill_kind_is_a_usage_error():
    _, proc, _ = run_drill("--kill-kinds", "worker,meteor", timeout=30)
    assert proc.returncode == 2 and "meteor" in proc.stderr
