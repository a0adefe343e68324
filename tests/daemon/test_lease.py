"""Leases and DB-enforced fencing against the real MongoDB-wire server (no smsd processes)."""
from __future__ import annotations

import time
from datetime import datetime, timezone

import pytest

from smsd.fencing import EPOCH_FIELD, FencedStore
from smsd.journal import Journal
from smsd.lease import Leases, free_quota, host_id, turn_kind
from smsd.model import FlushItem, Provenance, SmsResult, Transaction, Usage, sms_key
from smsd.pipeline import StaleEpoch


@pytest.fixture
def fenced(mongo_server, mongo_db_name):
    def make(epoch: int) -> FencedStore:
        s = FencedStore(mongo_server.uri, mongo_db_name, timeout_ms=3000)
        s.set_epoch(epoch)
        return s
    made = []
    yield lambda epoch: made.append(make(epoch)) or made[-1]
    for s in made:
        s.close()


def _item(raw_id, user_id, amount="10.00", epoch=1, n_tx=1) -> FlushItem:
    tx = Transaction.from_json({"direction": "debit", "amount": amount, "currency": "INR"})
    result = SmsResult(key=sms_key(raw_id), kind="transaction", transactions=(tx,) * n_tx)
    prov = Provenance(call_id="c1", model="m", request_id=None,
                      answered_at=datetime.now(timezone.utc), owner="h", epoch=epoch)
    return FlushItem(raw_id=raw_id, user_id=user_id, result=result, provenance=prov)


def test_host_id_survives_restarts(tmp_path):
    first = host_id(tmp_path)
    assert first and host_id(tmp_path) == first
    assert host_id(tmp_path / "other") != first


def test_take_renew_release_and_epochs(store):
    db = store._database()
    a, b = Leases(db, "host-a", ttl=30), Leases(db, "host-b", ttl=30)
    la = a.take("u1")
    # The first epoch is born stamped: nobody held the user before, nothing carries a lower epoch.
    assert la is not None and la.owner == "host-a" and la.epoch == 1 and la.stamped
    assert b.take("u1") is None                       # held: nobody else gets it
    again = a.take("u1")
    assert again.epoch == 1                           # the same host keeps its epoch
    assert a.renew(la) is not None
    assert b.release("u1") is False                   # only the owner gives it back
    assert a.release("u1", 1) is True
    lb = b.take("u1")
    assert lb is not None and lb.owner == "host-b" and lb.epoch == 2
    assert not lb.stamped                             # a new owner must stamp its epoch first
    assert a.renew(la) is None                        # a's epoch is gone
    view = a.read(["u1", "nobody"])
    assert view["u1"]["owner"] == "host-b" and view["u1"]["free"] is False and "nobody" not in view


def test_expired_lease_is_taken_with_a_higher_epoch(store):
    db = store._database()
    a, b = Leases(db, "host-a", ttl=0.3), Leases(db, "host-b", ttl=30)
    assert a.take("u1").epoch == 1
    assert b.take("u1") is None
    time.sleep(0.5)
    assert a.read(["u1"])["u1"]["free"] is True
    lb = b.take("u1")
    assert lb.owner == "host-b" and lb.epoch == 2


def test_hosts_heartbeat_and_share():
    assert free_quota(7, 2) == 4 and free_quota(0, 3) == 0 and free_quota(2, 3) == 1
    assert turn_kind(None, "a", 0, None) == "free"
    assert turn_kind({"owner": "a", "free": True}, "a", 0, None) == "mine"
    assert turn_kind({"owner": "b", "free": False, "epoch": 3}, "a", 0, None) is None
    assert turn_kind({"owner": "b", "free": False, "epoch": 3}, "a", 5, None) == "handover"
    assert turn_kind({"owner": "b", "free": False, "epoch": 3}, "a", 5, 3) is None


def test_heartbeat_counts_live_hosts(store):
    db = store._database()
    assert Leases(db, "h1", ttl=30).heartbeat(4) == 1
    assert Leases(db, "h2", ttl=30).heartbeat(4) == 2
    assert Leases(db, "h3", ttl=0.2).heartbeat(4, ttl_ms=200) == 3
    time.sleep(0.4)
    assert Leases(db, "h1", ttl=30).heartbeat(4) == 2


def test_a_stale_epoch_is_refused_by_mongodb(store, seed, fenced):
    ids = seed("u1", 4)
    db = store._database()
    old, new = fenced(Leases(db, "host-a", ttl=30).take("u1").epoch), fenced(2)
    # The old owner flushed the first SMS, then the new owner took the user and stamped.
    assert old.claim([_item(ids[0], "u1")])
    old.upsert_transactions([_item(ids[0], "u1")])
    assert old.mark_processed("u1", [ids[0]], "b1") == 1
    assert Leases(db, "host-a", ttl=30).release("u1")
    assert Leases(db, "host-b", ttl=30).take("u1").epoch == 2
    assert new.stamp_user("u1") == 3
    # Every kind of write from the old epoch now matches nothing or collides.
    with pytest.raises(StaleEpoch):
        old.claim([_item(ids[1], "u1")])
    assert store.transactions_for("u1")[0]["sms_id"] == ids[0]
    new.claim([_item(ids[2], "u1", epoch=2)])
    new.upsert_transactions([_item(ids[2], "u1", epoch=2)])
    with pytest.raises(StaleEpoch):
        old.upsert_transactions([_item(ids[2], "u1", amount="99.00")])
    with pytest.raises(StaleEpoch):
        old.mark_processed("u1", [ids[3]], "b1")
    docs = {d["sms_id"]: d for d in store.transactions_for("u1")}
    assert docs[ids[2]]["amount"].to_decimal() == 10 and docs[ids[2]][EPOCH_FIELD] == 2
    raw = store.raw.find_one({"_id": ids[3]})
    assert raw.get("isprocessed") is not True and raw[EPOCH_FIELD] == 2
    assert old.refused >= 3


def test_a_stale_insert_of_a_transaction_nobody_wrote_yet_is_refused(store, seed, fenced):
    """Issue 13's gap: the old owner claims, freezes past its TTL, the user moves, it wakes.

    None of these SMS has a transaction document yet, so a filter on the
    document's own epoch has nothing to match: its upsert would insert.  The
    write is gated on the lease by the server itself and must store nothing.
    """
    ids = seed("u1", 3)
    db = store._database()
    a, b = Leases(db, "host-a", ttl=0.3), Leases(db, "host-b", ttl=30)
    old = fenced(a.take("u1").epoch)
    items = [_item(i, "u1", amount="99.00", n_tx=2) for i in ids]
    assert old.claim(items) == items                 # still the owner: the claim passes
    time.sleep(0.5)                                  # frozen past the TTL ...
    new = fenced(b.take("u1").epoch)                 # ... the user moves (epoch 2) and is stamped
    assert new.epoch == 2 and new.stamp_user("u1") == 3
    assert store.transactions_for("u1") == []        # the new owner has written nothing yet
    with pytest.raises(StaleEpoch, match=r"transaction upsert \(0 of 6 stored\)"):
        old.upsert_transactions(items)               # the old owner wakes and flushes
    assert old.refused == 1
    assert store.transactions_for("u1") == []        # refused by MongoDB: nothing was inserted
    with pytest.raises(StaleEpoch):
        old.mark_processed("u1", ids, "b1")
    with pytest.raises(StaleEpoch, match="checkpoint start"):   # a new run is refused as well
        old.checkpoint_start("u1", 3)
    assert store.latest_checkpoint("u1") is None
    # The new owner's own answer is stored, at its epoch, and nothing of the old one.
    mine = [_item(i, "u1", amount="10.00", epoch=2) for i in ids]
    assert new.claim(mine) == mine
    new.upsert_transactions(mine)
    assert new.mark_processed("u1", ids, "b2") == 3
    docs = store.transactions_for("u1")
    assert len(docs) == 3 and {d[EPOCH_FIELD] for d in docs} == {2}
    assert {d["amount"].to_decimal() for d in docs} == {10}


def test_new_owner_deletes_positions_an_old_owner_left(store, seed, fenced):
    """An old owner stored two transactions for an SMS and lost the user before isprocessed."""
    ids = seed("u1", 1)
    db = store._database()
    old = fenced(Leases(db, "host-a", ttl=30).take("u1").epoch)
    old.claim([_item(ids[0], "u1", n_tx=2)])
    old.upsert_transactions([_item(ids[0], "u1", n_tx=2)])
    assert len(store.transactions_for("u1")) == 2
    Leases(db, "host-a", ttl=30).release("u1")
    new = fenced(Leases(db, "host-b", ttl=30).take("u1").epoch)
    new.stamp_user("u1")
    mine = [_item(ids[0], "u1", epoch=2)]               # its answer found one transaction
    new.upsert_transactions(new.claim(mine))
    docs = store.transactions_for("u1")
    assert len(docs) == 1 and docs[0][EPOCH_FIELD] == 2


def test_checkpoint_of_a_newer_epoch_refuses_the_old(store, seed, fenced):
    seed("u1", 2)
    db = store._database()
    old = fenced(Leases(db, "host-a", ttl=30).take("u1").epoch)
    cp = old.checkpoint_start("u1", 2)
    assert Leases(db, "host-a", ttl=30).release("u1")
    new = fenced(Leases(db, "host-b", ttl=30).take("u1").epoch)
    new.stamp_user("u1")
    with pytest.raises(StaleEpoch):
        old.checkpoint_progress("u1", cp["batch_id"], processed_sms=1, total_sms=None,
                                last_processed_id=None, status="in_progress")
    new.checkpoint_progress("u1", cp["batch_id"], processed_sms=1, total_sms=None,
                            last_processed_id=None, status="in_progress")
    assert store.latest_checkpoint("u1")["processed_sms"] == 1


def test_claim_leaves_out_sms_already_processed(store, seed, fenced):
    ids = seed("u1", 3)
    owner = fenced(1)
    store.mark_processed("u1", [ids[0]], "b0")
    kept = owner.claim([_item(i, "u1") for i in ids])
    assert [k.raw_id for k in kept] == ids[1:]


def test_handover_round_trip(store, seed, tmp_path):
    from smsd.handover import Handover, hand_over
    ids = seed("u1", 2)
    with Journal.open(tmp_path, "u1") as journal:
        call = journal.begin_call([(sms_key(i), i) for i in ids], owner="a", epoch=1, model="m")
        journal.record_answer(call, [(i, _item(i, "u1").result) for i in ids], failed={},
                              request_id=None, usage=Usage(), model="m")
        assert hand_over(store._database(), journal, "u1", owner="a", epoch=1) == 2
    box = Handover(store._database(), "u1")
    got = box.adopt([sms_key(i) for i in ids] + ["unknown"])
    assert set(got) == {sms_key(i) for i in ids}
    assert all(r.transactions[0].amount == _item(ids[0], "u1").result.transactions[0].amount
               for r in got.values())
    assert Handover(store._database(), "someone-else").adopt([sms_key(ids[0])]) == {}
    box.forget([sms_key(ids[0])])
    assert set(box.adopt([sms_key(i) for i in ids])) == {sms_key(ids[1])}


def test_lease_turns_keep_the_fair_order_and_the_share():
    from types import SimpleNamespace as U
    from smsd.lease_sched import lease_turns
    mine = {"owner": "me", "free": False, "epoch": 1}
    theirs = {"owner": "other", "free": False, "epoch": 4}
    users = [U(user_id="big", info={"lease": mine}, handed_epoch=None),
             U(user_id="held", info={"lease": theirs}, handed_epoch=None),
             U(user_id="new1", info={}, handed_epoch=None),
             U(user_id="new2", info={}, handed_epoch=None),
             U(user_id="owed", info={"lease": theirs}, handed_epoch=None)]
    owed_n = {"owed": 3}
    picked, left = lease_turns(users, "me", room=5, quota=1, owed=lambda u: owed_n.get(u.user_id, 0))
    names = [u.user_id for u in picked]
    assert names[0] == "big" and "held" not in names and "owed" in names   # handover of paid answers
    assert len([n for n in names if n.startswith("new")]) == 1 and left == 0
    picked, _ = lease_turns(users[2:4], "me", room=1, quota=5, owed=lambda u: 0)
    assert len(picked) == 1                                                   # room bounds it


def test_idle_prefork_workers_count_as_free_slots_in_the_heartbeat(tmp_path):
    from types import SimpleNamespace as NS
    from smsd.lease_sched import LeaseView
    sup = NS(settings=NS(supervisor=NS(max_workers=3)), users={},
             workers={1: NS(user_id="u1"), 2: NS(user_id=None), 3: NS(user_id=None)})
    assert LeaseView(tmp_path).ask(sup)["free_slots"] == 2
    sup.workers = {i: NS(user_id=f"u{i}") for i in range(3)}
    assert LeaseView(tmp_path).ask(sup)["free_slots"] == 0


def test_a_group_takes_renews_and_releases_its_leases_together_with_the_single_takes_rules(store):
    from smsd.lease_group import release_many, renew_many, take_many
    db = store._database()
    a, b = Leases(db, "host-a", ttl=30), Leases(db, "host-b", ttl=30)
    assert b.take("u3") is not None
    held, expires = take_many(a, ["u1", "u2", "u3"])
    # u3 is b's: not ours; the others are born at epoch 1, stamped, with one shared expiry.
    assert sorted(held) == ["u1", "u2"]
    assert all(x.epoch == 1 and x.stamped and x.expires_at == expires for x in held.values())
    assert b.take("u1") is None                       # held: nobody else gets it
    # This host takes u1 again in another turn (its group turn reported u1 over): a new expiry,
    # which the group's renewal and release leave alone.
    again = a.take("u1")
    assert again.epoch == 1 and again.expires_at != expires
    gone, later = renew_many(a, held, expires)
    assert gone == {"u1"} and later > expires
    assert release_many(a, {"u2": held["u2"]}, expires) == 0   # not at that expiry any more
    assert release_many(a, held, later) == 1                   # u2 only
    view = a.read(["u1", "u2"])
    assert view["u1"]["free"] is False and view["u2"]["free"] is True
    # Released: another host takes u2 at a higher epoch; this host's next group gets u1 back at once.
    assert b.take("u2").epoch == 2
    held2, _ = take_many(a, ["u1", "u2"])
    assert sorted(held2) == ["u1"] and held2["u1"].epoch == 1


def test_a_group_take_writes_the_documents_the_single_take_writes(store):
    """New leases are inserted and ours only get a new expiry (cheaper commands), yet each
    document is what the single take's pipeline upsert makes of it."""
    from smsd.lease_group import take_many
    db = store._database()
    a, b = Leases(db, "host-a", ttl=30), Leases(db, "host-b", ttl=30)
    # Reference: single takes of a new lease, of our own released one, of another host's expired one.
    assert a.take("s-new") and a.take("s-mine") and a.release("s-mine")
    assert b.take("s-other") and b.release("s-other")
    assert a.take("s-mine") and a.take("s-other")
    assert a.take("g-mine") and a.release("g-mine")
    assert b.take("g-other") and b.release("g-other")
    held, expires = take_many(a, ["g-new", "g-mine", "g-other"])
    assert sorted(held) == ["g-mine", "g-new", "g-other"]

    def shape(user_id: str) -> dict:
        doc = db["smsd_leases"].find_one({"_id": user_id})
        return {k: v for k, v in doc.items() if k not in ("_id", "taken_at", "expires_at")}
    for kind in ("new", "mine", "other"):
        assert shape(f"g-{kind}") == shape(f"s-{kind}"), kind
    assert shape("g-other")["epoch"] == 2 and shape("g-other")["stamped"] is False
    assert shape("g-new") == {"epoch": 1, "stamped": True, "owner": "host-a"}
    assert all(x.expires_at == expires for x in held.values())
    # A lease another host holds (its upsert collides on _id) is not ours; the others still are.
    assert b.take("g-late") is not None
    again, _ = take_many(a, ["g-new", "g-late"])
    assert sorted(again) == ["g-new"]


def test_the_group_keeper_loses_only_the_member_another_host_took(store):
    from pymongo.errors import PyMongoError

    from smsd.lease_group import GroupKeeper, take_many
    db = store._database()
    a = Leases(db, "host-a", ttl=3.0)
    taken_at = time.monotonic()
    held, expires = take_many(a, ["k1", "k2"])
    keeper = GroupKeeper(a, held, expires, ttl=3.0, fraction=0.1, taken_at=taken_at, errors=(PyMongoError,))
    lost: list[str] = []
    one, two = keeper.member("k1", lost.append), keeper.member("k2", lost.append)
    keeper.start()
    try:
        time.sleep(3.5)                     # longer than the TTL: only renewals keep them fresh
        assert one.fresh() and two.fresh() and not lost
        # Another host takes k1 (as after an expiry): k1's member loses it, k2's keeps it.
        a.coll.update_one({"_id": "k1"}, {"$set": {"owner": "host-b", "epoch": 2}})
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lost == ["taken by another host"] and one.lost and not one.fresh()
        time.sleep(0.6)                     # two more renewal periods
        assert two.fresh() and two.lost is None
    finally:
        assert keeper.release(["k1", "k2"]) == 1            # k2: k1 is host-b's now
    assert a.read(["k1", "k2"])["k2"]["free"] is True
    assert a.read(["k1"])["k1"]["owner"] == "host-b"


def test_free_leases_count_against_the_quota_only_for_users_that_got_a_turn(tmp_path):
    """A group turn bounded by its SMS takes fewer users than offered: the rest keep their share."""
    from smsd.lease_sched import LeaseView
    from smsd.scheduler import UserState
    view = LeaseView(tmp_path, _host="me", free_quota=3)
    users = [UserState(f"new{i}") for i in range(5)]
    offered = view.turns(users, room=5)
    assert len(offered) == 3 and view.free_quota == 3     # offering takes nothing yet
    view.started(offered[:1])
    assert view.free_quota == 2
    again = view.turns([u for u in users if u is not offered[0]], room=5)
    assert len(again) == 2
    view.started(again)
    assert view.free_quota == 0 and view.turns(users, room=5) == []
    mine = UserState("mine", info={"lease": {"owner": "me", "free": False, "epoch": 1}})
    assert view.turns([mine], room=1) == [mine]           # our own lease needs no quota
    view.started([mine])
    assert view.free_quota == 0
