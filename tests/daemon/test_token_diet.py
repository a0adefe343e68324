"""Fewer tokens per SMS: ids local to a call, a byte-stable prefix, the journal's upgrade."""
from __future__ import annotations

import json
import sqlite3


from smsd import llm, model, tokens
from smsd.journal import Journal
from smsd.journal_scan import scan
from smsd.lab.invariants import verify
from smsd.llm import LlmClient
from smsd.model import Sms, Usage

from ..harness import run_smsd, seed, write_config


def _sms(lines: list[dict]) -> list[Sms]:
    return [Sms(raw_id=f"raw-{i}", key=model.sms_key(f"raw-{i}"), user_id="u", text=line["text"],
                sender=line.get("sender")) for i, line in enumerate(lines)]


def test_wire_ids_are_local_to_the_call_and_kept_in_its_journal_record(tmp_path, db, mongo_server,
                                                                         mongo_db_name, llm_server):
    expected = seed(db, "u1", 12)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    done = run_smsd(config, "once", "--user-id", "u1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert llm_server.last_request()["ids"] in (["1", "2"], ["1", "2", "3", "4", "5"])  # 12 in 5s
    assert verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"]).ok
    path = next((tmp_path / "state" / "journal").glob("*.sqlite"))
    con = sqlite3.connect(path)
    rows = con.execute("SELECT call_id, sms_key, wire_id FROM call_sms").fetchall()
    con.close()
    by_call: dict[str, list[str]] = {}
    for call_id, _, wire_id in rows:
        by_call.setdefault(call_id, []).append(wire_id)
    assert sorted(len(w) for w in by_call.values()) == [2, 5, 5]
    assert all(sorted(w, key=int) == [str(i) for i in range(1, len(w) + 1)] for w in by_call.values())
    assert {k for _, k, _ in rows} == {model.sms_key(r) for r in expected}


def test_an_answer_id_outside_the_call_is_unknown_and_results_come_back_by_sms_key(llm_server, sms_fixtures):
    sms = _sms(sms_fixtures[:3])
    client = LlmClient(base_url=llm_server.url, api_key=None, model="test-model", key_header=True)
    llm_server.script(["unknown"])
    answer = client.extract(sms)
    assert set(answer.results) == {s.key for s in sms} and answer.failed == {}
    assert all(r.key == k for k, r in answer.results.items())
    assert len(answer.unknown_ids) == 1 and answer.unknown_ids[0].startswith("unknown-")
    # A server echoing another call's id ("4" in a call of three) names nothing of this call.
    content = json.dumps({"results": [{"id": "4", "kind": "other", "transactions": []}]})
    results, failed, unknown = llm.validate_answer(content, model.wire_ids(3))
    assert results == {} and unknown == ["4"] and set(failed) == {"1", "2", "3"}
    client.close()


def test_prefix_is_byte_stable_and_the_request_counts_schema_and_messages(llm_server, sms_fixtures):
    client = LlmClient(base_url=llm_server.url, api_key=None, model="gpt-4o-mini", key_header=True)
    shapes = []
    for lines in (sms_fixtures[:2], sms_fixtures[5:9]):
        client.extract(_sms(lines))
        shapes.append(llm_server.last_request())
    assert shapes[0]["response_format"] == shapes[1]["response_format"]
    assert shapes[0]["roles"] == shapes[1]["roles"] == ["system", "user"]
    a, b = client.request(_sms(sms_fixtures[:2])), client.request(_sms(sms_fixtures[5:9]))
    assert a["messages"][0] == b["messages"][0] and a["response_format"] == b["response_format"]
    prefix = tokens.prefix_tokens(llm.SYSTEM_PROMPT, a["response_format"])
    total = tokens.request_tokens(a["messages"], a["response_format"])
    assert 0 < prefix < total
    assert total == prefix + tokens.REPLY_PRIMING + tokens.PER_MESSAGE + tokens.count(a["messages"][1]["content"])
    client.close()


def test_a_schema_2_journal_is_upgraded_in_place_keeping_its_calls(tmp_path):
    with Journal.open(tmp_path, "u1") as j:
        call = j.begin_call([(model.sms_key("a"), "a")], owner="", epoch=0, model="m")
        j.record_answer(call, [], failed={model.sms_key("a"): "missing"}, request_id=None,
                        usage=Usage(prompt_tokens=7, completion_tokens=3))
        path = j.path
    con = sqlite3.connect(path)   # back to schema 2, as the smsd before the ledger left it
    con.execute("DROP TABLE ledger")
    for table, column in (("calls", "cached_tokens"), ("calls", "cost_usd"), ("calls", "repeated_usd"),
                          ("call_sms", "wire_id"), ("call_sms", "text_hash")):
        con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    con.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    con.commit()
    con.close()
    old = scan(tmp_path)["u1"]     # the read-only scan reads the older schema too
    assert old["calls"] == 1 and old["prompt_tokens"] == 7 and "cost_usd" not in old
    with Journal.open(tmp_path, "u1") as j:
        stats = j.stats()
        assert stats["calls"] == 1 and stats["prompt_tokens"] == 7 and stats["cost_usd"] == "0"
        assert j.db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "3"
