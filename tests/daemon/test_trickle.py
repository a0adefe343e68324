"""Trickle batching: small users share a worker's turn and their LLM calls.

End to end with real parts: `smsd run` subprocesses, the local LLM server (the
openai SDK over HTTP, usage billed with the real tokenizer), a SecantusDB
server process; the crash is a real SIGKILL at a failpoint.
"""
from __future__ import annotations

from decimal import Decimal

from smsd.combiner import split_counts, split_usage
from smsd.journal_scan import scan
from smsd.lab.invariants import verify
from smsd.model import Usage, sms_key
from smsd.scheduler import UserState, group_turns

from ..harness import Daemon, seed, wait_for, write_config
from .test_ledger import list_price

USERS, EACH = 5, 2


def test_usage_shares_sum_exactly_and_never_cache_more_than_they_prompt():
    assert split_counts(10, [1, 1, 1]) == [4, 3, 3]
    assert split_counts(0, [2, 5]) == [0, 0]
    for usage in (Usage(1301, 417, 1024), Usage(1301, 417, 1301), Usage(7, 3, 0)):
        shares = split_usage(usage, [2, 1, 3, 2, 2])
        assert sum(s.prompt_tokens for s in shares) == usage.prompt_tokens
        assert sum(s.cached_tokens for s in shares) == usage.cached_tokens
        assert sum(s.completion_tokens for s in shares) == usage.completion_tokens
        assert all(s.cached_tokens <= s.prompt_tokens for s in shares)


def test_small_users_are_grouped_up_to_a_call_and_big_users_keep_their_own_turn():
    def user(name: str, pending: int) -> UserState:
        return UserState(name, info={"pending_sms": pending})
    users = [user("a", 2), user("big", 400), user("b", 3), user("c", 1), user("d", 20), user("e", 2)]
    turns = group_turns(users, room=2, most=3, call_sms=25)
    assert [[u.user_id for u in t] for t in turns] == [["a", "b", "c"], ["big"]]
    # A user whose last turn crashed gets a turn alone: a poison SMS cannot crash-loop a group.
    users[2].consecutive_crashes = 1
    turns = group_turns(users, room=3, most=3, call_sms=25)
    assert [[u.user_id for u in t] for t in turns] == [["a", "c", "d"], ["big"], ["b"]]
    users[2].consecutive_crashes = 0
    # Two calls' worth: the group takes users up to 50 pending SMS, each still under one call.
    turns = group_turns(users, room=2, most=5, call_sms=25, calls=2)
    assert [[u.user_id for u in t] for t in turns] == [["a", "b", "c", "d", "e"], ["big"]]
    turns = group_turns(users + [user("f", 24), user("g", 3)], room=2, most=9, call_sms=25, calls=2)
    assert [[u.user_id for u in t] for t in turns] == [["a", "b", "c", "d", "e", "g"], ["big"]]
    # Packed as the combiner packs its calls: six 4-SMS users fill a call of 25 (24 SMS),
    # so four calls' worth is 24 such users, not 25 (a 25th would cost a fifth call).
    many = [user(f"m{i:02d}", 4) for i in range(30)]
    turns = group_turns(many, room=2, most=48, call_sms=25, calls=4)
    assert [len(t) for t in turns] == [24, 6]
    # Off (most = 1): one user per turn, fairest first, as before.
    assert [[u.user_id for u in t] for t in group_turns(users, room=2, most=1, call_sms=25)] == [["a"], ["big"]]


def _config(tmp_path, mongo_server, mongo_db_name, server, **supervisor):
    return write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                        llm={"model": "gpt-4o-mini", "batch_size": 25, "concurrency": 1},
                        pipeline={"trickle_group_max_users": 8, "trickle_wait_ms": 3000},
                        supervisor={"max_workers": 1, **supervisor})


def _seed(db) -> dict:
    expected = {}
    for u in range(USERS):
        expected.update(seed(db, f"t{u}", EACH, start=u * EACH))
    return expected


def _done(d, db) -> dict:
    return wait_for(lambda: (lambda s: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == USERS * EACH
                             and not s["workers"] and s["journal"]["unflushed"] == 0 and s)(d.status()),
                    timeout=90, what="every SMS processed, workers idle")


def test_a_group_turn_fills_one_call_for_several_users_and_the_ledger_adds_up(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server(prefix_cache=True)
    expected = _seed(db)
    d = Daemon(_config(tmp_path, mongo_server, mongo_db_name, server), tmp_path)
    try:
        _done(d, db)
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    assert "took users t" in out, out[-3000:]
    stats = server.stats()
    assert 1 <= stats["calls"] < USERS, stats["calls"]   # fewer calls than users
    report = verify(db, expected, state_dir=tmp_path / "state", billed=stats["billed"])
    assert report.ok, report.to_dict()
    journals = scan(tmp_path / "state")
    assert sorted(journals) == [f"t{u}" for u in range(USERS)]
    # Each user's ledger holds its share; the shares add up to exactly what the server billed.
    usage = stats["usage_log"]
    for key in ("prompt_tokens", "completion_tokens", "cached_tokens"):
        assert sum(j[key] for j in journals.values()) == sum(u[key] for u in usage), key
    billed_usd = sum((list_price(u) for u in usage), Decimal(0))
    assert sum((Decimal(j["cost_usd"]) for j in journals.values()), Decimal(0)) == billed_usd > 0
    assert all(j["paid_sms"] == EACH and j["repeated_calls"] == 0 for j in journals.values())
    mongo_usd = sum((doc["cost_usd"].to_decimal() for doc in db.smsd_llm_costs.find()), Decimal(0))
    assert mongo_usd == billed_usd


def test_a_kill_between_the_users_commits_re_asks_only_that_call(
        tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server()
    expected = _seed(db)
    config = _config(tmp_path, mongo_server, mongo_db_name, server, restart_backoff=60.0)
    d = Daemon(config, tmp_path, SMSD_FAILPOINT="group_between_commits")
    try:
        st = wait_for(lambda: (lambda s: any(u.get("last_exit") == "signal 9" for u in s["users"]) and s)(
            d.status()), timeout=60, what="the group turn killed")
        # The group's death is a crash of each of its users: each backs off (60 s here).
        assert sorted((u["user_id"], u["restarts"], u["last_exit"]) for u in st["users"]) == [
            (f"t{u}", 1, "signal 9") for u in range(USERS)]
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    assert server.stats()["calls"] == 1
    crashed = scan(tmp_path / "state")
    committed = [u for u, j in crashed.items() if j["answered_sms"]]
    lost = [u for u, j in crashed.items() if j["sent_calls"] and not j["answered_sms"]]
    assert len(committed) == 1 and len(lost) == USERS - 1, crashed   # the first user's commit, only

    d = Daemon(config, tmp_path)
    try:
        _done(d, db)
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    stats = server.stats()
    report = verify(db, expected, state_dir=tmp_path / "state", billed=stats["billed"])
    assert report.ok, report.to_dict()
    assert report.repeats_unexplained == 0
    journals = scan(tmp_path / "state")
    # Nothing lost, and only the killed call asked again: once more for the users whose commit it lost.
    for raw_id in expected:
        user = db.sms_fin_rawdata.find_one({"_id": raw_id})["user_id"]
        assert stats["billed"][sms_key(raw_id)] == (1 if user in committed else 2), user
    assert journals[committed[0]]["repeated_calls"] == 0
    assert all(journals[u]["repeated_calls"] == 1 for u in lost)
