"""``smsd run`` creates its indexes itself, and a server that refuses them does not stop it.

Without them every read of pending SMS, of the latest checkpoint and of the
counters scans its collection: a cost that grows with every SMS ever stored.
"""
from __future__ import annotations

import time

from smsd.lab.invariants import verify
from smsd.store_docs import (CHECKPOINTS_COLLECTION, IDX_DISCOVERY, IDX_LATEST_CHECKPOINT,
                             IDX_PENDING, IDX_TX_BY_SMS, RAW_COLLECTION, TRANSACTIONS_COLLECTION)

from ..harness import Daemon, seed, wait_for, write_config

WANTED = {RAW_COLLECTION: {IDX_PENDING, IDX_DISCOVERY},
          TRANSACTIONS_COLLECTION: {IDX_TX_BY_SMS},
          CHECKPOINTS_COLLECTION: {IDX_LATEST_CHECKPOINT}}


def _names(db, collection: str) -> set[str]:
    return {ix["name"] for ix in db[collection].list_indexes()}


def _run(tmp_path, mongo_server, mongo_db_name, llm_server, db, expected) -> str:
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          supervisor={"discovery_interval": 0.3})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == len(expected),
                 what="all processed")
        time.sleep(1.5)   # several more discovery ticks
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    return out


def test_smsd_run_creates_its_indexes_on_a_fresh_database(tmp_path, db, mongo_server, mongo_db_name,
                                                           llm_server):
    expected = {**seed(db, "ann", 6), **seed(db, "ben", 4)}
    assert not any(_names(db, c) & names for c, names in WANTED.items() if c in db.list_collection_names())
    out = _run(tmp_path, mongo_server, mongo_db_name, llm_server, db, expected)
    for collection, names in WANTED.items():
        assert names <= _names(db, collection), (collection, _names(db, collection))
    assert out.count("indexes: smsd's indexes are in database") == 1, out[-3000:]
    # The pending read of one user is served by its index, not a collection scan.
    plan = db.sms_fin_rawdata.find({"user_id": "ann", "smsd_quarantine": None, "isprocessed": False}) \
        .sort("_id", 1).explain()["queryPlanner"]["winningPlan"]
    assert "COLLSCAN" not in str(plan), plan


def test_indexes_the_server_refuses_are_logged_once_and_every_user_still_finishes(
        tmp_path, db, mongo_server, mongo_db_name, llm_server):
    # An index of smsd's name on other keys (made by hand): the server refuses smsd's.
    db[CHECKPOINTS_COLLECTION].create_index([("user_id", 1)], name=IDX_LATEST_CHECKPOINT)
    expected = {**seed(db, "ann", 6), **seed(db, "ben", 4)}
    out = _run(tmp_path, mongo_server, mongo_db_name, llm_server, db, expected)
    assert out.count("MongoDB refused smsd's indexes") == 1, out[-3000:]
    assert "smsd doctor" in out
    # The ones before the refused one were created.
    assert WANTED[RAW_COLLECTION] <= _names(db, RAW_COLLECTION)
