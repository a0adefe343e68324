"""First contact: `smsd once` with a wrong setup answers, and loses nothing.

Real processes: a port with nothing on it, the local LLM server answering
401/404/400 or rejecting json_schema like llama-cpp-python, a state directory
on a read-only bind mount (tests run as root, so a mode bit would not stop us).
"""
from __future__ import annotations

import contextlib
import json
import os
import pty
import socket
import subprocess
import sys
import time

import pytest
from pymongo import MongoClient

from smsd import wireformat
from smsd.lab.invariants import verify

from ..harness import REPO, run_smsd, seed, smsd_env, write_config


@pytest.fixture
def db(mongo_server, mongo_db_name):
    client = MongoClient(mongo_server.uri)
    yield client[mongo_db_name]
    client.close()


def free_port() -> int:
    """A loopback port with nothing listening on it (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def read_only_dir(path):
    """``path`` as a read-only bind mount of itself: writes fail with EROFS, even for root."""
    path.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if not ok:
        pytest.skip("cannot bind-mount here (no CAP_SYS_ADMIN): no read-only directory for root")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True, capture_output=True)
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def processed(db, user):
    return db.sms_fin_rawdata.count_documents({"user_id": user, "isprocessed": True})


def test_nothing_listening_at_the_mongodb_uri_exits_69_naming_it(tmp_path, llm_server):
    uri = f"mongodb://admin:s3cret-pw@127.0.0.1:{free_port()}"
    config = write_config(tmp_path, mongo_uri=uri, db="nowhere", llm_url=llm_server.url,
                          mongo={"timeout_ms": 500})
    t0 = time.monotonic()
    out = run_smsd(config, "once", "--user-id", "u1", "--wait", "2", timeout=60)
    assert out.returncode == 69, out.stderr[-2000:]
    assert time.monotonic() - t0 < 30
    assert f"127.0.0.1:{uri.rsplit(':', 1)[1]}" in out.stderr and "did not answer within 2 s" in out.stderr
    assert "s3cret-pw" not in out.stderr + out.stdout and "admin:***@" in out.stderr
    assert "SMSD_MONGO_URI" in out.stderr and "Traceback" not in out.stderr
    assert llm_server.stats()["calls"] == 0


def test_an_llm_that_refuses_connections_exits_69_then_resume_finishes(tmp_path, db, mongo_server,
                                                                       mongo_db_name, llm_server):
    expected = seed(db, "u2", 6)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=dead)
    out = run_smsd(config, "once", "--user-id", "u2", "--wait", "2", timeout=60)
    assert out.returncode == 69, out.stderr[-2000:]
    assert dead in out.stderr and "model smsd-test" in out.stderr and "connection error" in out.stderr
    assert "SMSD_LLM_BASE_URL" in out.stderr and processed(db, "u2") == 0
    good = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    again = run_smsd(good, "once", "--user-id", "u2", "--resume")
    assert again.returncode == 0, again.stderr[-2000:]
    report = verify(db, expected, state_dir=tmp_path / "state")
    assert report.ok, report.to_dict()


@pytest.mark.parametrize("llm_server", [{"api_key": "sk-right-key-000"}], indirect=True)
def test_a_wrong_key_stops_at_once_with_exit_78_and_the_server_s_words(tmp_path, db, mongo_server,
                                                                       mongo_db_name, llm_server):
    expected = seed(db, "u3", 12)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    t0 = time.monotonic()
    out = run_smsd(config, "once", "--user-id", "u3", OPENAI_API_KEY="sk-wrong-key-123456")
    assert out.returncode == 78, out.stderr[-2000:]
    assert time.monotonic() - t0 < 20
    assert "Incorrect API key provided" in out.stderr and "OPENAI_API_KEY" in out.stderr
    assert "sk-wrong-key-123456" not in out.stderr + out.stdout
    assert llm_server.stats()["calls"] <= 2           # the calls in flight, never a retry loop
    assert processed(db, "u3") == 0
    assert db.sms_fin_rawdata.count_documents({"smsd_quarantine": {"$exists": True}}) == 0
    fixed = run_smsd(config, "once", "--user-id", "u3", "--resume", OPENAI_API_KEY="sk-right-key-000")
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()


@pytest.mark.parametrize("llm_server", [{"strict_model": True, "model": "smsd-local"}], indirect=True)
def test_an_unknown_model_exits_78_naming_the_model_setting(tmp_path, db, mongo_server, mongo_db_name,
                                                            llm_server):
    seed(db, "u4", 3)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    out = run_smsd(config, "once", "--user-id", "u4")
    assert out.returncode == 78, out.stderr[-2000:]
    assert "smsd-test" in out.stderr and "does not exist" in out.stderr and "SMSD_LLM_MODEL" in out.stderr


def test_a_400_the_contract_never_deserves_exits_78(tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "u5", 3)
    llm_server.script(["400"] * 40)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"concurrency": 1})
    out = run_smsd(config, "once", "--user-id", "u5")
    assert out.returncode == 78, out.stderr[-2000:]
    assert "HTTP 400" in out.stderr and "Invalid request (injected)" in out.stderr
    assert llm_server.stats()["calls"] == 4      # two in json_schema, one in each simpler format
    assert processed(db, "u5") == 0


@pytest.mark.parametrize("llm_server", [{"reject_json_schema": True, "reject_pattern": True}], indirect=True)
def test_a_llama_cpp_like_server_gets_json_object_and_every_sms_is_stored(tmp_path, db, mongo_server,
                                                                          mongo_db_name, llm_server):
    expected = seed(db, "u6", 20)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    out = run_smsd(config, "once", "--user-id", "u6")
    assert out.returncode == 0, out.stderr[-2000:]
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    memory = json.loads((tmp_path / "state" / wireformat.MEMORY_FILE).read_text())
    assert [e["response_format"] for e in memory.values()] == ["json_object"]
    assert out.stderr.count("using json_object from now on") <= 2   # logged once per client, not per call
    assert llm_server.stats()["faults"].get("500_dialect", 0) <= 2


def test_answers_cut_at_the_token_cap_are_kept_in_part_and_nothing_is_lost(tmp_path, db, mongo_server,
                                                                           mongo_db_name, llm_server):
    expected = seed(db, "u7", 20)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          # One call at a time: the last request the server saw is the last one
                          # sent (with two, a batch sent beside the last re-asks could arrive after them).
                          llm={"completion_tokens_per_sms": 40, "completion_tokens_margin": 40,
                               "concurrency": 1},
                          pipeline={"max_attempts": 2})
    out = run_smsd(config, "once", "--user-id", "u7")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "truncated" in out.stderr                 # batches of 5 did not fit in 5 * 40 + 40 tokens
    # The re-asks went alone, under a cap of 1 * 40 + 40 tokens: with one call at a time, the
    # call logged after each "re-asks" line is that re-ask.
    lines = [ln for ln in out.stderr.splitlines() if " re-asks " in ln or "llm call n_sms=" in ln]
    reasks = [nxt for ln, nxt in zip(lines, lines[1:]) if " re-asks " in ln]
    assert reasks, out.stderr[-2000:]
    for call in reasks:
        fields = dict(f.split("=", 1) for f in call.split() if "=" in f)
        assert fields["n_sms"] == "1" and int(fields["completion_tokens"]) <= 80, call
    report = verify(db, expected, state_dir=tmp_path / "state", billed=llm_server.stats()["billed"])
    assert report.ok, report.to_dict()
    stored = processed(db, "u7")
    quarantined = db.sms_fin_rawdata.count_documents({"user_id": "u7", "smsd_quarantine": {"$exists": True}})
    assert stored + quarantined == 20 and stored > 0


def test_a_read_only_state_directory_exits_73_naming_it(tmp_path, mongo_server, mongo_db_name, llm_server):
    state = tmp_path / "state"
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    with read_only_dir(state):
        out = run_smsd(config, "once", "--user-id", "u8")
    assert out.returncode == 73, out.stderr[-2000:]
    assert str(state) in out.stderr and "Read-only file system" in out.stderr
    assert "SMSD_STATE_DIR" in out.stderr and "Traceback" not in out.stderr


def test_a_file_where_the_state_directory_should_be_exits_73(tmp_path, mongo_server, mongo_db_name, llm_server):
    (tmp_path / "state").write_text("not a directory")
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    out = run_smsd(config, "once", "--user-id", "u9")
    assert out.returncode == 73, out.stderr[-2000:]
    assert "state directory" in out.stderr and "Traceback" not in out.stderr


def test_the_same_500_on_every_attempt_ends_as_a_configuration_error_not_a_retry_loop(
        tmp_path, db, mongo_server, mongo_db_name, llm_server):
    seed(db, "u10", 3)
    llm_server.set_faults(p_500=1.0)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"concurrency": 1})
    out = run_smsd(config, "once", "--user-id", "u10")
    assert out.returncode == 78, out.stderr[-2000:]
    assert "gave the same error" in out.stderr and "HTTP 500" in out.stderr
    # json_schema twice, then each simpler format, then the retry cap (max_retries = 3): bounded.
    assert llm_server.stats()["calls"] <= 3 + 2 + 3
    assert processed(db, "u10") == 0


def test_a_batch_too_long_for_the_model_is_asked_alone_then_quarantined(tmp_path, db, mongo_server,
                                                                        mongo_db_name, llm_server):
    expected = seed(db, "u11", 3)
    llm_server.script(["too_long"] * 20)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                          llm={"concurrency": 1}, pipeline={"max_attempts": 2})
    out = run_smsd(config, "once", "--user-id", "u11")
    assert out.returncode == 0, out.stderr[-2000:]
    reasons = [d["smsd_quarantine"]["reason"]
               for d in db.sms_fin_rawdata.find({"user_id": "u11", "smsd_quarantine": {"$exists": True}})]
    assert len(reasons) == 3 and all("too long" in r for r in reasons)
    assert llm_server.stats()["calls"] == 1 + 3      # the batch of 3, then each SMS alone once more
    report = verify(db, expected, state_dir=tmp_path / "state")
    assert report.sms_lost == 0 and report.unflushed_left == 0


def test_on_a_terminal_once_shows_what_it_waits_for(tmp_path, llm_server):
    config = write_config(tmp_path, mongo_uri=f"mongodb://127.0.0.1:{free_port()}", db="x",
                          llm_url=llm_server.url, mongo={"timeout_ms": 300})
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "smsd.cli", "once", "--user-id", "u1", "--wait", "3"],
                            env=smsd_env(config), stdout=subprocess.PIPE, stderr=slave, cwd=str(REPO))
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:      # EIO: the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(master)
    text = seen.decode(errors="replace")
    assert proc.returncode == 69
    assert "waiting for MongoDB at mongodb://127.0.0.1:" in text and "/3 s" in text
