"""MongoDB commands of a user's turn, counted with pymongo's command monitoring.

The flush is grouped (one bulk upsert, one update_many, one checkpoint update for
all the answers it writes) and the stale-document find is paid only by a replay.
Every command is counted by name and collection, so that a new one shows up here
by what it is.  The LLM bill (issue 14) adds at most three per turn, one for each
of its collections: the answer-cache lookup before a call (``find
smsd_answer_cache``), the cache fill from the flushed answers (``update
smsd_answer_cache``, ``$setOnInsert``) and the journal's changed ledger rows
(``smsd_llm_costs``, ``$max``).  A user's first counters and a ledger row new to
MongoDB are inserts (``insert smsd_user_stats``, ``insert smsd_llm_costs``): an
insert costs the server a fraction of an update statement, and the store's write is
the one the upsert would make.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from smsd.config import Settings
from smsd.journal import Journal
from smsd.lab.mongo_ops import count_group_turns, count_turns, count_worker_turns, seed_users
from smsd.model import SmsResult, Transaction, Usage, sms_key
from smsd.store import Store

USERS = 4


@pytest.fixture
def settings(tmp_path, mongo_server, mongo_db_name, make_llm_server) -> Settings:
    llm = make_llm_server(extractor="rules")
    s = Settings()
    s.mongo.uri, s.mongo.db, s.mongo.timeout_ms = mongo_server.uri, mongo_db_name, 3000
    s.llm.base_url, s.llm.model, s.llm.api_key = llm.url, "smsd-local", "unused"
    s.journal.state_dir = str(tmp_path / "state")
    Store(mongo_server.uri, mongo_db_name).ensure_indexes()
    return s


def users() -> list[str]:
    return [f"user-{u:05d}" for u in range(USERS)]


def test_a_turn_of_three_sms_flushes_once_with_no_extra_reads(settings):
    seed_users(settings.mongo.uri, settings.mongo.db, USERS, 3)
    counts = count_turns(settings, users(), keep_client=True, by_collection=True)
    per_turn = {k: v / USERS for k, v in counts.items()}
    assert per_turn == {
        # The pending count at the start and the counters' base (a user's first run
        # counts its processed SMS once: smsd.store_stats).  None at the last flush: its
        # page was short and everything in it is flushed, so nothing was left pending (also
        # when that flush took the answer before the main loop collected the call's future).
        "aggregate sms_fin_rawdata": 2,
        "find processing_checkpoints": 1,       # the latest checkpoint
        "find sms_fin_rawdata": 1,              # one (short) page: no empty page, no stale find
        "find smsd_answer_cache": 1,            # the page's texts looked up before the one call
        "insert processing_checkpoints": 1,     # the run's checkpoint
        "update financial_transactions": 1,     # the flush's one bulk upsert
        "update sms_fin_rawdata": 1,            # its one update_many of isprocessed
        "findAndModify processing_checkpoints": 1,   # its one checkpoint update
        "insert smsd_user_stats": 1,            # the user's first counters, from that checkpoint
        "insert smsd_answer_cache": 1,          # the flushed answers fill the cache
        "insert smsd_llm_costs": 1,             # the journal's ledger row, new to MongoDB
        "hello": 1 / USERS}                     # one client for every turn
    # Each journal notes its run, so the next turn's checkpoint read is bounded (smsd.journal_runs).
    from smsd import journal_runs
    store = Store(settings.mongo.uri, settings.mongo.db)
    try:
        for user in users():
            with Journal.open(settings.state_dir, user) as journal:
                noted = journal_runs.latest_run_at(journal)
            latest = store.latest_checkpoint(user)
            assert noted is not None and store.latest_checkpoint(user, since=noted)["_id"] == latest["_id"]
    finally:
        store.close()


def test_a_replay_of_several_answers_is_one_flush_with_the_stale_find(settings):
    seed_users(settings.mongo.uri, settings.mongo.db, 1, 3)
    user = users()[0]
    store = Store(settings.mongo.uri, settings.mongo.db)
    page, _ = store.fetch_pending(user, limit=10)
    store.close()
    # A previous process journaled three answers (one call each) and died before the flush.
    with Journal.open(settings.state_dir, user) as journal:
        for sms in page:
            call = journal.begin_call([(sms.key, sms.raw_id)], owner="", epoch=0, model="m")
            tx = Transaction.from_json({"direction": "debit", "amount": "1.00", "currency": "INR"})
            journal.record_answer(call, [(sms.raw_id, SmsResult(key=sms_key(sms.raw_id),
                                                                kind="transaction",
                                                                transactions=(tx,)))],
                                  failed={}, request_id=None, usage=Usage())
    counts = count_turns(settings, [user], keep_client=True, by_collection=True)
    assert counts == {
        "aggregate sms_fin_rawdata": 2,         # as above: the empty page ends the count
        "find processing_checkpoints": 1,
        # One stale-document find for the three replayed answers, then one page, empty:
        # every SMS is answered, so no LLM call and no answer-cache lookup.
        "find financial_transactions": 1,
        "find sms_fin_rawdata": 1,
        "insert processing_checkpoints": 1,
        "update financial_transactions": 1,     # the three answers in one flush
        "update sms_fin_rawdata": 1,
        "findAndModify processing_checkpoints": 1,
        "insert smsd_user_stats": 1,
        # The dead process's ledger row (three calls) reaches MongoDB with the replay.  No
        # cache fill: those calls were journaled without their texts' cache keys.
        "insert smsd_llm_costs": 1,
        "hello": 1}
    with Journal.open(settings.state_dir, user) as journal:
        assert journal.unflushed_count() == 0
    assert Path(settings.state_dir).is_dir()


def test_a_new_users_worker_turn_takes_its_lease_in_one_command_and_stamps_nothing(settings):
    # A pre-forked worker's whole turn: the lease and the fenced store on top of the
    # pipeline's commands above.  A user nobody held before gets epoch 1 from one
    # findAndModify (upsert) and needs no stamp: no writer can carry a lower epoch.
    seed_users(settings.mongo.uri, settings.mongo.db, USERS, 3)
    counts = count_worker_turns(settings, users(), by_collection=True)
    per_turn = {k: v / USERS for k, v in counts.items() if k != "hello"}
    assert per_turn == {
        "findAndModify smsd_leases": 1,          # the take (epoch 1, born stamped)
        "update smsd_leases": 1,                 # the release at the turn's end
        "update sms_fin_rawdata": 1,             # isprocessed (its own fresh answers: no claim)
        "aggregate sms_fin_rawdata": 2,
        "find processing_checkpoints": 1,
        "find sms_fin_rawdata": 1,
        "find smsd_handover": 1,                 # answers another host handed over, if any
        "find smsd_answer_cache": 1,
        # The run's checkpoint and the flush's transactions are written by one aggregate
        # each on the lease ($merge, the server checks our epoch), each proved by one read
        # of the lease, still at our epoch (nothing stored needs counting).
        "aggregate smsd_leases": 2,
        "find smsd_leases": 2,
        "findAndModify processing_checkpoints": 1,
        "insert smsd_user_stats": 1,
        "insert smsd_answer_cache": 1,
        "insert smsd_llm_costs": 1}
    # The server's clock offset is measured once per client, not once per turn.
    assert counts.get("hello", 0) <= 2


def test_a_backfill_turn_gathers_its_answers_into_page_flushes(settings):
    # 250 SMS: a page of 200 and a short one of 50, ten calls of 25.  The wait bound is
    # raised so that only the page bound and the turn's end start a flush (a loaded host
    # could otherwise let 0.5 s pass between two answers).  Gathering off, for contrast:
    # a flush per answered call, as before gathered flushes.
    seed_users(settings.mongo.uri, settings.mongo.db, 2, 250)
    settings.llm.batch_size = 25
    settings.pipeline.flush_max_wait_ms = 60_000
    gathered = count_turns(settings, [users()[0]], keep_client=True, by_collection=True)
    settings.pipeline.flush_gather_sms = 1
    every = count_turns(settings, [users()[1]], keep_client=True, by_collection=True)
    flushes = gathered["update financial_transactions"]
    # The page's flush, then the turn's end (one, if the last answers came before it).
    assert flushes in (1, 2)
    assert gathered["update sms_fin_rawdata"] == gathered["findAndModify processing_checkpoints"] == flushes
    assert gathered["insert smsd_answer_cache"] == flushes
    assert gathered["find smsd_answer_cache"] == 2           # one lookup per page, not per call
    assert gathered["find sms_fin_rawdata"] == 2             # the two pages
    assert every["update financial_transactions"] >= 5       # about one per call of 25
    assert sum(gathered.values()) < sum(every.values()) - 3 * 4


#: The commands of a group turn's flush (everything after the combined LLM call).
FLUSH = {
    "update sms_fin_rawdata": 1,                 # isprocessed (fresh answers need no claim)
    "find financial_transactions": 0,            # nothing stored needs counting: ...
    "find smsd_leases": None,                    # ... the leases, read once, are at their epochs
                                                 # (with the turns' starts: not pinned)
    "update processing_checkpoints": 1,          # the checkpoints' progress ...
    "find processing_checkpoints": None,         # ... not read back for runs the prologue opened
    "insert smsd_user_stats": 1,                 # the users' first counters
    "insert smsd_answer_cache": 1,               # the flushed answers into the cache
    "insert smsd_llm_costs": 1,                  # the ledger rows, new to MongoDB
    "aggregate financial_transactions": 0,       # no per-user count after the $merge
    "findAndModify processing_checkpoints": 0,   # no per-user checkpoint update
}


@pytest.mark.parametrize("members", [2, 6])
def test_a_group_turns_flush_costs_the_same_commands_whatever_its_number_of_members(settings, members):
    # One group turn of `members` users x 3 SMS: one combined LLM call (18 SMS at most, a call
    # holds 25), then every member flushes at the same moment.  The long write wait makes
    # the batches close because every member is in, never because time ran out.
    settings.pipeline.trickle_group_max_users = members
    settings.pipeline.group_write_wait_ms = 5000
    # ...and one combined LLM call even on a loaded host: a member that asks late would
    # get a call of its own, and flush on its own.
    settings.pipeline.trickle_wait_ms = 5000
    seed_users(settings.mongo.uri, settings.mongo.db, members, 3)
    group = [f"user-{u:05d}" for u in range(members)]
    counts = count_group_turns(settings, group, by_collection=True)
    assert {k: counts.get(k, 0) for k, n in FLUSH.items() if n is not None} == \
        {k: n for k, n in FLUSH.items() if n is not None}, counts
    # New users: the prologue reads the runs it inserted once (which are stored at their
    # epoch), and the flush reads none back for the counters: each member knows the run
    # the prologue opened for it, which nobody else can have written.
    assert counts["find processing_checkpoints"] == 1, counts
