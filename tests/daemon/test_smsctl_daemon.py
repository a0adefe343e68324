"""``smsctl`` against a running ``smsd run``: every command, the contract's JSON, bad input."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from pymongo import MongoClient

from ..harness import REPO, Daemon, seed, wait_for, write_config


@pytest.fixture
def daemon(tmp_path, mongo_server, mongo_db_name, llm_server):
    client = MongoClient(mongo_server.uri)
    db = client[mongo_db_name]
    seed(db, "ola", 15)
    seed(db, "pam", 15)
    db.sms_fin_rawdata.insert_one({"_id": "broken-1", "user_id": "pam", "isprocessed": False})
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    d = Daemon(config, tmp_path)
    d.db = db
    wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 30, what="all processed")
    wait_for(lambda: (lambda st: not st["workers"] and len(st["users"]) == 2
                      and all(u["status"] != "in_progress" for u in st["users"]))(d.status()),
             what="daemon idle")
    yield d
    d.stop()
    client.close()


def smsctl(d, *args, timeout=20):
    return subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(d.sock), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def test_status_json_has_the_contract_shape(daemon):
    out = smsctl(daemon, "status", "--json")
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert isinstance(st["pid"], int)
    for w in st["workers"]:
        assert isinstance(w["user_id"], str) and isinstance(w["pid"], int) and isinstance(w["state"], str)
    for u in st["users"]:
        assert isinstance(u["user_id"], str) and isinstance(u["total_sms"], int)
        assert isinstance(u["processed_sms"], int)
        assert u["status"] in ("in_progress", "completed", "paused", "quarantined", "failed", "waiting")
    assert isinstance(st["journal"]["unflushed"], int)
    for key in ("calls", "repeated_calls", "prompt_tokens", "completion_tokens"):
        assert isinstance(st["llm"][key], int)
    users = {u["user_id"]: u for u in st["users"]}
    assert users["pam"]["quarantined_sms"] == 1 and users["pam"]["status"] == "quarantined"
    assert users["ola"]["status"] == "completed"


def test_status_table_and_one_user_with_its_checkpoint(daemon):
    table = smsctl(daemon, "status")
    assert table.returncode == 0 and "ola" in table.stdout and "USER" in table.stdout
    one = smsctl(daemon, "status", "--user-id", "ola")
    assert one.returncode == 0, one.stderr
    assert "Resume point" in one.stdout and "15/15" in one.stdout and "completed" in one.stdout


def test_quarantine_lists_reasons_never_text_and_retry_requeues(daemon):
    out = smsctl(daemon, "quarantine", "--user-id", "pam", "--json")
    assert out.returncode == 0, out.stderr
    items = json.loads(out.stdout)
    items = items.get("quarantined") or items.get("quarantine")
    assert len(items) == 1 and "malformed" in items[0]["reason"]
    assert "body" not in json.dumps(items)
    retry = smsctl(daemon, "retry", "--user-id", "pam")
    assert retry.returncode == 0, retry.stderr
    # It comes back as pending and, still malformed, is quarantined again: never processed with nothing.
    wait_for(lambda: daemon.db.sms_fin_rawdata.find_one({"_id": "broken-1"}).get("smsd_quarantine"),
             what="re-quarantined")
    assert daemon.db.sms_fin_rawdata.find_one({"_id": "broken-1"}).get("isprocessed") is not True


def test_pause_and_resume_a_user(daemon):
    out = smsctl(daemon, "pause", "--user-id", "ola")
    assert out.returncode == 0, out.stderr
    seed(daemon.db, "ola", 5, start=20)
    time.sleep(2.5)   # two discovery rounds: a paused user gets no worker
    st = daemon.status()
    assert next(u for u in st["users"] if u["user_id"] == "ola")["status"] == "paused"
    assert daemon.db.sms_fin_rawdata.count_documents({"user_id": "ola", "isprocessed": False}) == 5
    assert smsctl(daemon, "resume", "--user-id", "ola").returncode == 0
    wait_for(lambda: daemon.db.sms_fin_rawdata.count_documents({"user_id": "ola", "isprocessed": False}) == 0,
             what="resumed user finished")


def test_reload_and_drain(daemon):
    assert smsctl(daemon, "reload").returncode == 0
    out = smsctl(daemon, "drain")
    assert out.returncode == 0, out.stderr
    daemon.proc.wait(timeout=30)
    assert daemon.proc.returncode == 0
    gone = smsctl(daemon, "status")
    assert gone.returncode == 3 and "not running" in gone.stderr


def test_garbage_on_the_socket_gets_errors_and_status_still_answers(daemon):
    def raw(payload: bytes, read=True):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(daemon.sock))
        s.sendall(payload)
        reply = s.recv(65536) if read else b""
        s.close()
        return reply

    assert b'"ok": false' in raw(b"this is not json\n").replace(b'"ok":false', b'"ok": false')
    assert b"unknown command" in raw(b'{"cmd": "format-disk"}\n')
    assert b'"ok": false' in raw(b'[1, 2, 3]\n').replace(b'"ok":false', b'"ok": false')
    assert b'"ok": false' in raw(b"x" * (1 << 20) + b"\n").replace(b'"ok":false', b'"ok": false')
    silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(5)]
    for s in silent:
        s.connect(str(daemon.sock))     # connect and say nothing
    many = []
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(str(daemon.sock))
        s.sendall(b'{"cmd": "status"}\n')
        many.append(s)
    answered = 0
    for s in many:
        try:
            if s.recv(65536):
                answered += 1
        except OSError:
            pass
        s.close()
    assert answered == 100           # each got a reply: status or a "busy" error
    out = smsctl(daemon, "status", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["ok"] is True
    for s in silent:
        s.close()


def test_smsctl_exits_3_when_no_daemon_runs(tmp_path):
    out = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(tmp_path / "none.sock"), "status"],
                         capture_output=True, text=True, cwd=str(REPO))
    assert out.returncode == 3 and "not running" in out.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another uid")
def test_a_peer_of_another_uid_is_refused(daemon, tmp_path):
    code = ("import socket,sys;s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
            "s.sendall(b'{\"cmd\": \"status\"}\\n');print(s.recv(4096).decode())")
    # Let uid 65534 reach the socket file, so that only SO_PEERCRED can refuse it.
    changed = []
    for path in [daemon.sock, *daemon.sock.parents]:
        mode = path.stat().st_mode & 0o7777
        want = mode | (0o006 if path == daemon.sock else 0o001)
        if want != mode:
            changed.append((path, mode))
            os.chmod(path, want)
    try:
        out = subprocess.run(["/usr/bin/python3", "-c", code, str(daemon.sock)], capture_output=True,
                             text=True, user=65534, group=65534, timeout=20)
    finally:
        for path, mode in changed:
            os.chmod(path, mode)
    assert "permission denied" in out.stdout, out.stdout + out.stderr
    assert daemon.status()["ok"] is True
