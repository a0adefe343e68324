"""smsd.store and smsd.embedded against a real MongoDB-wire server (no mocks)."""
from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pymongo
import pytest
from bson import Decimal128, ObjectId

from tests.fixtures_mongo import seed_sms
from smsd import embedded
from smsd.embedded import EmbeddedMongo, EmbeddedUnavailable
from smsd.model import FlushItem, Provenance, Quarantine, SmsResult, Transaction, sms_key, transaction_id
from smsd import store_stats
from smsd.store import Store
from smsd.store_docs import (
    IDX_LATEST_CHECKPOINT,
    IDX_PENDING,
    IDX_TX_BY_SMS,
    MALFORMED_TEXT_EMPTY,
    MALFORMED_TEXT_MISSING,
    MALFORMED_TEXT_NOT_STRING,
    MALFORMED_TEXT_TOO_LONG,
)
from smsd.store_errors import StoreUnavailable

ROOT = Path(__file__).resolve().parents[2]
PROV = Provenance(call_id="call-1", model="test-model", request_id="req-1",
                  answered_at=datetime(2026, 9, 1, 10, 0, tzinfo=timezone.utc), owner="host-a", epoch=0)


def _tx(amount: str, direction: str = "debit", **kw) -> Transaction:
    return Transaction(direction=direction, amount=Decimal(amount), currency="INR", **kw)


def _item(raw_id, user_id: str, *txs: Transaction, kind: str = "transaction") -> FlushItem:
    return FlushItem(raw_id=raw_id, user_id=user_id,
                     result=SmsResult(key=sms_key(raw_id), kind=kind, transactions=tuple(txs)),
                     provenance=PROV)


def _ids(sms_list) -> list:
    return [s.raw_id for s in sms_list]


# --------------------------------------------------------------------------- pending set
def test_missing_isprocessed_counts_as_pending_and_oldest_id_comes_first(store: Store):
    seed_sms(store, "u1", 3, start=10)                        # isprocessed missing
    seed_sms(store, "u1", 3, start=0, isprocessed=False)
    seed_sms(store, "u1", 3, start=20, isprocessed=True)
    seed_sms(store, "u1", 1, start=30, isprocessed=None)      # explicit null: not true
    seed_sms(store, "u2", 2, start=100)
    sms, bad = store.fetch_pending("u1", limit=100)
    assert bad == []
    assert _ids(sms) == [0, 1, 2, 10, 11, 12, 30]
    assert store.count_pending("u1") == 7
    assert store.pending_users() == {"u1": 7, "u2": 2}
    assert all(s.user_id == "u1" and s.key == sms_key(s.raw_id) for s in sms)


def test_fetch_pending_respects_limit(store: Store):
    seed_sms(store, "u1", 25)
    sms, _ = store.fetch_pending("u1", limit=10)
    assert _ids(sms) == list(range(10))
    assert store.fetch_pending("u1", limit=0) == ([], [])


def test_exclude_keys_are_skipped_and_the_limit_is_still_filled(store: Store):
    seed_sms(store, "u1", 20)
    journal = {sms_key(i) for i in range(0, 8)} | {sms_key(999), "s:not-there"}
    sms, _ = store.fetch_pending("u1", limit=5, exclude_keys=journal)
    assert _ids(sms) == [8, 9, 10, 11, 12]
    sms, _ = store.fetch_pending("u1", limit=50, exclude_keys=journal)
    assert _ids(sms) == list(range(8, 20))


def test_quarantined_sms_leave_the_pending_set_and_come_back_on_unquarantine(store: Store):
    seed_sms(store, "u1", 5)
    store.quarantine([Quarantine(raw_id=1, key=sms_key(1), user_id="u1", reason="llm_unparseable", attempts=3),
                      Quarantine(raw_id=3, key=sms_key(3), user_id="u1", reason="ungrounded: amount")])
    sms, _ = store.fetch_pending("u1", limit=10)
    assert _ids(sms) == [0, 2, 4]
    assert store.count_pending("u1") == 3
    listed = store.list_quarantined("u1")
    assert [(q["sms_id"], q["reason"], q["attempts"]) for q in listed] == [
        ("i:1", "llm_unparseable", 3), ("i:3", "ungrounded: amount", 0)]
    assert all(set(q) == {"user_id", "sms_id", "reason", "attempts", "at"} for q in listed)
    assert store.list_quarantined() == listed
    assert store.user_summaries(["u1"])["u1"] == {
        "total_sms": 5, "processed_sms": 0, "pending_sms": 3, "quarantined_sms": 2, "ungrounded_sms": 1}
    assert store.unquarantine("u1") == 2
    assert _ids(store.fetch_pending("u1", limit=10)[0]) == [0, 1, 2, 3, 4]
    assert store.list_quarantined("u1") == []


def test_a_processed_sms_is_never_quarantined(store: Store):
    seed_sms(store, "u1", 2)
    store.mark_processed("u1", [0], "b1")
    store.quarantine([Quarantine(raw_id=0, key=sms_key(0), user_id="u1", reason="x")])
    assert store.raw.find_one({"_id": 0}).get("smsd_quarantine") is None
    assert store.list_quarantined("u1") == []


def test_malformed_documents_are_classified_with_a_reason(store: Store):
    store.raw.insert_many([
        {"_id": 1, "user_id": "u1"},                                          # no text
        {"_id": 2, "user_id": "u1", "body": 12345},                           # not a string
        {"_id": 3, "user_id": "u1", "body": "   \n "},                        # blank
        {"_id": 4, "user_id": "u1", "body": "x" * 2001},                      # too long
        {"_id": 5, "user_id": "u1", "body": None},                            # null text
        {"_id": 6, "user_id": "u1", "body": "INR 5.00 debited", "sender": 42,
         "received_at": "2026-09-01T10:00:00"},                              # odd sender/time: fine
        {"_id": 7, "user_id": "u1", "body": "x" * 2000, "sender": "AX-BANK",
         "received_at": datetime(2026, 9, 1, 10, 0, tzinfo=timezone.utc)},
    ])
    sms, bad = store.fetch_pending("u1", limit=100)
    assert {m.raw_id: m.reason for m in bad} == {
        1: MALFORMED_TEXT_MISSING, 2: MALFORMED_TEXT_NOT_STRING, 3: MALFORMED_TEXT_EMPTY,
        4: MALFORMED_TEXT_TOO_LONG, 5: MALFORMED_TEXT_MISSING}
    assert all(m.user_id == "u1" and m.key == sms_key(m.raw_id) for m in bad)
    by_id = {s.raw_id: s for s in sms}
    assert set(by_id) == {6, 7}
    assert by_id[6].sender is None and by_id[6].received_at is None
    assert by_id[7].sender == "AX-BANK"
    assert by_id[7].received_at == datetime(2026, 9, 1, 10, 0, tzinfo=timezone.utc)
    # the limit bounds both lists together
    sms, bad = store.fetch_pending("u1", limit=3)
    assert len(sms) + len(bad) == 3 and [m.raw_id for m in bad] == [1, 2, 3]


def test_custom_field_names_and_text_limit(mongo_server, mongo_db_name):
    st = Store(mongo_server.uri, mongo_db_name, text_field="msg", sender_field="from",
               time_field="ts", max_text_chars=10, timeout_ms=3000)
    try:
        st.raw.insert_many([{"_id": 1, "user_id": "u", "msg": "short", "from": "S", "ts": datetime(2026, 1, 1)},
                            {"_id": 2, "user_id": "u", "msg": "much too long text"}])
        sms, bad = st.fetch_pending("u", limit=10)
        assert [(s.raw_id, s.text, s.sender) for s in sms] == [(1, "short", "S")]
        assert [(m.raw_id, m.reason) for m in bad] == [(2, MALFORMED_TEXT_TOO_LONG)]
    finally:
        st.close()


def test_ids_of_any_bson_type_round_trip(store: Store):
    oid = ObjectId()
    store.raw.insert_many([{"_id": oid, "user_id": "u", "body": "a"},
                           {"_id": "5", "user_id": "u", "body": "b"},
                           {"_id": 5, "user_id": "u", "body": "c"}])
    sms, _ = store.fetch_pending("u", limit=10)
    assert {s.key: s.raw_id for s in sms} == {sms_key(oid): oid, "s:5": "5", "i:5": 5}
    assert store.mark_processed("u", [s.raw_id for s in sms], "b") == 3
    assert store.count_pending("u") == 0


# --------------------------------------------------------------------------- transactions
def test_upserting_the_same_items_twice_leaves_the_same_documents(store: Store):
    seed_sms(store, "u1", 3)
    items = [_item(0, "u1", _tx("100.50"), _tx("2.00", "credit")),
             _item(1, "u1", _tx("7.25")),
             _item(2, "u1", kind="otp")]
    store.upsert_transactions(items)
    first = store.transactions_for("u1")
    store.upsert_transactions(items)
    second = store.transactions_for("u1")
    strip = lambda docs: [{k: v for k, v in d.items() if k != "created_at"} for d in docs]  # noqa: E731
    assert strip(first) == strip(second)
    assert [d["_id"] for d in second] == [transaction_id("i:0", 0), transaction_id("i:0", 1),
                                          transaction_id("i:1", 0)]
    assert store.transactions.count_documents({}) == 3


def test_money_is_decimal128_with_exact_values(store: Store):
    big = Decimal("12345678901234567890.12")
    store.upsert_transactions([_item("sms-a", "u1", _tx(str(big), balance=Decimal("0.10"),
                                                        occurred_at="2026-08-30T20:20:52", channel="upi",
                                                        account_mask="XX1234", counterparty=None))])
    [doc] = store.transactions_for("u1")
    assert isinstance(doc["amount"], Decimal128) and doc["amount"].to_decimal() == big
    assert str(doc["amount"].to_decimal()) == "12345678901234567890.12"
    assert isinstance(doc["balance"], Decimal128) and str(doc["balance"].to_decimal()) == "0.10"
    assert doc["occurred_at"] == datetime(2026, 8, 30, 20, 20, 52, tzinfo=timezone.utc)
    assert doc["occurred_at_text"] == "2026-08-30T20:20:52"
    assert doc["sms_id"] == "sms-a" and doc["user_id"] == "u1" and doc["kind"] == "transaction"
    assert doc["channel"] == "upi" and doc["account_mask"] == "XX1234"
    assert "counterparty" not in doc and "card_mask" not in doc
    assert doc["source"]["model"] == "test-model" and doc["source"]["call_id"] == "call-1"
    assert doc["source"]["epoch"] == 0 and doc["source"]["owner"] == "host-a"
    # stored as BSON decimal on the server, not as a double
    assert store.transactions.count_documents({"amount": {"$type": "decimal"}}) == 1


def test_unparseable_occurred_at_keeps_only_the_text(store: Store):
    store.upsert_transactions([_item(1, "u1", _tx("1.00", occurred_at="30-08-26 20:20")),
                               _item(2, "u1", _tx("1.00", occurred_at="2026-08-30"))])
    docs = {d["sms_id"]: d for d in store.transactions_for("u1")}
    assert "occurred_at" not in docs[1] and docs[1]["occurred_at_text"] == "30-08-26 20:20"
    assert docs[2]["occurred_at"] == datetime(2026, 8, 30, tzinfo=timezone.utc)


def test_replace_stale_removes_transactions_the_new_answer_no_longer_has(store: Store):
    store.upsert_transactions([_item(1, "u1", _tx("1.00"), _tx("2.00"), _tx("3.00")),
                               _item(2, "u1", _tx("9.00"))])
    store.upsert_transactions([_item(1, "u1", _tx("1.50"))])            # default: no deletion
    assert store.transactions.count_documents({"sms_id": 1}) == 3
    store.upsert_transactions([_item(1, "u1", _tx("1.50"))], replace_stale=True)
    assert [(d["_id"], str(d["amount"].to_decimal())) for d in store.transactions_for("u1")] == [
        ("i:1#0", "1.50"), ("i:2#0", "9.00")]
    store.upsert_transactions([_item(2, "u1", kind="other")], replace_stale=True)
    assert [d["_id"] for d in store.transactions_for("u1")] == ["i:1#0"]


def test_mark_processed_counts_only_newly_marked(store: Store):
    seed_sms(store, "u1", 5)
    seed_sms(store, "u2", 2, start=100)
    assert store.mark_processed("u1", [0, 1, 2], "batch-1") == 3
    assert store.mark_processed("u1", [0, 1, 2, 3], "batch-2") == 1
    assert store.mark_processed("u1", [100, 101], "batch-2") == 0        # another user's SMS
    assert store.mark_processed("u1", [], "batch-2") == 0
    assert store.count_processed_in_batch("u1", "batch-1") == 3
    assert store.count_processed_in_batch("u1", "batch-2") == 1
    doc = store.raw.find_one({"_id": 0})
    assert doc["isprocessed"] is True and doc["smsd_batch_id"] == "batch-1"
    assert isinstance(doc["processed_at"], datetime)
    assert _ids(store.fetch_pending("u1", limit=10)[0]) == [4]
    assert store.user_summaries()["u1"] == {"total_sms": 5, "processed_sms": 4, "pending_sms": 1,
                                            "quarantined_sms": 0, "ungrounded_sms": 0}


def test_the_index_earlier_versions_kept_for_one_runs_count_is_dropped_and_the_count_still_uses_an_index(
        store: Store):
    # Each index of sms_fin_rawdata is written by every isprocessed update: the one that
    # served only a resumed run's count goes, and that count reads the user's processed SMS.
    store.raw.create_index([("user_id", 1), ("smsd_batch_id", 1)], name="smsd_processed_by_batch")
    seed_sms(store, "u1", 6)
    store.mark_processed("u1", [0, 1], "batch-1")
    store.ensure_indexes()
    store.ensure_indexes()   # nothing left to drop: no error
    names = set(store.raw.index_information())
    assert "smsd_processed_by_batch" not in names and IDX_PENDING in names
    assert store.count_processed_in_batch("u1", "batch-1") == 2
    # The count's aggregate, as count_documents sends it, reads the index.
    plan = store.raw.database.command(
        "aggregate", store.raw.name, pipeline=[{"$match": store_stats.processed_filter("u1", "batch-1")},
                                               {"$group": {"_id": 1, "n": {"$sum": 1}}}],
        hint=IDX_PENDING, explain=True)
    assert "COLLSCAN" not in str(plan) and "IXSCAN" in str(plan), plan
    store.raw.drop_index(IDX_PENDING)            # refused at start, say: the count still counts
    assert store.count_processed_in_batch("u1", "batch-1") == 2


def test_mark_processed_chunks_long_id_lists(store: Store):
    ids = seed_sms(store, "u1", 1203)
    assert store.mark_processed("u1", ids, "b") == 1203
    assert store.count_pending("u1") == 0


# --------------------------------------------------------------------------- checkpoints
def test_checkpoints_follow_the_seed_schema_and_never_go_backwards(store: Store):
    cp = store.checkpoint_start("u1", total_sms=10)
    # the seed guide's schema, plus the base of the per-user counters (smsd.store_stats)
    assert set(cp) == {"_id", "user_id", "batch_id", "total_sms", "processed_sms", "last_processed_id",
                       "checkpoint_timestamp", "status", "smsd_processed_before"}
    assert cp["_id"] == cp["batch_id"] and len(cp["batch_id"]) == 32 and cp["status"] == "in_progress"
    b = cp["batch_id"]
    store.checkpoint_progress("u1", b, processed_sms=6, total_sms=10, last_processed_id=5, status="in_progress")
    first = store.latest_checkpoint("u1")
    # a late replay of an older flush changes nothing
    store.checkpoint_progress("u1", b, processed_sms=3, total_sms=8, last_processed_id=2, status="in_progress")
    doc = store.latest_checkpoint("u1")
    assert (doc["processed_sms"], doc["total_sms"], doc["last_processed_id"]) == (6, 10, 5)
    assert doc["checkpoint_timestamp"] >= first["checkpoint_timestamp"]
    store.checkpoint_progress("u1", b, processed_sms=10, total_sms=None, last_processed_id=9, status="completed")
    store.checkpoint_progress("u1", b, processed_sms=7, total_sms=None, last_processed_id=6, status="in_progress")
    doc = store.latest_checkpoint("u1")
    assert (doc["processed_sms"], doc["total_sms"], doc["last_processed_id"], doc["status"]) == (
        10, 10, 9, "completed")
    assert store.checkpoints.count_documents({"user_id": "u1"}) == 1


def test_latest_checkpoint_is_the_newest_run(store: Store):
    assert store.latest_checkpoint("u1") is None
    old = store.checkpoint_start("u1", 5)
    time.sleep(0.01)
    new = store.checkpoint_start("u1", 7)
    assert new["batch_id"] != old["batch_id"]
    assert store.latest_checkpoint("u1")["batch_id"] == new["batch_id"]
    store.checkpoint_start("u2", 1)
    assert store.latest_checkpoint("u1")["batch_id"] == new["batch_id"]


def test_checkpoint_progress_keeps_odd_raw_ids_literal(store: Store):
    cp = store.checkpoint_start("u1", 1)
    store.checkpoint_progress("u1", cp["batch_id"], processed_sms=1, total_sms=1,
                              last_processed_id="$notAFieldPath", status="completed")
    assert store.latest_checkpoint("u1")["last_processed_id"] == "$notAFieldPath"
    with pytest.raises(ValueError):
        store.checkpoint_progress("u1", cp["batch_id"], processed_sms=1, total_sms=1,
                                  last_processed_id=None, status="done")


# --------------------------------------------------------------------------- durability / failures
def test_every_write_is_journaled_and_majority_on_a_replica_set(store: Store):
    for coll in (store.raw, store.transactions, store.checkpoints):
        wc = coll.write_concern.document
        assert wc["j"] is True
        assert wc["w"] == ("majority" if store.is_replica_set else 1)
    hello = store.raw.database.client.admin.command("hello")
    assert store.is_replica_set == bool(hello.get("setName"))


def test_store_is_not_connected_before_first_use():
    st = Store("mongodb://127.0.0.1:9", "nothing", timeout_ms=200)   # nothing listens on port 9
    assert st._client is None
    t0 = time.monotonic()
    assert st.ping() is False
    assert time.monotonic() - t0 < 3
    with pytest.raises(StoreUnavailable):
        st.count_pending("u")
    st.close()


def test_store_unavailable_while_the_server_is_dead_then_recovers_on_restart(own_mongo: EmbeddedMongo):
    st = Store(own_mongo.uri, "crash", timeout_ms=400)
    try:
        st.ensure_indexes()
        seed_sms(st, "u1", 4)
        st.upsert_transactions([_item(0, "u1", _tx("10.00"))])
        port, pid = own_mongo.port, own_mongo.pid
        own_mongo.kill()
        assert not own_mongo.alive()
        assert st.ping() is False
        calls = [
            lambda: st.fetch_pending("u1", limit=5),
            lambda: st.upsert_transactions([_item(1, "u1", _tx("1.00"))]),
            lambda: st.mark_processed("u1", [0], "b"),
            lambda: st.checkpoint_start("u1", 4),
            lambda: st.pending_users(),
        ]
        for call in calls:
            with pytest.raises(StoreUnavailable):
                call()
        own_mongo.start()
        assert own_mongo.port == port and own_mongo.pid != pid
        assert st.ping() is True
        # journaled writes made before the SIGKILL are all there
        assert st.count_pending("u1") == 4
        assert [d["_id"] for d in st.transactions_for("u1")] == ["i:0#0"]
        assert st.mark_processed("u1", [0], "b") == 1
    finally:
        st.close()


def test_embedded_restart_on_the_same_storage_keeps_data(tmp_path):
    mongo = EmbeddedMongo(tmp_path / "db")
    with mongo:
        client = pymongo.MongoClient(mongo.uri, serverSelectionTimeoutMS=3000)
        client.d.c.insert_one({"_id": 1, "v": Decimal128("1.10")})
        client.close()
        port = mongo.port
    assert not mongo.alive()
    mongo.start()
    try:
        assert mongo.port == port and mongo.alive()
        client = pymongo.MongoClient(mongo.uri, serverSelectionTimeoutMS=3000)
        assert client.d.c.find_one({"_id": 1})["v"] == Decimal128("1.10")
        client.close()
    finally:
        mongo.stop()
    assert not mongo.alive()


def test_missing_executable_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.delenv("SMSD_SECANTUSD", raising=False)
    monkeypatch.setattr(sys, "executable", str(tmp_path / "nope" / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedUnavailable, match=r"pip install 'smsd\[embedded\]'"):
        EmbeddedMongo(tmp_path / "db").start()
    assert embedded.free_port() > 0


# --------------------------------------------------------------------------- index use
def _stages(plan: dict) -> list[tuple[str, str | None]]:
    out = [(plan.get("stage"), plan.get("indexName"))]
    for key in ("inputStage", "queryPlan"):
        if isinstance(plan.get(key), dict):
            out += _stages(plan[key])
    for child in plan.get("inputStages", []) or []:
        out += _stages(child)
    return out


def _winning(explain: dict) -> list[tuple[str, str | None]]:
    if "queryPlanner" in explain:
        return _stages(explain["queryPlanner"]["winningPlan"])
    stage0 = explain["stages"][0]["$cursor"]
    return _stages(stage0["queryPlanner"]["winningPlan"])


def test_pending_query_and_checkpoint_lookup_are_index_served(store: Store):
    seed_sms(store, "u1", 30)
    seed_sms(store, "u2", 30, start=100)
    store.mark_processed("u1", list(range(10)), "b")
    store.checkpoint_start("u1", 30)
    store.upsert_transactions([_item(10, "u1", _tx("1.00"))])

    plan = _winning(store.raw.find(store.pending_filter("u1"), {"body": 1}).sort("_id", 1).limit(5).explain())
    assert ("IXSCAN", IDX_PENDING) in plan and not any(s == "COLLSCAN" for s, _ in plan), plan
    plan = _winning(store.checkpoints.find({"user_id": "u1"}).sort("checkpoint_timestamp", -1).limit(1).explain())
    assert ("IXSCAN", IDX_LATEST_CHECKPOINT) in plan, plan
    plan = _winning(store.transactions.find({"user_id": "u1", "sms_id": {"$in": [10, 11]}}).explain())
    assert ("IXSCAN", IDX_TX_BY_SMS) in plan, plan


# --------------------------------------------------------------------------- licence boundary
def test_smsd_never_imports_secantus():
    offenders = []
    for path in (ROOT / "smsd").rglob("*.py"):
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            stripped = line.strip()
            if stripped.startswith(("import secantus", "from secantus")) or "__import__(\"secantus" in stripped \
                    or "import_module(\"secantus" in stripped or "import_module('secantus" in stripped:
                offenders.append(f"{path.relative_to(ROOT)}:{no}: {stripped}")
    assert offenders == []
    code = ("import sys, smsd.store, smsd.embedded, smsd.model; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('secantus', 'secantusdb')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
