"""``smsd once`` takes the user's lease like a worker: refused while another host holds it.

Real processes: ``smsd once`` (and an ``smsd run`` host) against the real
MongoDB-wire server and the local LLM server over HTTP.
"""
from __future__ import annotations

from pymongo import MongoClient
import pytest

from smsd.fencing import EPOCH_FIELD
from smsd.journal import Journal
from smsd.lab.invariants import verify
from smsd.lab.multihost import HostProcess
from smsd.lease import LEASES_COLLECTION, Leases, host_id

from ..harness import run_smsd, seed, wait_for, write_config


@pytest.fixture
def db(mongo_server, mongo_db_name):
    client = MongoClient(mongo_server.uri, tz_aware=True)
    yield client[mongo_db_name]
    client.close()


def _processed(db, user: str) -> int:
    return db.sms_fin_rawdata.count_documents({"user_id": user, "isprocessed": True})


def test_once_is_refused_while_another_host_holds_the_lease_then_takes_it(tmp_path, db, mongo_server,
                                                                          mongo_db_name, llm_server):
    expected = seed(db, "olga", 12)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    elsewhere = Leases(db, "host-elsewhere", ttl=600)
    assert elsewhere.take("olga").epoch == 1

    refused = run_smsd(config, "once", "--user-id", "olga")
    assert refused.returncode == 75, refused.stderr[-2000:]
    assert "user olga is leased by host host-elsewhere (epoch 1" in refused.stderr
    assert "smsctl release --user-id olga" in refused.stderr and "Traceback" not in refused.stderr
    assert llm_server.stats()["calls"] == 0 and _processed(db, "olga") == 0   # nothing paid, nothing written
    held = db[LEASES_COLLECTION].find_one({"_id": "olga"})
    assert held["owner"] == "host-elsewhere" and held["epoch"] == 1

    assert elsewhere.release("olga")
    done = run_smsd(config, "once", "--user-id", "olga")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "completed, 12/12 processed" in done.stdout
    lease = db[LEASES_COLLECTION].find_one({"_id": "olga"})
    assert lease["owner"] == host_id(tmp_path / "state") and lease["epoch"] == 2   # a new owner: epoch + 1
    assert Leases(db, "host-elsewhere", ttl=600).read(["olga"])["olga"]["free"]  # released at the end
    # Its writes were fenced with that epoch.
    assert {d.get(EPOCH_FIELD) for d in db.financial_transactions.find({"user_id": "olga"})} == {2}
    assert {d.get(EPOCH_FIELD) for d in db.sms_fin_rawdata.find({"user_id": "olga"})} == {2}
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()


def test_once_is_refused_while_a_running_host_works_on_the_user(tmp_path, db, mongo_server, mongo_db_name,
                                                                make_llm_server):
    expected = seed(db, "pia", 40)
    llm = make_llm_server(latency_ms=300)
    host = HostProcess("a", tmp_path / "a", mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm.url,
                       lease={"ttl": 30.0}, llm={"batch_size": 2, "concurrency": 1}).start()
    try:
        wait_for(lambda: (db[LEASES_COLLECTION].find_one({"_id": "pia"}) or {}).get("owner") == host.host_id
                 and 0 < _processed(db, "pia") < 40, timeout=60, what="host a working on pia")
        (tmp_path / "b").mkdir()
        config = write_config(tmp_path / "b", mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm.url)
        refused = run_smsd(config, "once", "--user-id", "pia")
        assert refused.returncode == 75, refused.stderr[-2000:]
        assert f"leased by host {host.host_id} (epoch 1" in refused.stderr
        with Journal.open(tmp_path / "b" / "state", "pia") as journal:   # once asked nothing
            assert journal.query("SELECT count(*) FROM calls")[0][0] == 0
        wait_for(lambda: _processed(db, "pia") == 40, timeout=120, what="host a finishing pia")
    finally:
        host.stop(timeout=30)
    report = verify(db, expected, state_dir=[tmp_path / "a" / "state", tmp_path / "b" / "state"],
                    billed=llm.stats()["billed"])
    assert report.ok, report.to_dict()
