"""The issue-12 benchmark modules: bare loop, contract run, commit join, steady state.

Behaviour only (what is stored, counted and joined), never speed.  Each test
uses the bench's own servers (``Bench``: a MongoDB-wire server and the LLM server
as subprocesses), as ``smsd bench`` does.
"""
from __future__ import annotations

import tempfile
import time

import pytest
from bson import ObjectId

from smsd.journal import Journal
from smsd.lab.bench.bare_loop import run_bare
from smsd.lab.bench.commit_latency import bench_commit, journal_commits
from smsd.lab.bench.contract_run import ContractRun, seed_users, shipped_settings
from smsd.lab.bench.harness import Bench, Params
from smsd.lab.bench.steady import _growth, bench_steady
from smsd.lab.mongoproxy import ProxyProcess
from smsd.model import SmsResult, Usage, sms_key


@pytest.fixture
def bench():
    # A short root: the control socket's path must fit AF_UNIX's 108 bytes.
    with tempfile.TemporaryDirectory(prefix="sb-", dir="/tmp") as root:
        b = Bench(Params.quick(), root, verbose=False)
        yield b
        b.close()


def _without_provenance(docs):
    return {d["_id"]: {k: v for k, v in d.items() if k not in ("source", "created_at")} for d in docs}


def test_bare_loop_stores_what_smsd_stores_with_the_least_commands(bench):
    bare_db, _ = bench.fresh("bare")
    smsd_db, smsd_dir = bench.fresh("smsd")
    users = seed_users(bench, bare_db, 3, 5)
    raw = list(bench.client[bare_db]["sms_fin_rawdata"].find())
    bench.client[smsd_db]["sms_fin_rawdata"].insert_many(raw)       # the same SMS, same _ids
    proxy = ProxyProcess(bench.mongo_uri).start()
    try:
        run = run_bare(bench, bare_db, users, 15, processes=2, page_size=4, uri=proxy.uri)
        commands = proxy.stats()["commands"]
    finally:
        proxy.stop()
    # 5 SMS per user in pages of 4: two pages each, one find + one update_many per page,
    # plus one bulk upsert per page holding a transaction; nothing else.
    assert run.sms == 15 and run.pages == 6
    assert commands["find"] == 6 and 6 < commands["update"] <= 12
    assert not set(commands) - {"find", "update", "hello", "ismaster", "isMaster", "ping", "endSessions"}
    assert bench.client[bare_db]["sms_fin_rawdata"].count_documents({"isprocessed": True}) == 15
    assert run.launched <= run.go <= run.first_processed <= run.last_processed

    smsd = ContractRun(bench, smsd_db, smsd_dir).start()
    try:
        smsd.wait_done(15, 120)
        assert smsd.status()["pid"] == smsd.proc.pid          # driven through its control socket
    finally:
        smsd.stop()
    bare_tx = _without_provenance(bench.client[bare_db]["financial_transactions"].find())
    smsd_tx = _without_provenance(bench.client[smsd_db]["financial_transactions"].find())
    assert bare_tx and bare_tx == smsd_tx


def test_journal_commits_are_joined_by_request_id(tmp_path):
    journal = Journal.open(tmp_path / "state", "u1")
    raw = ObjectId()
    call = journal.begin_call([(sms_key(raw), raw)], owner="t", epoch=0, model="m")
    t0 = time.time()
    journal.record_answer(call, [(raw, SmsResult(key=sms_key(raw), kind="otp"))], failed={},
                          request_id="req_1", usage=Usage())
    t1 = time.time()
    other = ObjectId()
    journal.begin_call([(sms_key(other), other)], owner="t", epoch=0, model="m")   # never answered
    journal.close()
    commits, column = journal_commits(tmp_path / "state")
    assert column in ("committed_at", "answered_at")
    assert list(commits) == ["req_1"] and t0 <= commits["req_1"] <= t1


def test_commit_bench_joins_every_answer_in_each_condition(bench):
    p = bench.params
    # Four LLM calls at the shipped SMS per call: more than one wave of llm.concurrency
    # (2), so that answers arrive while MongoDB is down.
    p.commit_users, p.commit_sms_each, p.commit_down_s = 1, 4 * shipped_settings().llm.batch_size, 1.0
    res = bench_commit(bench)
    assert res.error is None
    figures = {f.name: f.value for f in res.figures}
    for condition in ("normal", "slow", "down"):
        assert figures[f"{condition}: answers never committed"] == 0
    assert figures["down: answers written while MongoDB was down"] > 0
    assert len(res.extra["latencies_ms"]["down"]) == figures["down: answers written while MongoDB was down"]
    # Every answered call of the normal and slow runs was joined to its journal row.
    assert len(res.extra["latencies_ms"]["normal"]) == 4 and len(res.extra["latencies_ms"]["slow"]) == 4


def test_commit_bench_refuses_data_that_no_answer_could_meet_mongodb_down(bench):
    p = bench.params
    p.commit_users, p.commit_sms_each = 1, shipped_settings().llm.batch_size   # one call: one wave
    res = bench_commit(bench)
    assert res.error and "llm.batch_size" in res.error and not res.figures


def test_steady_bench_stores_every_arriving_sms_and_counts_worker_starts(bench):
    p = bench.params
    p.steady_users, p.steady_history, p.steady_rate, p.steady_seconds = 5, 2, 4.0, 3.0
    res = bench_steady(bench)
    figures = {f.name: f.value for f in res.figures}
    assert figures["SMS not stored by the end of the drain wait"] == 0
    assert len(res.extra["latencies_s"]) == 12 and all(x > 0 for x in res.extra["latencies_s"])
    assert figures["worker starts per minute (supervisor log)"] > 0
    # The status shows busy workers only, polled every 0.5 s: a turn of a few SMS can fall
    # between two polls, so the pids it saw are a lower bound of the workers started.
    assert 0 <= res.extra["worker_pids"] <= res.extra["log_starts"]
    assert "backlog growth (mean pending, second half − first half)" in figures


def test_a_steady_backlog_of_one_discovery_wait_is_no_growth_and_a_rising_one_is():
    assert _growth([100, 101, 99, 100, 90, 89, 78, 80]) < 0      # flat, then draining
    assert _growth([100, 150, 200, 250, 300, 350]) == 150         # piles up
    assert _growth([7]) == 0.0
