"""Pay once per text: the shared answer cache, with real `smsd once` processes."""
from __future__ import annotations

import signal
from decimal import Decimal

from smsd.journal_scan import scan
from smsd.lab.invariants import verify

from ..harness import run_smsd, seed, start_smsd, write_config


def _config(tmp_path, name, mongo_server, mongo_db_name, server, **llm):
    d = tmp_path / name
    d.mkdir()
    return write_config(d, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                        llm=dict({"model": "gpt-4o-mini"}, **llm))


def _once(config, user, **env):
    done = run_smsd(config, "once", "--user-id", user, **env)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    return done


def test_the_same_text_of_another_user_is_answered_from_the_cache_and_not_paid(tmp_path, db, mongo_server,
                                                                               mongo_db_name, llm_server):
    seed(db, "u1", 10)
    config = _config(tmp_path, "a", mongo_server, mongo_db_name, llm_server)
    _once(config, "u1")
    paid = llm_server.stats()["calls"]
    assert db.smsd_answer_cache.count_documents({}) == 10
    entry = db.smsd_answer_cache.find_one()
    assert "user_id" not in entry and entry["model"] == "gpt-4o-mini" and entry["prompt_version"]

    expected = seed(db, "u2", 10)                      # the same ten texts, another user
    done = _once(config, "u2")
    assert llm_server.stats()["calls"] == paid         # not one more paid call
    assert "10 cache hits" in done.stdout
    assert verify(db, expected, state_dir=config.parent / "state", billed=llm_server.stats()["billed"]).ok
    stats = scan(config.parent / "state")["u2"]
    assert stats["cache_hits"] == 10 and stats["paid_sms"] == 0 and Decimal(stats["cost_usd"]) == 0
    assert db.smsd_llm_costs.find_one({"user_id": "u2", "model": "cache"})["sms"] == 10
    # Stored like any answer: the transactions carry where they came from.
    tx = db.financial_transactions.find_one({"user_id": "u2"})
    assert tx is not None and tx["source"]["model"] == "cache"


def test_never_reused_across_models_or_prompt_versions_and_off_when_configured(tmp_path, db, mongo_server,
                                                                              mongo_db_name, llm_server):
    seed(db, "u1", 5)
    _once(_config(tmp_path, "a", mongo_server, mongo_db_name, llm_server), "u1")
    runs = [("u2", {"model": "gpt-4o"}),              # another model
            ("u3", {"strict_schema": True}),          # another prompt version (the schema sent)
            ("u4", {"answer_cache": False})]          # the off switch
    for user, llm in runs:
        seed(db, user, 5)
        before = llm_server.stats()["calls"]
        _once(_config(tmp_path, user, mongo_server, mongo_db_name, llm_server, **llm), user)
        assert llm_server.stats()["calls"] > before, user
    assert db.smsd_answer_cache.count_documents({}) == 15    # gpt-4o-mini, gpt-4o, strict: 5 each


def test_only_flushed_answers_fill_the_cache(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "u1", 5)
    config = _config(tmp_path, "a", mongo_server, mongo_db_name, llm_server, batch_size=5, concurrency=1)
    crashed = run_smsd(config, "once", "--user-id", "u1", SMSD_FAILPOINT="after_commit@1")
    assert crashed.returncode == -signal.SIGKILL
    assert db.smsd_answer_cache.count_documents({}) == 0     # journaled, not flushed: not shared
    seed(db, "u2", 5)
    before = llm_server.stats()["calls"]
    _once(config, "u2")
    assert llm_server.stats()["calls"] == before + 1
    _once(config, "u1")                                       # the replay flushes u1's answer
    assert db.smsd_answer_cache.count_documents({}) == 5


def test_two_identical_texts_asked_at_once_are_both_paid_and_counted(tmp_path, db, mongo_server, mongo_db_name,
                                                                     make_llm_server):
    server = make_llm_server(latency_ms=800)
    seed(db, "u1", 5)
    seed(db, "u2", 5)
    config = _config(tmp_path, "a", mongo_server, mongo_db_name, server, batch_size=5, concurrency=1)
    procs = [start_smsd(config, "once", "--user-id", u) for u in ("u1", "u2")]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert server.stats()["calls"] == 2                   # neither found the other's answer yet
    stats = scan(config.parent / "state")
    races = sum(s["cache_races"] for s in stats.values())
    assert races == 5                                     # the second flush found all five written
    assert sum(s["paid_sms"] for s in stats.values()) == 10
    assert db.smsd_answer_cache.count_documents({}) == 5


def test_a_worker_pays_for_a_text_once_and_its_twins_wait_for_the_cache(tmp_path, db, mongo_server,
                                                                         mongo_db_name, llm_server):
    expected = seed(db, "u1", 5)
    expected.update(seed(db, "u1", 5))                # the same five texts again, same user
    config = _config(tmp_path, "a", mongo_server, mongo_db_name, llm_server, batch_size=10)
    done = _once(config, "u1")
    billed = llm_server.stats()["billed"]
    assert len(billed) == 5 and set(billed.values()) == {1}, billed   # one paid ask per text
    assert "5 cache hits" in done.stdout
    assert verify(db, expected, state_dir=config.parent / "state", billed=billed).ok
    assert db.sms_fin_rawdata.count_documents({"user_id": "u1", "isprocessed": True}) == 10
