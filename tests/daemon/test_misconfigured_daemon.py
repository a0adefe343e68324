"""`smsd run` with an LLM that refuses the setup: a visible `llm: misconfigured` state, no retry loop,
and a reload with the fixed config picks the work up again.  Real daemon, real servers."""
from __future__ import annotations

import json
import socket
import urllib.request
import time

import pytest
from pymongo import MongoClient

from smsd.ctl import format_status
from smsd.lab.invariants import verify

from ..harness import Daemon, run_smsd, seed, wait_for, write_config


@pytest.fixture
def db(mongo_server, mongo_db_name):
    client = MongoClient(mongo_server.uri)
    yield client[mongo_db_name]
    client.close()


def _misconfigured(d):
    st = d.status(quiet=True)
    return st if st and st["llm"].get("state") == "misconfigured" else None


@pytest.mark.parametrize("llm_server", [{"strict_model": True, "model": "smsd-local"}], indirect=True)
def test_an_unknown_model_puts_the_daemon_in_a_visible_state_until_a_reload_fixes_it(
        tmp_path, db, mongo_server, mongo_db_name, llm_server):
    expected = {**seed(db, "ann", 8), **seed(db, "bob", 8, start=8)}
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"model": "typo-model"}, supervisor={"metrics_listen": "127.0.0.1:0"})
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.2)
    d = Daemon(config, tmp_path, NOTIFY_SOCKET=str(notify))
    try:
        st = wait_for(lambda: _misconfigured(d), timeout=30, what="llm: misconfigured")
        metrics = urllib.request.urlopen(st["metrics_url"], timeout=10).read().decode()
        assert "smsd_llm_misconfigured 1.0" in metrics
        assert "typo-model" in st["llm"]["error"] and "SMSD_LLM_MODEL" in st["llm"]["hint"]
        assert st["state"] == "running"                      # still serving smsctl
        shown = format_status(st)
        assert "llm: misconfigured" in shown and "fix:" in shown and "smsctl reload" in shown
        wait_for(lambda: not d.status()["workers"], timeout=20, what="workers gone")
        calls = llm_server.stats()["calls"]
        time.sleep(3)                                        # no retry loop while misconfigured
        assert llm_server.stats()["calls"] == calls
        assert calls <= 2 * 2                                # at most the calls in flight of each worker
        doctor = json.loads(run_smsd(config, "doctor", "--json").stdout)
        sock_line = next(c for c in doctor["checks"] if c["name"] == "control socket")
        assert f"daemon pid {st['pid']} answers" in sock_line["detail"]
        statuses = []
        end = time.monotonic() + 7
        while time.monotonic() < end:
            try:
                statuses.append(sock.recv(4096).decode())
            except socket.timeout:
                pass
        assert any("llm: misconfigured" in m for m in statuses if "STATUS=" in m)
        assert db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 0
        # Fix the file, reload: the work is done.
        write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                     llm={"model": "smsd-local"}, supervisor={"metrics_listen": "127.0.0.1:0"})
        assert d.cmd("reload")["reloaded"]
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 16, timeout=60,
                 what="all processed after the reload")
        assert d.status()["llm"]["state"] == "ok"
    finally:
        code, out = d.stop()
        sock.close()
    assert out.count("llm: misconfigured (user") == 1           # the first ERROR line, once
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()


def test_a_mongodb_that_is_down_shows_for_how_long(tmp_path, own_mongo, llm_server):
    config = write_config(tmp_path, mongo_uri=own_mongo.uri, db="smsd_down_for", llm_url=llm_server.url,
                          mongo={"timeout_ms": 500})
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: d.status()["mongo"]["ok"] is True, timeout=30, what="MongoDB seen up")
        own_mongo.kill()
        st = wait_for(lambda: (lambda s: s if (s["mongo"].get("down_for_s") or 0) >= 2 else None)(d.status()),
                      timeout=30, what="down_for_s counting")
        assert st["mongo"]["ok"] is False
        assert "DOWN for" in format_status(st)
        own_mongo.restart()
        wait_for(lambda: d.status()["mongo"]["ok"] is True, timeout=60, what="MongoDB back")
        assert d.status()["mongo"]["down_for_s"] is None
    finally:
        d.stop()


@pytest.mark.parametrize("llm_server", [{"reject_json_schema": True, "reject_pattern": True}], indirect=True)
def test_the_daemon_shows_the_response_format_auto_found(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    expected = seed(db, "cy", 10)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    d = Daemon(config, tmp_path)
    try:
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 10, timeout=60,
                 what="all processed")
        st = d.status()
        assert st["llm"]["response_format"] == "auto (json_object)" and st["llm"]["state"] == "ok"
        assert "response_format auto (json_object)" in format_status(st)
    finally:
        d.stop()
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
