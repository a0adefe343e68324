"""A real network partition: one host in its own network namespace, its link cut past the TTL.

The MongoDB-wire server and the LLM server listen on the host side of a veth
pair (10.201.0.1); host ``a`` runs inside the namespace (10.201.0.2) and
reaches them only over that link, host ``b`` runs outside.  ``ip link set
<veth> down`` cuts ``a`` off for longer than the lease TTL, then the link comes
back.  Skipped, with the reason, where namespaces cannot be made (not root, no
iproute2: ``make test`` installs it).
"""
from __future__ import annotations

import time

import pytest
from pymongo import MongoClient

from smsd.embedded import EmbeddedMongo
from smsd.lab.invariants import verify
from smsd.lab.multihost import HostProcess, NetnsLink, NetnsUnavailable, asked_since, in_flight
from smsd.lease import LEASES_COLLECTION

from ..fixtures_llm import LlmServerProcess
from ..harness import wait_for
from .test_multihost import check_moved, seed_busy

TTL = 3.0
HOST_ADDR, NS_ADDR = "10.201.0.1", "10.201.0.2"


@pytest.fixture
def link():
    net = NetnsLink("smsd-lease-a", host_addr=HOST_ADDR, ns_addr=NS_ADDR)
    try:
        net.create()
    except NetnsUnavailable as exc:
        pytest.skip(f"network namespaces unavailable: {exc}")
    yield net
    net.delete()


@pytest.fixture
def servers(link, tmp_path):
    mongo = EmbeddedMongo(tmp_path / "mongo", host=HOST_ADDR)
    uri = mongo.start()
    llm = LlmServerProcess(host=HOST_ADDR, latency_ms=300).start()
    yield uri, llm
    llm.stop()
    mongo.stop()


@pytest.mark.slow
def test_a_cut_host_loses_its_users_and_writes_nothing_after(link, servers, tmp_path):
    uri, llm = servers
    client = MongoClient(uri, tz_aware=True)
    db = client["smsd_partition"]
    common = dict(mongo_uri=uri, db="smsd_partition", llm_url=llm.url,
                  supervisor={"max_workers": 2}, llm={"batch_size": 2}, lease={"ttl": TTL})
    a = HostProcess("a", tmp_path / "a", netns=link.name, **common).start()
    b = None
    try:
        expected = seed_busy(db, a)
        owned = lambda h: [d["_id"] for d in db[LEASES_COLLECTION].find() if d["owner"] == h]
        b = HostProcess("b", tmp_path / "b", **common).start()
        old = {d["_id"]: d["epoch"] for d in db[LEASES_COLLECTION].find()}
        cut_wall = time.time()
        link.cut()
        cut_at = time.monotonic()
        cut = in_flight(a.state_dir)
        wait_for(lambda: len(owned(b.host_id)) == 2, timeout=TTL + 10, what="b taking a's users")
        took = {d["_id"]: d for d in db[LEASES_COLLECTION].find()}
        time.sleep(max(0.0, TTL + 3 - (time.monotonic() - cut_at)))
        link.restore()

        def done():
            if db["sms_fin_rawdata"].count_documents({"isprocessed": {"$ne": True}}):
                return False
            report = verify(db, expected, state_dir=[a.state_dir, b.state_dir])
            return report if report.ok else False
        report = wait_for(done, timeout=180, what="all SMS processed and every journal reconciled")
        assert report.sms_processed == len(expected) and report.sms_lost == 0
        assert report.tx_duplicated == 0
        # Unlike a frozen host, a cut host runs on: a call it began after the cut, while its
        # lease was surely still its own (smsd.lease.LeaseKeeper.fresh), was in flight too.
        # It stops paying before its lease can expire, so b could not have the user yet.
        cut += asked_since(a.state_dir, cut_wall)
        check_moved(db, client, "smsd_partition", old, took, cut, report)
    finally:
        a.stop(timeout=30)
        if b is not None:
            b.stop(timeout=30)
        client.close()
