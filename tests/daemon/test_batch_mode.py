"""Batch mode (the Batch API) against the local server's /v1/files and /v1/batches.

Real processes: ``smsd once --mode batch`` as a subprocess, the local LLM
server as a subprocess, a MongoDB-wire server.  A kill at each step of the
batch flow (``SMSD_FAILPOINT``), then a restart: every invariant holds,
the server saw exactly one batch per SMS set, and nothing a batch answered
was asked online.
"""
from __future__ import annotations

import signal

import pytest
from pymongo import MongoClient

from smsd.lab.invariants import verify

from ..harness import run_smsd, seed, write_config

STEPS = ["batch_before_upload", "batch_after_upload", "batch_after_create", "batch_polling",
         "batch_mid_download", "batch_after_download"]


@pytest.fixture
def db(mongo_server, mongo_db_name):
    client = MongoClient(mongo_server.uri)
    yield client[mongo_db_name]
    client.drop_database(mongo_db_name)
    client.close()


@pytest.fixture
def config(tmp_path, mongo_server, mongo_db_name, llm_server):
    return write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                        llm={"mode": "batch", "batch_poll_interval": 0.5})


def batches(llm_server) -> dict:
    return llm_server.admin("GET", "/_admin/batches")


def assert_all_done(db, expected, tmp_path, llm_server, user="u1"):
    stats = llm_server.stats()
    report = verify(db, expected, state_dir=tmp_path / "state", billed=stats["billed"])
    assert report.ok, report.to_dict()
    assert report.sms_processed == len(expected)
    assert db.sms_fin_rawdata.count_documents({"user_id": user, "isprocessed": {"$ne": True}}) == 0
    return stats


def test_backfill_goes_through_one_batch_and_nothing_online(tmp_path, db, config, llm_server):
    expected = seed(db, "u1", 23)
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    assert "1 batch created, 23 SMS answered by the Batch API" in done.stdout
    stats = assert_all_done(db, expected, tmp_path, llm_server)
    assert stats["calls"] == 0, "batch mode asked the online endpoint"
    info = batches(llm_server)
    assert info["created"] == 1
    assert info["batches"][0]["lines"] == 5          # 23 SMS in calls of batch_size 5
    assert all(n == 1 for n in stats["billed"].values())


def test_a_backlog_bigger_than_one_batch_goes_batch_after_batch_in_one_run(tmp_path, db, mongo_server,
                                                                           mongo_db_name, llm_server):
    expected = seed(db, "u1", 25)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"mode": "batch", "batch_max_sms": 10, "batch_poll_interval": 0.5})
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0 and "3 batches created, 25 SMS answered" in done.stdout, done.stdout
    assert_all_done(db, expected, tmp_path, llm_server)
    assert batches(llm_server)["created"] == 3


@pytest.mark.parametrize("point", STEPS)
def test_kill_at_each_batch_step_then_restart_resumes_the_same_batch(point, tmp_path, db, config,
                                                                    llm_server):
    expected = seed(db, "u1", 12)
    crashed = run_smsd(config, "once", "--user-id", "u1", SMSD_FAILPOINT=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stdout + crashed.stderr[-2000:]
    resumed = run_smsd(config, "once", "--user-id", "u1", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    stats = assert_all_done(db, expected, tmp_path, llm_server)
    assert batches(llm_server)["created"] == 1, f"{point}: a second batch for the same SMS"
    assert stats["calls"] == 0, f"{point}: SMS of the batch were asked online"
    assert all(n == 1 for n in stats["billed"].values()), f"{point}: paid twice: {stats['billed']}"


def test_an_expired_batch_keeps_its_answers_and_the_rest_goes_to_a_new_batch(tmp_path, db, config,
                                                                             llm_server):
    expected = seed(db, "u1", 20)
    llm_server.admin("POST", "/_admin/batches", {"expire": True, "expire_answered": 0.5})
    first = run_smsd(config, "once", "--user-id", "u1")
    assert "10 SMS answered by the Batch API, 10 requeued" in first.stdout, first.stdout
    assert db.sms_fin_rawdata.count_documents({"user_id": "u1", "isprocessed": True}) == 10
    llm_server.admin("POST", "/_admin/batches", {"expire": False})
    second = run_smsd(config, "once", "--user-id", "u1", "--resume")
    assert second.returncode == 0, second.stdout + second.stderr[-2000:]
    stats = assert_all_done(db, expected, tmp_path, llm_server)
    assert batches(llm_server)["created"] == 2
    assert all(n == 1 for n in stats["billed"].values())


def test_failed_lines_and_unknown_ids_lose_nothing(tmp_path, db, config, llm_server):
    expected = seed(db, "u1", 30)
    llm_server.admin("POST", "/_admin/batches", {"fail_ratio": 0.5, "unknown_ids": True, "seed": 3})
    first = run_smsd(config, "once", "--user-id", "u1")
    assert first.returncode in (0, 4), first.stdout + first.stderr[-2000:]
    assert "requeued" in first.stdout
    llm_server.admin("POST", "/_admin/batches", {"fail_ratio": 0.0})
    for _ in range(3):      # each rerun sends what is left in a new batch
        if db.sms_fin_rawdata.count_documents({"user_id": "u1", "isprocessed": {"$ne": True}}) == 0:
            break
        run_smsd(config, "once", "--user-id", "u1", "--resume")
    stats = assert_all_done(db, expected, tmp_path, llm_server)
    assert stats["calls"] == 0
    # An unknown id in an answer is ignored; the failed lines were never billed, so no SMS twice.
    assert all(n == 1 for n in stats["billed"].values())


def test_auto_mode_keeps_a_small_backlog_online(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    expected = seed(db, "u1", 8)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"mode": "auto", "batch_threshold": 100})
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    stats = assert_all_done(db, expected, tmp_path, llm_server)
    assert batches(llm_server)["created"] == 0 and stats["calls"] >= 2
    big = run_smsd(config, "once", "--user-id", "u1", "--mode", "batch")
    assert big.returncode == 0 and "0 batches created" in big.stdout, big.stdout


def test_the_daemon_shows_open_batches_and_smsctl_cancels_one(tmp_path, db, mongo_server, mongo_db_name,
                                                             llm_server):
    import json
    import subprocess
    import sys

    from ..harness import REPO, Daemon, wait_for

    expected = seed(db, "u1", 15)
    llm_server.admin("POST", "/_admin/batches", {"delay_s": 600})
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"mode": "batch", "batch_poll_interval": 0.5})
    d = Daemon(config, tmp_path)
    try:
        def smsctl(*args):
            return subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(d.sock), *args],
                                  capture_output=True, text=True, timeout=30, cwd=str(REPO))

        listed = wait_for(lambda: d.status()["batches"], timeout=60, what="an open batch in status")
        assert listed[0]["user_id"] == "u1" and listed[0]["sms"] == 15
        batch_id = listed[0]["batch_id"]
        table = smsctl("batches")
        assert table.returncode == 0 and batch_id in table.stdout and "BATCHES (1)" in table.stdout
        assert batch_id in smsctl("status").stdout
        cancelled = smsctl("batches", "cancel", batch_id, "--json")
        assert cancelled.returncode == 0, cancelled.stderr
        assert json.loads(cancelled.stdout)["status"] == "cancelled"
        # The cancelled batch answered nothing: its SMS go back to the queue and, in batch
        # mode, into a new batch, which completes once the server is fast again.
        llm_server.admin("POST", "/_admin/batches", {"delay_s": 0})
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"user_id": "u1", "isprocessed": True}) == 15,
                 timeout=90, what="all processed after the cancel")
        bad = smsctl("batches", "cancel", "batch_nope")
        assert bad.returncode == 1 and "batch_nope" in bad.stderr
    finally:
        d.stop()
    stats = assert_all_done(db, expected, tmp_path, llm_server)
    assert stats["calls"] == 0
    assert batches(llm_server)["created"] == 2
