"""The LLM bill: USD per call from the price table, the ledger in the journal and in MongoDB,
repeated USD after a kill -9, and the bill in `smsd once`'s summary.

Real parts only: `smsd once` subprocesses, the local LLM server (usage counted with
OpenAI's BPE encoding, prompt caching simulated), a SecantusDB server process.
"""
from __future__ import annotations

import os
import signal
import time
from decimal import Decimal

import pytest
from bson.decimal128 import Decimal128

from smsd import ledger
from smsd.config import ConfigError, load_settings
from smsd.journal_scan import scan
from smsd.lab.invariants import verify

from ..harness import run_smsd, seed, start_smsd, wait_for, write_config

# gpt-4o-mini's list prices, written out here (not read from smsd) so the test checks the table.
INPUT, CACHED, OUTPUT = Decimal("0.15"), Decimal("0.075"), Decimal("0.60")


def list_price(u: dict) -> Decimal:
    """USD of one call the LLM server billed, at gpt-4o-mini's list prices."""
    return ((u["prompt_tokens"] - u["cached_tokens"]) * INPUT + u["cached_tokens"] * CACHED
            + u["completion_tokens"] * OUTPUT) / 1_000_000


@pytest.fixture(scope="module")
def cache_server(request):
    """An LLM server that reports a repeated prompt prefix as cached tokens, like OpenAI."""
    from ..fixtures_llm import LlmServerProcess
    server = LlmServerProcess(prefix_cache=True).start()
    yield server
    server.stop()


def test_ledger_usd_is_tokens_times_list_prices_in_journal_mongo_and_summary(tmp_path, db, mongo_server,
                                                                           mongo_db_name, cache_server):
    cache_server.reset()
    expected = seed(db, "u1", 30)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=cache_server.url,
                          llm={"model": "gpt-4o-mini", "concurrency": 1})
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0, done.stderr[-2000:]
    usage = cache_server.stats()["usage_log"]
    assert len(usage) == 6
    # The prefix (system prompt + schema) is over 1024 tokens: every call after the first is cached.
    assert usage[0]["cached_tokens"] == 0 and all(u["cached_tokens"] >= 1024 for u in usage[1:])
    billed = sum((list_price(u) for u in usage), Decimal(0))
    assert billed > 0

    stats = scan(tmp_path / "state")["u1"]
    assert Decimal(stats["cost_usd"]) == billed
    assert stats["cached_tokens"] == sum(u["cached_tokens"] for u in usage)
    assert Decimal(stats["repeated_usd"]) == 0 and stats["paid_sms"] == 30
    docs = list(db.smsd_llm_costs.find({"user_id": "u1"}))
    assert len(docs) == 1 and docs[0]["_id"].startswith("u1|") and docs[0]["_id"].endswith("|gpt-4o-mini")
    assert isinstance(docs[0]["cost_usd"], Decimal128) and docs[0]["cost_usd"].to_decimal() == billed
    assert docs[0]["calls"] == 6 and docs[0]["sms"] == 30
    assert docs[0]["prompt_tokens"] == sum(u["prompt_tokens"] for u in usage)
    assert f"USD {ledger.usd_text(billed)} (repeated 0, saved 0, 0 cache hits)" in done.stdout
    assert verify(db, expected, state_dir=tmp_path / "state", billed=cache_server.stats()["billed"]).ok

    # Written idempotently: a smaller (older) total written again changes nothing.
    from smsd.store import Store
    with Store(mongo_server.uri, mongo_db_name) as store:
        row = {k: docs[0][k] for k in ("day", "model", "calls", "sms", "prompt_tokens", "cached_tokens",
                                       "completion_tokens", "repeated_calls", "repeated_sms", "unpriced_calls",
                                       "cache_races")}
        ledger.write_costs(store, "u1", [dict(row, calls=1, cost_usd="0.000001", repeated_usd="0")])
    again = db.smsd_llm_costs.find_one({"_id": docs[0]["_id"]})
    assert again["calls"] == 6 and again["cost_usd"].to_decimal() == billed


def test_rules_then_llm_counts_saved_usd_at_the_average_paid_price(tmp_path, db, mongo_server,
                                                                   mongo_db_name, cache_server):
    cache_server.reset()
    seed(db, "u1", 30)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=cache_server.url,
                          llm={"model": "gpt-4o-mini", "extractor": "rules-then-llm"})
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0, done.stderr[-2000:]
    stats = scan(tmp_path / "state")["u1"]
    assert stats["free_sms"] > 0 and stats["paid_sms"] > 0 and stats["free_sms"] + stats["paid_sms"] == 30
    host, users = ledger.totals({"u1": stats})
    cost = sum((list_price(u) for u in cache_server.stats()["usage_log"]), Decimal(0))
    assert Decimal(host["cost_usd"]) == cost
    assert Decimal(host["saved_usd"]) == cost / stats["paid_sms"] * stats["free_sms"]
    assert users["u1"]["saved_usd"] == host["saved_usd"]
    assert db.smsd_llm_costs.count_documents({"user_id": "u1", "model": "rules", "sms": stats["free_sms"]}) == 1


def _price_of_killed_calls(usage_log: list[dict], n_killed: int) -> Decimal:
    return sum((list_price(u) for u in usage_log[:n_killed]), Decimal(0))


@pytest.mark.parametrize("how", ["after_llm_answer", "waiting_for_llm"])
def test_repeated_usd_after_kill_9_is_the_price_of_the_calls_in_flight(how, tmp_path, db, mongo_server,
                                                                        mongo_db_name, make_llm_server):
    waiting = how == "waiting_for_llm"
    server = make_llm_server(latency_ms=1500 if waiting else 0)
    expected = seed(db, "u1", 20)
    # After the answer: one call in flight (the one answered, then lost).  While waiting:
    # two, both seen by the server before the kill.
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                          llm={"model": "gpt-4o-mini", "concurrency": 2 if waiting else 1, "batch_size": 5})
    if how == "after_llm_answer":
        crashed = run_smsd(config, "once", "--user-id", "u1", SMSD_FAILPOINT="after_llm_answer@1")
        assert crashed.returncode == -signal.SIGKILL, crashed.stdout[-2000:]
    else:
        proc = start_smsd(config, "once", "--user-id", "u1")
        wait_for(lambda: server.stats()["calls"] >= 2, timeout=30, what="two calls in flight")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        # The killed calls are still answered (and billed) by the server.
        wait_for(lambda: len(server.stats()["usage_log"]) >= 2, timeout=10, what="killed calls billed")
        server.set_faults(latency_ms=0)
    before = scan(tmp_path / "state")["u1"]
    in_flight = before["sent_calls"]
    assert in_flight == (2 if waiting else 1)   # journaled as sent, no answer committed
    assert Decimal(before.get("repeated_usd", "0")) == 0
    time.sleep(0.2)
    killed = server.stats()["usage_log"][:in_flight]
    assert len(killed) == in_flight

    resumed = run_smsd(config, "once", "--user-id", "u1", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    assert verify(db, expected, state_dir=tmp_path / "state", billed=server.stats()["billed"]).ok
    after = scan(tmp_path / "state")["u1"]
    assert after["repeated_calls"] == in_flight
    # What the crash cost: exactly the price the server billed for the calls cut by the kill.
    assert Decimal(after["repeated_usd"]) == _price_of_killed_calls(killed, in_flight) > 0
    usage = server.stats()["usage_log"]
    assert Decimal(after["cost_usd"]) == sum((list_price(u) for u in usage[in_flight:]), Decimal(0))
    doc = db.smsd_llm_costs.find_one({"user_id": "u1"})
    assert doc["repeated_usd"].to_decimal() == Decimal(after["repeated_usd"])
    assert doc["repeated_calls"] == in_flight


def test_price_table_defaults_overrides_and_bad_values(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[llm]\nmodel = "gpt-4o-mini"\n'
                    '[llm.prices."gpt-4o-mini"]\ninput = "0.20"\n'
                    '[llm.prices."my-model"]\ninput = 1.5\noutput = "3"\n')
    s = load_settings(good, env={})
    p = ledger.price_for("gpt-4o-mini", s.llm.price_table)
    assert (p.input, p.cached_input, p.output, p.batch_discount) == (
        Decimal("0.20"), Decimal("0.075"), Decimal("0.60"), Decimal("0.5"))
    mine = ledger.price_for("my-model", s.llm.price_table)
    assert (mine.input, mine.cached_input, mine.output) == (Decimal("1.5"), Decimal("1.5"), Decimal("3"))
    assert ledger.price_for("gpt-4o-mini-2024-07-18", s.llm.price_table).input == Decimal("0.20")
    assert ledger.price_for("gpt-4o-2024-08-06", s.llm.price_table).input == Decimal("2.50")
    assert ledger.price_for("smsd-local", s.llm.price_table) is None
    from ..harness import REPO
    assert load_settings(REPO / "config.toml", env={}).llm.price_table == ledger.DEFAULT_PRICES
    for body, word in [('[llm.prices."x"]\ninput = "abc"\noutput = "1"\n', "llm.prices.x.input"),
                       ('[llm.prices."x"]\ninput = -1\noutput = "1"\n', "llm.prices.x.input"),
                       ('[llm.prices."x"]\ninput = "1"\n', "needs output"),
                       ('[llm.prices."x"]\ninput = "1"\noutput = "1"\nfoo = 1\n', "llm.prices.x.foo")]:
        bad = tmp_path / "bad.toml"
        bad.write_text(body)
        with pytest.raises(ConfigError, match=word):
            load_settings(bad, env={})


def test_unpriced_model_is_counted_and_shown_not_silently_free(tmp_path, db, mongo_server, mongo_db_name,
                                                              llm_server):
    seed(db, "u1", 5)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"model": "no-such-model"})
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "[1 calls of a model without a price]" in done.stdout
    assert scan(tmp_path / "state")["u1"]["unpriced_calls"] == 1


def test_smsctl_status_shows_the_bill_in_json_and_table(tmp_path, db, mongo_server, mongo_db_name,
                                                        cache_server):
    import json
    import subprocess
    import sys

    from ..harness import REPO, Daemon
    cache_server.reset()
    seed(db, "ola", 10)
    seed(db, "pam", 10, start=10)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=cache_server.url,
                          llm={"model": "gpt-4o-mini"})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 20, what="all processed")
        billed = sum((list_price(u) for u in cache_server.stats()["usage_log"]), Decimal(0))
        wait_for(lambda: Decimal(d.status()["llm"]["cost_usd"]) == billed, what="status shows the bill")

        def smsctl(*args):
            return subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(d.sock), *args],
                                  capture_output=True, text=True, timeout=20, cwd=str(REPO))
        st = json.loads(smsctl("status", "--json").stdout)
        llm = st["llm"]
        assert Decimal(llm["cost_usd"]) == billed and llm["repeated_usd"] == "0"
        assert llm["saved_usd"] == "0" and llm["cache_hits"] == 0
        users = {u["user_id"]: u for u in st["users"]}
        assert sum(Decimal(users[u]["cost_usd"]) for u in ("ola", "pam")) == billed
        assert all(Decimal(users[u]["cost_usd"]) > 0 for u in ("ola", "pam"))
        table = smsctl("status").stdout
        assert f"LLM cost USD {ledger.usd_text(billed)}" in table and "COST USD" in table
    finally:
        d.stop()


def test_a_ledger_row_new_to_mongodb_is_inserted_and_a_later_total_still_moves_by_max(db):
    row = {"day": "2026-12-03", "model": "gpt-4o-mini", "calls": 2, "sms": 40, "cache_races": 0,
           "prompt_tokens": 3000, "cached_tokens": 1000, "completion_tokens": 900, "repeated_calls": 0,
           "repeated_sms": 0, "unpriced_calls": 0, "cost_usd": "0.000765", "repeated_usd": "0",
           "rev": 2, "synced_rev": 0}
    costs = db[ledger.COSTS_COLLECTION]
    ledger.sync_costs(costs, "u1", [row])                     # never written: an insert
    doc = costs.find_one({"_id": ledger.cost_doc_id("u1", row["day"], row["model"])})
    assert (doc["user_id"], doc["calls"], doc["cost_usd"]) == ("u1", 2, Decimal128("0.000765"))
    # A journal that lost its note (synced_rev 0 again) with a larger total, and a replay of an
    # older one: the stored document ends at the largest totals either way.
    ledger.sync_costs(costs, "u1", [dict(row, calls=3, cost_usd="0.001", rev=3)])
    ledger.sync_costs(costs, "u1", [dict(row, synced_rev=3)])
    doc = costs.find_one({"_id": doc["_id"]})
    assert (doc["calls"], doc["sms"], doc["cost_usd"]) == (3, 40, Decimal128("0.001"))
    assert costs.count_documents({}) == 1
