"""The MongoDB wire-protocol proxy (``python -m smsd.lab.mongoproxy``) against a real server."""
from __future__ import annotations

import time

import pymongo
import pytest

from smsd.lab.mongoproxy import ProxyProcess


@pytest.fixture
def proxy(mongo_server, tmp_path):
    p = ProxyProcess(mongo_server.uri, tmp_path / "proxy.log").start()
    yield p
    p.stop()


def client(uri: str) -> pymongo.MongoClient:
    return pymongo.MongoClient(uri, serverSelectionTimeoutMS=1500, connectTimeoutMS=1500)


def test_forwards_and_counts_commands_by_name(proxy, mongo_server, mongo_db_name):
    c = client(proxy.uri)
    try:
        proxy.reset()
        coll = c[mongo_db_name]["things"]
        coll.insert_many([{"n": i} for i in range(3)])
        coll.update_many({"n": {"$gte": 1}}, {"$set": {"seen": True}})
        assert sorted(d["n"] for d in coll.find({"seen": True})) == [1, 2]
        counts = proxy.stats()["commands"]
        assert counts["insert"] == 1 and counts["update"] == 1 and counts["find"] == 1
    finally:
        c.close()
    # What went through the proxy is on the real server.
    direct = pymongo.MongoClient(mongo_server.uri)
    try:
        assert direct[mongo_db_name]["things"].count_documents({"seen": True}) == 2
    finally:
        direct.close()


def test_server_time_is_charged_to_each_command_and_collection(proxy, mongo_db_name):
    c = client(proxy.uri)
    try:
        c[mongo_db_name]["light"].find_one()                # connected, monitoring settled
        proxy.configure(delay_ms=50)                        # the proxy's own delay is not the server's
        proxy.reset()
        t0 = time.perf_counter()
        c[mongo_db_name]["heavy"].insert_many([{"n": i, "pad": "x" * 200} for i in range(3000)])
        c[mongo_db_name]["light"].find_one({"n": 1})
        c[mongo_db_name]["light"].find_one({"n": 2})
        elapsed = time.perf_counter() - t0
        timed = proxy.stats()["server_time"]
    finally:
        c.close()
    assert timed["insert heavy"]["n"] == 1 and timed["find light"]["n"] == 2
    assert 0 < timed["insert heavy"]["busy_s"] <= timed["insert heavy"]["wall_s"]
    assert timed["insert heavy"]["busy_s"] > timed["find light"]["busy_s"]
    assert sum(t["busy_s"] for t in timed.values()) < elapsed - 3 * 0.050
    assert not any(label.split()[0] in ("hello", "ismaster", "isMaster") for label in timed)


def test_delays_every_command(proxy, mongo_db_name):
    c = client(proxy.uri)
    try:
        c[mongo_db_name]["things"].find_one()               # connected before the delay starts
        proxy.configure(delay_ms=300)
        t0 = time.perf_counter()
        for _ in range(2):
            c[mongo_db_name]["things"].find_one()
        assert time.perf_counter() - t0 >= 0.6
        assert proxy.stats()["delay_ms"] == 300
    finally:
        c.close()


def test_down_refuses_then_up_serves_again(proxy, mongo_db_name):
    c = client(proxy.uri)
    try:
        c[mongo_db_name]["things"].insert_one({"k": 1})
        proxy.configure(down=True)
        assert proxy.stats()["connections_open"] == 0
        with pytest.raises(pymongo.errors.PyMongoError):
            c[mongo_db_name]["things"].find_one({"k": 1})
        proxy.configure(down=False)
        assert c[mongo_db_name]["things"].find_one({"k": 1})["k"] == 1
    finally:
        c.close()


def test_bad_settings_are_refused(proxy):
    import urllib.error
    with pytest.raises(urllib.error.HTTPError) as err:
        proxy.configure(delay_ms=-1)
    assert err.value.code == 400
    with pytest.raises(urllib.error.HTTPError):
        proxy.configure(colour="red")
    assert proxy.stats()["delay_ms"] == 0
