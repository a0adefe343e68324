"""A group turn's flush writes, coalesced (smsd.group_writes), against the real MongoDB-wire server.

The members are real fenced stores of their own (their own clients, their own
epochs) flushing in threads at the same moment, as a group turn's pipelines
do; the end-to-end crash runs `smsd run` and SIGKILLs it inside a combined write.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

import pytest

from smsd.fencing import EPOCH_FIELD, FencedStore
from smsd.group_writes import GroupWrites
from smsd.journal_scan import scan
from smsd.lab.invariants import verify
from smsd.lab.mongo_ops import counter
from smsd.lease import Leases
from smsd.model import FlushItem, Provenance, SmsResult, Transaction, sms_key
from smsd.pipeline import StaleEpoch

from ..harness import Daemon, seed as seed_fixture_sms, wait_for, write_config

EACH = 3


def _item(raw_id, user_id) -> FlushItem:
    tx = Transaction.from_json({"direction": "debit", "amount": "12.34", "currency": "INR"})
    result = SmsResult(key=sms_key(raw_id), kind="transaction", transactions=(tx,))
    prov = Provenance(call_id=f"c-{user_id}", model="m", request_id=None,
                      answered_at=datetime.now(timezone.utc), owner="host-a", epoch=1)
    return FlushItem(raw_id=raw_id, user_id=user_id, result=result, provenance=prov)


class _Group:
    """Members of one group turn: a fenced store each (its own client and epoch), joined to one
    GroupWrites; a member counts as elsewhere once its thread is over."""

    def __init__(self, mongo_server, db_name: str, epochs: dict[str, int], wait_s: float = 10.0,
                 answer_wait_s: float = 0.0) -> None:
        # Long: the batches close because everyone is in, not by time.
        self.writes = GroupWrites(wait_s, answer_wait_s)
        self.done = {u: threading.Event() for u in epochs}
        self.answering = {u: threading.Event() for u in epochs}   # set: its LLM call is in flight
        self.stores = {}
        for user, epoch in epochs.items():
            base = FencedStore(mongo_server.uri, db_name, timeout_ms=3000)
            base.set_epoch(epoch)
            self.stores[user] = self.writes.join(base, user, self.done[user].is_set,
                                                 self.answering[user].is_set)

    def run(self, work) -> dict:
        """``work(user, store)`` in one thread per member, at once; each member's result or exception."""
        out: dict = {}

        def one(user: str) -> None:
            try:
                out[user] = work(user, self.stores[user])
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                out[user] = exc
            finally:
                self.done[user].set()
        threads = [threading.Thread(target=one, args=(u,)) for u in self.stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        for s in self.stores.values():
            s.close()
        return out


def _flush(ids: dict, runs: dict):
    """A pipeline's flush of one user's answers, in its order: claim, transactions,
    isprocessed, checkpoint (invariants 2-4)."""
    def work(user: str, store) -> int:
        items = store.claim([_item(i, user) for i in ids[user]])
        store.upsert_transactions(items)
        newly = store.mark_processed(user, [i.raw_id for i in items], runs[user])
        store.checkpoint_progress(user, runs[user], processed_sms=newly, total_sms=len(ids[user]),
                                  last_processed_id=ids[user][-1], status="completed")
        return newly
    return work


def _leased(store, mongo_server, db_name: str, users: list[str]) -> dict[str, str]:
    """Each user's lease (epoch 1) and its run's checkpoint, as a turn's start writes them."""
    leases = Leases(store._database(), "host-a", ttl=60)
    assert all(leases.take(u).epoch == 1 for u in users)
    owner = FencedStore(mongo_server.uri, db_name)
    owner.set_epoch(1)
    try:
        return {u: owner.checkpoint_start(u, EACH)["batch_id"] for u in users}
    finally:
        owner.close()


def test_a_member_whose_lease_moved_and_was_stamped_gets_stale_epoch_and_the_others_store_all(
        store, seed, mongo_server, mongo_db_name):
    users = ["ga", "gb", "gc", "gd"]
    ids = {u: seed(u, EACH, id_type="str") for u in users}
    runs = _leased(store, mongo_server, mongo_db_name, users)
    # Before the group flushes, another host takes gc (epoch 2) and stamps its SMS.
    db = store._database()
    assert Leases(db, "host-a", ttl=60).release("gc")
    assert Leases(db, "host-b", ttl=60).take("gc").epoch == 2
    new_owner = FencedStore(mongo_server.uri, mongo_db_name)
    new_owner.set_epoch(2)
    assert new_owner.stamp_user("gc") == EACH
    new_owner.close()

    c = counter()
    c.clear()
    c.active.set()
    try:
        group = _Group(mongo_server, mongo_db_name, dict.fromkeys(users, 1))
        out = group.run(_flush(ids, runs))
    finally:
        c.active.clear()
    assert isinstance(out["gc"], StaleEpoch), out
    assert all(out[u] == EACH for u in users if u != "gc"), out
    # gc wrote nothing at all; the others stored everything, in order, at their epoch.
    assert store.transactions_for("gc") == []
    assert store.raw.count_documents({"user_id": "gc", "isprocessed": True}) == 0
    assert store.checkpoints.find_one({"_id": runs["gc"]})["processed_sms"] == 0
    for u in users:
        if u == "gc":
            continue
        docs = store.transactions_for(u)
        assert sorted(d["sms_id"] for d in docs) == sorted(ids[u]) and {d[EPOCH_FIELD] for d in docs} == {1}
        assert store.raw.count_documents({"user_id": u, "isprocessed": True, "smsd_batch_id": runs[u]}) == EACH
        cp = store.checkpoints.find_one({"_id": runs[u]})
        assert (cp["processed_sms"], cp["status"]) == (EACH, "completed")
        assert store.user_summary(u)["processed_sms"] == EACH
    # The claim of all four was one command (whose shortfall sent each member to its own
    # claim); the three others' writes of each kind after it were one command each.
    commands = c.by_collection
    assert commands["aggregate smsd_leases"] == 1            # one gated $merge for three users
    assert commands["find smsd_leases"] == 1                 # one read: each lease still at its epoch
    assert "find financial_transactions" not in commands     # so nothing stored needs counting
    assert commands["update processing_checkpoints"] == 1    # three checkpoints, then one read of them
    assert commands["find processing_checkpoints"] == 1
    assert commands["insert smsd_user_stats"] == 1               # their first counters
    assert commands["update sms_fin_rawdata"] == 1 + 4 + 1   # claim, each member's own claim, isprocessed
    assert "findAndModify processing_checkpoints" not in commands
    assert group.writes.batches == 4 and group.writes.calls == 4 + 3 * 3


def test_a_member_whose_lease_moved_before_its_new_owner_stamped_stores_nothing(
        store, seed, mongo_server, mongo_db_name):
    # The new owner has taken the lease but not stamped yet: the claim passes for everyone,
    # and the lease-gated $merge, checked by the server, refuses the stale member's documents.
    users = ["ha", "hb", "hc"]
    ids = {u: seed(u, EACH, id_type="str") for u in users}
    runs = _leased(store, mongo_server, mongo_db_name, users)
    db = store._database()
    assert Leases(db, "host-a", ttl=60).release("hb")
    assert Leases(db, "host-b", ttl=60).take("hb").epoch == 2
    group = _Group(mongo_server, mongo_db_name, dict.fromkeys(users, 1))
    out = group.run(_flush(ids, runs))
    assert isinstance(out["hb"], StaleEpoch) and "0 of 3 stored" in str(out["hb"]), out
    assert out["ha"] == out["hc"] == EACH
    assert store.transactions_for("hb") == []
    assert store.raw.count_documents({"user_id": "hb", "isprocessed": True}) == 0
    assert all(len(store.transactions_for(u)) == EACH for u in ("ha", "hc"))
    assert group.writes.batches >= 2        # the claim and the $merge were combined


def test_each_member_gets_its_own_count_of_newly_processed_sms(store, seed, mongo_server, mongo_db_name):
    users = ["ka", "kb"]
    ids = {u: seed(u, EACH, id_type="str") for u in users}
    _leased(store, mongo_server, mongo_db_name, users)
    # One of ka's SMS was marked by an earlier flush (a replay): only two are new for ka.
    store.raw.update_one({"_id": ids["ka"][0]}, {"$set": {"isprocessed": True}})
    group = _Group(mongo_server, mongo_db_name, dict.fromkeys(users, 1))
    out = group.run(lambda user, s: s.mark_processed(user, ids[user], f"run-{user}"))
    assert out == {"ka": EACH - 1, "kb": EACH}
    assert group.writes.batches == 1
    # A replay of the same marks changes nothing, and says so, member by member.
    group = _Group(mongo_server, mongo_db_name, dict.fromkeys(users, 1))
    assert group.run(lambda user, s: s.mark_processed(user, ids[user], f"run-{user}")) == {"ka": 0, "kb": 0}


@pytest.mark.parametrize("answer_wait_s, rounds", [(10.0, 1), (0.0, 2)], ids=["waited-for", "not-waited-for"])
def test_a_member_whose_llm_call_is_in_flight_is_waited_for_so_the_group_flushes_once(
        answer_wait_s, rounds, store, seed, mongo_server, mongo_db_name):
    """A group's calls are answered one after another: the members answered first wait
    (up to ``answer_wait_s``) for those whose call is in flight, instead of a flush each."""
    users = ["wa", "wb"]
    ids = {u: seed(u, EACH, id_type="str") for u in users}
    runs = _leased(store, mongo_server, mongo_db_name, users)
    group = _Group(mongo_server, mongo_db_name, dict.fromkeys(users, 1), wait_s=0.025,
                   answer_wait_s=answer_wait_s)
    group.answering["wb"].set()
    flush = _flush(ids, runs)

    def work(user: str, s) -> int:
        if user == "wb":       # its answer arrives 0.4 s after wa's
            time.sleep(0.4)
            group.answering["wb"].clear()
        return flush(user, s)
    c = counter()
    c.clear()
    c.active.set()
    try:
        out = group.run(work)
    finally:
        c.active.clear()
    assert out == {"wa": EACH, "wb": EACH}, out
    commands = c.by_collection
    assert commands["aggregate smsd_leases"] == rounds, sorted(commands.items())
    # A member flushing alone writes its checkpoint with its own findAndModify.
    assert (commands["update processing_checkpoints"] + commands["findAndModify processing_checkpoints"]
            == rounds), sorted(commands.items())
    assert all(len(store.transactions_for(u)) == EACH for u in users)


USERS = 5


def _config(tmp_path, mongo_server, mongo_db_name, server):
    return write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=server.url,
                        llm={"model": "gpt-4o-mini", "batch_size": 25, "concurrency": 1},
                        # Long waits: the five users' SMS go in one call and their flushes meet,
                        # also on a loaded host (both end as soon as every user is in).
                        pipeline={"trickle_group_max_users": 8, "trickle_wait_ms": 3000,
                                  "group_write_wait_ms": 2000},
                        supervisor={"max_workers": 1, "restart_backoff": 60.0})


# The flush's combined writes: the gated $merge (1st), then isprocessed (2nd); fresh answers
# need no claim before them (smsd.fencing).
@pytest.mark.parametrize("nth", [1, 2], ids=["after-merge", "after-isprocessed"])
def test_a_kill_inside_a_combined_write_is_replayed_from_the_journals(
        nth, tmp_path, db, mongo_server, mongo_db_name, make_llm_server):
    server = make_llm_server()
    expected = {}
    for u in range(USERS):
        expected.update(seed_fixture_sms(db, f"g{u}", 2, start=u * 2))
    config = _config(tmp_path, mongo_server, mongo_db_name, server)
    d = Daemon(config, tmp_path, SMSD_FAILPOINT=f"group_mid_write@{nth}")
    try:
        wait_for(lambda: any(u.get("last_exit") == "signal 9" for u in d.status()["users"]),
                 timeout=60, what="the group turn killed inside a combined write")
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    crashed = scan(tmp_path / "state")
    # Killed after the answers' commit: every member's answers are in its journal, unflushed.
    assert sum(j["answered_sms"] for j in crashed.values()) == 2 * USERS, crashed
    assert all(j["unflushed"] for j in crashed.values()), crashed
    # The kill struck between the combined write of every member and the next one.
    stored = db.financial_transactions.count_documents({})
    marked = db.sms_fin_rawdata.count_documents({"isprocessed": True})
    assert stored > 0 and marked == (0 if nth == 1 else 2 * USERS), (stored, marked)

    d = Daemon(config, tmp_path)
    try:
        # The journals themselves say when the replay is over (right after the restart the
        # status has no worker and no backlog yet, and a kill after isprocessed left no SMS pending).
        wait_for(lambda: (lambda s: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 2 * USERS
                          and not s["workers"]
                          and not any(j["unflushed"] for j in scan(tmp_path / "state").values()))(d.status()),
                 timeout=90, what="every SMS processed and every journal flushed after the restart")
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    stats = server.stats()
    report = verify(db, expected, state_dir=tmp_path / "state", billed=stats["billed"])
    assert report.ok, report.to_dict()
    assert report.repeats_unexplained == 0
    # Nothing was asked again: the kill came after every answer was committed.
    assert all(stats["billed"][sms_key(r)] == 1 for r in expected), (stats["calls"], stats["billed"])
