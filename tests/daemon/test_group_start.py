"""A group turn's prologue and epilogue (smsd.group_start): the members' journals, leases
and first reads done once for the group, each member behaving as if it had read for itself.

Real parts: a SecantusDB server process, the local LLM server over HTTP (the
openai SDK), the real worker code run in this process (``run_group`` with
``_turn``), and for the crash a real ``smsd run`` killed by SIGKILL at the
prologue's failpoint.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import datetime, timedelta, timezone

from smsd import worker
from smsd.config import Settings
from smsd.journal import Journal
from smsd.journal_scan import scan
from smsd.lab.invariants import verify
from smsd.lab.mongo_ops import count_group_prologue
from smsd.lease import LEASES_COLLECTION
from smsd.model import SmsResult, Transaction, Usage, sms_key
from smsd.store import Store
from smsd.worker_group import run_group

from ..harness import Daemon, seed, wait_for, write_config


def _settings(tmp_path, mongo_server, mongo_db_name, server, **pipeline) -> Settings:
    s = Settings()
    s.mongo.uri, s.mongo.db, s.mongo.timeout_ms = mongo_server.uri, mongo_db_name, 3000
    s.llm.base_url, s.llm.model, s.llm.api_key = server.url, "smsd-test", "unused"
    s.llm.key_header, s.llm.batch_size = True, 25
    s.journal.state_dir = str(tmp_path / "state")
    s.pipeline.trickle_wait_ms = 200
    for key, value in pipeline.items():
        setattr(s.pipeline, key, value)
    Store(mongo_server.uri, mongo_db_name).ensure_indexes()
    return s


def _group(settings: Settings, users: list[str]) -> dict[str, int]:
    """One group turn of ``users`` as a worker runs it; ``{user: turn_over code}``."""
    store = worker.make_store(settings, fenced=True)
    extractor = worker.make_extractor(settings)
    read_fd, write_fd = os.pipe()
    lines: list[dict] = []

    def drain() -> None:
        buf = b""
        for chunk in iter(lambda: os.read(read_fd, 65536), b""):
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines.extend(json.loads(x) for x in done if x)
    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    reporter = worker._Reporter(write_fd, os.getppid())
    try:
        run_group(settings, users, store, extractor, reporter, threading.Event(), threading.Event(),
                  worker._turn)
    finally:
        store.close()
        os.close(write_fd)
        reader.join(5)
        os.close(read_fd)
    return {m["turn_over"]: m["code"] for m in lines if "turn_over" in m}


def _verified_once(db, expected: dict, tmp_path, server) -> None:
    """Every invariant holds for ``expected``, and each of its SMS was paid exactly once."""
    billed = server.stats()["billed"]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=billed)
    assert report.ok, report.to_dict()
    assert report.repeats_unexplained == 0
    assert all(billed[sms_key(k)] == 1 for k in expected), billed


def _three(db, prefix: str) -> tuple[list[str], dict]:
    """Three users with two SMS each: their ids, and raw _id -> expected answer."""
    users, expected = [f"{prefix}{u}" for u in range(3)], {}
    for i, user in enumerate(users):
        expected.update(seed(db, user, 2, start=i * 2))
    return users, expected


def test_a_member_held_by_another_host_is_handed_over_and_the_others_complete(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server()
    settings = _settings(tmp_path, mongo_server, mongo_db_name, server)
    users, expected = _three(db, "g")
    # g1's journal holds a paid answer its lost lease kept it from flushing: handed over.
    raw_id = db.sms_fin_rawdata.find_one({"user_id": "g1"})["_id"]
    tx = Transaction.from_json({"direction": "debit", "amount": "1.00", "currency": "INR"})
    with Journal.open(settings.state_dir, "g1") as journal:
        call = journal.begin_call([(sms_key(raw_id), raw_id)], owner="", epoch=0, model="m")
        journal.record_answer(call, [(raw_id, SmsResult(key=sms_key(raw_id), kind="transaction",
                                                        transactions=(tx,)))],
                              failed={}, request_id=None, usage=Usage())
    held_until = datetime.now(timezone.utc) + timedelta(seconds=60)
    db[LEASES_COLLECTION].insert_one({"_id": "g1", "owner": "other-host", "epoch": 4,
                                      "expires_at": held_until, "stamped": True})
    codes = _group(settings, users)
    assert codes == {"g0": worker.EXIT_DONE, "g1": worker.EXIT_LEASED, "g2": worker.EXIT_DONE}
    # The other host's lease is untouched; ours are released (expired) by the epilogue.
    leases = {d["_id"]: d for d in db[LEASES_COLLECTION].find()}
    now = datetime.now(timezone.utc).replace(tzinfo=None)   # the db fixture reads naive UTC
    assert (leases["g1"]["owner"], leases["g1"]["epoch"]) == ("other-host", 4)
    assert leases["g1"]["expires_at"] > now
    for u in ("g0", "g2"):
        assert leases[u]["owner"] != "other-host" and leases[u]["epoch"] == 1
        assert leases[u]["expires_at"] < now - timedelta(days=1000)
    mine = {k: v for k, v in expected.items() if db.sms_fin_rawdata.find_one({"_id": k})["user_id"] != "g1"}
    _verified_once(db, mine, tmp_path, server)
    assert db.sms_fin_rawdata.count_documents({"user_id": "g1", "isprocessed": True}) == 0
    assert [d["_id"] for d in db.smsd_handover.find({"user_id": "g1"})] == [sms_key(raw_id)]


def test_a_member_whose_journal_is_locked_is_reported_locked_and_the_others_complete(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server()
    settings = _settings(tmp_path, mongo_server, mongo_db_name, server)
    users, expected = _three(db, "j")
    with Journal.open(settings.state_dir, "j1"):   # another process of this host holds it
        codes = _group(settings, users)
    assert codes == {"j0": worker.EXIT_DONE, "j1": worker.EXIT_LOCKED, "j2": worker.EXIT_DONE}
    assert db[LEASES_COLLECTION].find_one({"_id": "j1"}) is None   # never taken
    # The locked user is served by its next turn, a single one: nothing asked twice.
    assert _group(settings, ["j1"]) == {"j1": worker.EXIT_DONE}
    _verified_once(db, expected, tmp_path, server)


def test_a_member_the_combined_read_cut_off_reads_for_itself_and_completes(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server, caplog):
    server = make_llm_server()
    # Pages of 2: the combined read asks for 2 per member (6) and there are 8 pending SMS.
    settings = _settings(tmp_path, mongo_server, mongo_db_name, server, page_size=2)
    # c-big's SMS have the oldest _ids: they fill the read; the first is malformed, and is
    # quarantined from the pre-read page as from its own read.
    bad = db.sms_fin_rawdata.insert_one({"user_id": "c-big", "body": "   ", "isprocessed": False}).inserted_id
    expected = seed(db, "c-big", 6)
    expected.update(seed(db, "c-a", 1, start=6))
    expected.update(seed(db, "c-b", 1, start=7))
    with caplog.at_level(logging.INFO, logger="smsd.worker"):
        codes = _group(settings, ["c-big", "c-a", "c-b"])
    fell_back = {r.args[0] for r in caplog.records if "reads its own first page" in r.getMessage()}
    assert fell_back and "c-big" not in fell_back, caplog.text
    # c-big had more than one page: its turn ends with more to do, the next turn finishes it.
    for _ in range(5):
        if all(c == worker.EXIT_DONE for c in codes.values()):
            break
        codes = _group(settings, [u for u, c in codes.items() if c != worker.EXIT_DONE])
    assert all(c == worker.EXIT_DONE for c in codes.values()), codes
    _verified_once(db, expected, tmp_path, server)
    assert db.sms_fin_rawdata.find_one({"_id": bad})["smsd_quarantine"]["reason"].startswith("malformed")


def test_a_group_of_small_users_is_asked_in_one_call(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    """Twelve users with two SMS each: one call of 24 SMS, not one per user (the prefix is
    paid per call).  Every member joins the combiner before any member's thread starts."""
    server = make_llm_server()
    settings = _settings(tmp_path, mongo_server, mongo_db_name, server, trickle_wait_ms=3000)
    users = [f"one-{u:02d}" for u in range(12)]
    expected = {}
    for n, u in enumerate(users):
        expected.update(seed(db, u, 2, start=2 * n))
    assert set(_group(settings, users).values()) == {worker.EXIT_DONE}
    assert server.stats()["calls"] == 1      # 24 SMS: one call of llm.batch_size 25
    _verified_once(db, expected, tmp_path, server)


def test_the_group_read_merges_sms_with_isprocessed_false_and_missing_in_id_order(store):
    """The contract's "missing counts as false": a user whose collector sets the field on
    some SMS only gets them all, oldest first; ids Python cannot order as MongoDB does
    (an int and a string) leave that user to its own read."""
    from bson import ObjectId

    from smsd.group_reads import pending_pages
    ids = [ObjectId() for _ in range(6)]
    raw = store.raw
    raw.insert_many([{"_id": i, "user_id": "m-mixed", "body": f"Rs {n} debited", **(
        {"isprocessed": False} if n % 2 else {})} for n, i in enumerate(ids)])
    raw.insert_many([{"_id": f"s{n}", "user_id": "m-unset", "body": "Rs 1 debited"} for n in range(3)])
    raw.insert_many([{"_id": 7, "user_id": "m-odd", "body": "Rs 1 debited", "isprocessed": False},
                     {"_id": "seven", "user_id": "m-odd", "body": "Rs 1 debited"}])
    raw.insert_one({"_id": ObjectId(), "user_id": "m-mixed", "body": "done", "isprocessed": True})
    docs, complete = pending_pages(store, dict.fromkeys(["m-mixed", "m-unset", "m-odd"], 200))
    assert [d["_id"] for d in docs["m-mixed"]] == ids
    assert [d["_id"] for d in docs["m-unset"]] == ["s0", "s1", "s2"]
    assert complete == {"m-mixed", "m-unset"} and docs["m-odd"] == []


def test_the_group_read_of_pending_sms_is_served_by_an_index(store, seed):
    """Two ``$in`` in one filter (users, and "false or missing") made the server scan the
    whole collection on every group turn; each of the two reads is one ``$in``."""
    from smsd.group_reads import pending_filters
    seed("x1", 3)
    seed("x2", 3, start=3)
    db = store._database()
    for flt in pending_filters(["x1", "x2"]):
        plan = db.command("explain", {"find": "sms_fin_rawdata", "filter": flt, "sort": {"_id": 1}})
        winning = json.dumps(plan["queryPlanner"]["winningPlan"], default=str)
        assert "IXSCAN" in winning and "COLLSCAN" not in winning, winning


def test_the_prologue_costs_the_same_commands_for_three_members_as_for_twelve(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    from smsd.lab.mongo_ops import seed_users
    server = make_llm_server(extractor="rules")
    settings = _settings(tmp_path, mongo_server, mongo_db_name, server)
    seed_users(mongo_server.uri, mongo_db_name, 15, 3)
    users = [f"user-{u:05d}" for u in range(15)]
    three = count_group_prologue(settings, users[:3], by_collection=True)
    twelve = count_group_prologue(settings, users[3:], by_collection=True)
    three.pop("hello", None), twelve.pop("hello", None)   # the driver's own, once per client
    assert three == twelve, (three, twelve)
    # Leases: read, insert the new ones, read back; checkpoints: latest, insert, read back;
    # pending SMS: two index-served reads; processed counts, handovers, answer cache.
    assert sum(twelve.values()) <= 12, sorted(twelve.items())
    assert twelve["find sms_fin_rawdata"] == 2 and twelve["insert smsd_leases"] == 1, sorted(twelve.items())
    assert "update smsd_leases" not in twelve     # new leases are inserted, not upserted
    # Every member's run was opened by the prologue, at epoch 1 (born stamped).
    assert db.processing_checkpoints.count_documents({"user_id": {"$in": users}}) == 15


def test_a_kill_in_the_prologue_after_the_leases_are_taken_loses_nothing_and_asks_nothing_twice(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server()
    expected = {}
    for u in range(4):
        expected.update(seed(db, f"k{u}", 2, start=u * 2))
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                          llm={"model": "gpt-4o-mini", "batch_size": 25, "concurrency": 1},
                          pipeline={"trickle_group_max_users": 8, "trickle_wait_ms": 500},
                          supervisor={"max_workers": 1, "restart_backoff": 0.5},
                          lease={"ttl": 60.0})
    d = Daemon(config, tmp_path, SMSD_FAILPOINT="group_leases_taken")
    try:
        wait_for(lambda: any(u.get("last_exit") == "signal 9" for u in d.status()["users"]),
                 timeout=60, what="the group turn killed in its prologue")
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    assert server.stats()["calls"] == 0
    # The leases stay taken by this host (not expired yet): its next turn takes them back at once.
    assert db[LEASES_COLLECTION].count_documents({"expires_at": {"$gt": datetime.now(timezone.utc)}}) >= 1
    restarted = time.monotonic()
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: (lambda s: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == len(expected)
                          and not s["workers"] and s["journal"]["unflushed"] == 0)(d.status()),
                 timeout=90, what="every SMS processed, workers idle")
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    # Done well within the 60 s lease: this host took its own leases back at once.
    assert time.monotonic() - restarted < 40
    _verified_once(db, expected, tmp_path, server)
    assert {d["epoch"] for d in db[LEASES_COLLECTION].find()} == {1}   # taken back, no new epoch
    assert sorted(scan(tmp_path / "state")) == [f"k{u}" for u in range(4)]
