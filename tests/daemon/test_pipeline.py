"""End-to-end behaviour of ``smsd once``: real MongoDB-wire server, real openai SDK over HTTP."""
from __future__ import annotations

import signal
import time
from decimal import Decimal

import pytest
from bson.decimal128 import Decimal128
from pymongo import MongoClient

from smsd import journal as journal_mod
from smsd.lab.invariants import verify
from smsd.journal import Journal

from ..harness import run_smsd, seed, start_smsd, write_config


def _config(tmp_path, mongo_uri, db_name, llm_server, **sections):
    return write_config(tmp_path, mongo_uri=mongo_uri, db=db_name, llm_url=llm_server.url, **sections)


def test_once_processes_every_sms_and_stores_money_as_decimal128(tmp_path, db, mongo_server,
                                                                  mongo_db_name, llm_server):
    expected = seed(db, "alice", 153)
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server)
    done = run_smsd(config, "once", "--user-id", "alice")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "completed, 153/153 processed" in done.stdout
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    assert report.tx_found == 144   # the fixtures' 144 transactions
    tx = db.financial_transactions.find_one({"amount": Decimal128("12345.00")})
    assert tx is not None and isinstance(tx["amount"], Decimal128)
    assert tx["amount"].to_decimal() == Decimal("12345.00")
    with_balance = db.financial_transactions.find_one({"balance": {"$exists": True}})
    assert isinstance(with_balance["balance"], Decimal128)
    assert tx["source"]["model"] and tx["source"]["call_id"]
    assert all(n == 1 for n in llm_server.stats()["billed"].values())


def test_limit_processes_only_n_and_resume_reports_the_checkpoint(tmp_path, db, mongo_server,
                                                                   mongo_db_name, llm_server):
    seed(db, "bob", 30)
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server)
    first = run_smsd(config, "once", "--user-id", "bob", "--limit", "12")
    assert first.returncode == 0, first.stderr[-2000:]
    assert db.sms_fin_rawdata.count_documents({"user_id": "bob", "isprocessed": True}) == 12
    cp = db.processing_checkpoints.find_one({"user_id": "bob"})
    assert cp["total_sms"] == 12 and cp["processed_sms"] == 12 and cp["status"] == "completed"
    assert set(cp) >= {"user_id", "batch_id", "total_sms", "processed_sms", "last_processed_id",
                       "checkpoint_timestamp", "status"}
    again = run_smsd(config, "once", "--user-id", "bob", "--resume")
    assert "is completed: starting a new run" in again.stdout
    assert again.returncode == 0
    assert db.sms_fin_rawdata.count_documents({"user_id": "bob", "isprocessed": True}) == 30


def test_resume_without_checkpoint_says_so(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "carol", 3)
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server)
    out = run_smsd(config, "once", "--user-id", "carol", "--resume")
    assert "No checkpoint for user carol: starting a new run." in out.stdout
    assert out.returncode == 0


def test_resume_prints_progress_of_an_interrupted_run(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "dave", 30)
    # "progress 10/30" after the 2nd flush needs a flush per answer of 5 SMS; gathered
    # flushes (the default) could have written all 30 in one.
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server, llm={"concurrency": 1},
                     pipeline={"flush_gather_sms": 1})
    crashed = run_smsd(config, "once", "--user-id", "dave", SMSD_FAILPOINT="after_mark_flushed@2")
    assert crashed.returncode == -signal.SIGKILL
    out = run_smsd(config, "once", "--user-id", "dave", "--resume")
    assert "Resuming user dave: batch" in out.stdout and "progress 10/30" in out.stdout
    assert "20 remaining" in out.stdout
    assert out.returncode == 0


@pytest.mark.parametrize("fault", ["429", "500", "malformed", "partial", "bad_item", "timeout"])
def test_llm_fault_loses_nothing_and_rebuys_only_what_failed(fault, tmp_path, db, mongo_server,
                                                             mongo_db_name, llm_server):
    expected = seed(db, "erin", 20)
    llm_server.script([fault, "ok", fault, "ok"])
    llm_server.set_faults(timeout_sleep_s=3)
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server,
                     llm={"timeout": 1.5, "concurrency": 1})
    out = run_smsd(config, "once", "--user-id", "erin")
    assert out.returncode == 0, out.stderr[-3000:]
    stats = llm_server.stats()
    report = verify(db, expected, state_dir=tmp_path / "state", billed=stats["billed"],
                    extra_repeats_allowed=10 if fault == "timeout" else 0)
    assert report.ok, report.to_dict()
    assert stats["faults"].get(fault if fault != "partial" else "partial", 0) >= 1
    repeats = sum(n - 1 for n in stats["billed"].values())
    if fault in ("429", "500"):
        assert repeats == 0      # never billed: the server refused before the model ran
    if fault in ("partial", "bad_item"):
        assert repeats <= 10     # only the ids missing or invalid in the two faulty answers


def test_unparseable_sms_is_quarantined_after_the_cap_not_marked_processed(tmp_path, db, mongo_server,
                                                                           mongo_db_name, llm_server):
    seed(db, "fay", 6)
    llm_server.script(["malformed"] * 30)
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server,
                     llm={"concurrency": 1, "batch_size": 3}, pipeline={"max_attempts": 2})
    out = run_smsd(config, "once", "--user-id", "fay")
    assert out.returncode == 0, out.stderr[-2000:]
    quarantined = list(db.sms_fin_rawdata.find({"user_id": "fay", "smsd_quarantine": {"$exists": True}}))
    assert len(quarantined) == 6
    assert all(d.get("isprocessed") is not True for d in quarantined)
    assert all(d["smsd_quarantine"]["attempts"] >= 2 for d in quarantined)
    assert "not valid JSON" in quarantined[0]["smsd_quarantine"]["reason"]
    assert db.financial_transactions.count_documents({"user_id": "fay"}) == 0
    # Bodies never reach the log.
    assert quarantined[0]["body"][:20] not in out.stderr


def test_malformed_documents_are_quarantined_with_a_reason(tmp_path, db, mongo_server, mongo_db_name,
                                                           llm_server):
    expected = seed(db, "gus", 5)
    db.sms_fin_rawdata.insert_many([
        {"_id": "no-text", "user_id": "gus", "isprocessed": False},
        {"_id": "not-a-string", "user_id": "gus", "body": 12345},
        {"_id": "too-long", "user_id": "gus", "body": "x" * 5000},
        {"_id": "blank", "user_id": "gus", "body": "   "},
    ])
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server)
    out = run_smsd(config, "once", "--user-id", "gus")
    assert out.returncode == 0, out.stderr[-2000:]
    bad = {d["_id"]: d["smsd_quarantine"]["reason"]
           for d in db.sms_fin_rawdata.find({"user_id": "gus", "smsd_quarantine": {"$exists": True}})}
    assert set(bad) == {"no-text", "not-a-string", "too-long", "blank"}
    assert all(reason.startswith("malformed") for reason in bad.values())
    report = verify(db, expected, state_dir=tmp_path / "state")
    assert report.ok, report.to_dict()
    asked = llm_server.stats()["asked"]
    assert not any(k.startswith("s:no-text") or k.startswith("s:too-long") for k in asked)


def test_second_process_for_the_same_user_exits_cleanly(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "hal", 2)
    config = _config(tmp_path, mongo_server.uri, mongo_db_name, llm_server)
    with Journal.open(tmp_path / "state", "hal"):
        out = run_smsd(config, "once", "--user-id", "hal")
    assert out.returncode == 75
    assert "another smsd process is working on user hal" in out.stderr


def test_bad_config_value_stops_start_up_naming_the_key(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[llm]\nbatch_size = "ten"\n')
    out = run_smsd(bad, "once", "--user-id", "x")
    assert out.returncode == 78
    assert "llm.batch_size" in out.stderr


def test_mongodb_down_mid_run_keeps_journaling_then_flushes(tmp_path, own_mongo, llm_server):
    client = MongoClient(own_mongo.uri)
    db = client["smsd_down"]
    expected = seed(db, "ivy", 40)
    # Small, slow calls, one at a time: 20 calls of about 0.3 s, so most of them are still
    # to come when MongoDB goes down (with the default 25 SMS per call the run's few calls
    # could all be answered before the kill).  A short MongoDB timeout: each flush attempt
    # against the dead server holds the loop that long.
    llm_server.set_faults(latency_ms=300)
    backlog, batch, concurrency = 10, 2, 1
    config = write_config(tmp_path, mongo_uri=own_mongo.uri, db="smsd_down", llm_url=llm_server.url,
                          mongo={"timeout_ms": 500}, llm={"batch_size": batch, "concurrency": concurrency},
                          pipeline={"page_size": 40}, journal={"max_backlog": backlog})
    proc = start_smsd(config, "once", "--user-id", "ivy")
    _wait_for(lambda: db.sms_fin_rawdata.count_documents({"user_id": "ivy", "isprocessed": True}) >= 10)
    own_mongo.kill()
    assert llm_server.stats()["calls"] < 40 // batch, "calls must remain for the outage"
    # Answers keep coming into the journal while MongoDB is down, up to the backlog bound.
    _wait_for(lambda: journal_mod.scan(tmp_path / "state")["ivy"]["unflushed"] >= backlog)
    assert proc.poll() is None, "smsd must keep running while MongoDB is down"
    calls_while_down = llm_server.stats()["calls"]
    time.sleep(1.5)
    stats = journal_mod.scan(tmp_path / "state")["ivy"]
    assert stats["unflushed"] <= backlog + batch * concurrency       # the bound (+ what was in flight)
    assert llm_server.stats()["calls"] <= calls_while_down + concurrency   # paid calls paused at the bound
    assert proc.poll() is None
    own_mongo.restart()
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    client.close()
    client = MongoClient(own_mongo.uri)
    report = verify(client["smsd_down"], expected, state_dir=tmp_path / "state",
                    billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    assert report.sms_asked_more_than_once == 0
    client.close()


def test_killed_while_mongodb_is_down_buys_nothing_twice(tmp_path, own_mongo, llm_server):
    client = MongoClient(own_mongo.uri)
    db = client["smsd_down2"]
    expected = seed(db, "jo", 40)
    llm_server.set_faults(latency_ms=100)
    config = write_config(tmp_path, mongo_uri=own_mongo.uri, db="smsd_down2", llm_url=llm_server.url,
                          # Every answer flushed at once: MongoDB dies after some SMS are stored
                          # and while the rest are still asked (gathered, all 40 would be stored
                          # in one flush after the last answer, and nothing left to journal).
                          pipeline={"page_size": 40, "flush_gather_sms": 1}, llm={"concurrency": 1})
    proc = start_smsd(config, "once", "--user-id", "jo")
    _wait_for(lambda: db.sms_fin_rawdata.count_documents({"user_id": "jo", "isprocessed": True}) >= 5)
    own_mongo.kill()
    _wait_for(lambda: journal_mod.scan(tmp_path / "state")["jo"]["unflushed"] >= 5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    client.close()
    own_mongo.restart()
    out = run_smsd(config, "once", "--user-id", "jo", "--resume")
    assert out.returncode == 0, out.stderr[-3000:]
    client = MongoClient(own_mongo.uri)
    report = verify(client["smsd_down2"], expected, state_dir=tmp_path / "state",
                    billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    # Only the one call in flight at the kill may have been bought again.
    assert sum(n - 1 for n in llm_server.stats()["billed"].values()) <= 5
    client.close()


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")
