"""The local OpenAI-compatible server: wire format, counting, faults, admin API, CLI.

The server runs as a subprocess (``tests/fixtures_llm.py``) and is spoken to
over real HTTP, with urllib for the raw view and the real openai SDK.
"""
from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import openai
import pytest

from smsd import tokens
from smsd.lab import llmserver
from tests.fixtures_llm import READY_PREFIX, REPO, fixtures_path

pytest_plugins = ["tests.fixtures_llm"]


def post(url: str, body, headers: dict | None = None, timeout: float = 10.0):
    """POST JSON; returns (status, headers, parsed body)."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.headers, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read() or b"null")


def chat_body(items: list[dict], model: str = "test-model") -> dict:
    return {"model": model, "temperature": 0,
            "messages": [{"role": "system", "content": "be exact"},
                         {"role": "user", "content": json.dumps({"sms": items}, ensure_ascii=False)}]}


def items_of(lines: list[dict]) -> list[dict]:
    return [{"id": line["id"], "text": line["text"], "sender": line["sender"], "received_at": None}
            for line in lines]


def test_server_answers_known_fixtures_in_the_chat_completion_shape(llm_server, sms_fixtures):
    lines = sms_fixtures[:5]
    body = chat_body(items_of(lines))
    status, headers, answer = post(llm_server.url + "/chat/completions", body)
    assert status == 200
    assert headers["x-request-id"].startswith("req_")
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    assert answer["model"] == "test-model"
    content = answer["choices"][0]["message"]["content"]
    results = json.loads(content)["results"]
    assert [r["id"] for r in results] == [line["id"] for line in lines]
    for r, line in zip(results, lines):
        assert {"kind": r["kind"], "transactions": r["transactions"]} == line["expected"]
    # Usage is counted with OpenAI's BPE encoding over the whole request (smsd.tokens).
    prompt = tokens.request_tokens(body["messages"], body.get("response_format"), "test-model")
    completion = tokens.count(content)
    assert prompt > 3 * len(lines) and completion > 0
    assert answer["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion,
                               "prompt_tokens_details": {"cached_tokens": 0}}
    stats = llm_server.stats()
    assert stats["calls"] == 1
    assert stats["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert stats["completion_tokens"] == answer["usage"]["completion_tokens"]


def test_unknown_text_is_answered_as_other(llm_server):
    status, _, answer = post(llm_server.url + "/chat/completions",
                             chat_body([{"id": "x1", "text": "hello there", "sender": None, "received_at": None}]))
    assert status == 200
    assert json.loads(answer["choices"][0]["message"]["content"]) == {
        "results": [{"id": "x1", "kind": "other", "transactions": []}]}


def test_server_records_when_each_answer_was_written_by_request_id(llm_server, sms_fixtures):
    items = items_of(sms_fixtures[:3])
    llm_server.script(["ok", "500", "ok"])
    t0 = time.time()
    ids = []
    for _ in range(3):
        status, headers, _ = post(llm_server.url + "/chat/completions", chat_body(items))
        if status == 200:
            ids.append(headers["x-request-id"])
    # The server notes a response after its last byte is out, so the client may read that
    # byte (and ask for the stats) a moment before the note: wait for it, bounded.
    deadline = time.monotonic() + 5
    while len(responses := llm_server.stats()["responses"]) < len(ids) and time.monotonic() < deadline:
        time.sleep(0.02)
    t1 = time.time()   # after the stats
    # Only answered completions, in order, with the id the client saw and a time within the call.
    assert [r["request_id"] for r in responses] == ids and len(ids) == 2
    assert all(r["n_sms"] == 3 and t0 <= r["written_at"] <= t1 for r in responses)
    llm_server.reset()
    assert llm_server.stats()["responses"] == []


def test_models_endpoint_lists_the_model_through_the_sdk(llm_server):
    client = openai.OpenAI(base_url=llm_server.url, api_key="unused", max_retries=0, timeout=5)
    assert [m.id for m in client.models.list().data] == ["smsd-local"]


def test_server_counts_asks_per_id_calls_and_times_and_reset_clears_them(llm_server, sms_fixtures):
    a, b = items_of(sms_fixtures[:2])
    t0 = time.time()
    post(llm_server.url + "/chat/completions", chat_body([a, b]))
    post(llm_server.url + "/chat/completions", chat_body([a]))
    stats = llm_server.stats()
    assert stats["calls"] == 2
    assert stats["asked"] == {a["id"]: 2, b["id"]: 1}
    assert len(stats["call_times"]) == 2 and all(t >= t0 - 1 for t in stats["call_times"])
    assert stats["faults"] == {} and stats["rejected_429"] == 0
    llm_server.reset()
    stats = llm_server.stats()
    assert stats["calls"] == 0 and stats["asked"] == {} and stats["call_times"] == []
    assert stats["prompt_tokens"] == 0


def test_scripted_faults_apply_in_order_and_are_counted_by_kind(llm_server, sms_fixtures):
    items = items_of(sms_fixtures[:3])
    llm_server.set_faults(retry_after_s=2)
    llm_server.script(["429", "500", "malformed", "ok"])
    url = llm_server.url + "/chat/completions"
    status, headers, body = post(url, chat_body(items))
    assert status == 429 and headers["Retry-After"] == "2"
    assert body["error"]["code"] == "rate_limit_exceeded"
    status, _, body = post(url, chat_body(items))
    assert status == 500 and body["error"]["type"] == "server_error"
    status, headers, body = post(url, chat_body(items))
    assert status == 200 and headers["x-smsd-fault"] == "malformed"
    with pytest.raises(ValueError):
        json.loads(body["choices"][0]["message"]["content"])
    status, headers, body = post(url, chat_body(items))
    assert status == 200 and "x-smsd-fault" not in headers
    stats = llm_server.stats()
    assert stats["faults"] == {"429": 1, "500": 1, "malformed": 1}
    assert stats["calls"] == 4
    # every call counts every id as asked, whatever its fate; "billed" only those the model ran on
    assert set(stats["asked"].values()) == {4}
    assert set(stats["billed"].values()) == {2}


def test_partial_answer_drops_a_nonempty_subset(llm_server, sms_fixtures):
    items = items_of(sms_fixtures[:6])
    llm_server.set_faults(p_partial=1.0, seed=3)
    for _ in range(5):
        status, headers, body = post(llm_server.url + "/chat/completions", chat_body(items))
        assert status == 200
        returned = {r["id"] for r in json.loads(body["choices"][0]["message"]["content"])["results"]}
        known = returned & {i["id"] for i in items}
        assert len(known) < len(items)
        extra = returned - known
        assert all(x.startswith("unknown-") for x in extra)
        assert set(headers["x-smsd-fault-ids"].split(",")) == ({i["id"] for i in items} - known) | extra
    assert llm_server.stats()["faults"] == {"partial": 5}


def test_bad_item_corrupts_exactly_one_result(llm_server, sms_fixtures):
    items = items_of(sms_fixtures[:4])
    llm_server.script(["bad_item"])
    status, headers, body = post(llm_server.url + "/chat/completions", chat_body(items))
    assert status == 200
    victim = headers["x-smsd-fault-ids"]
    results = {r["id"]: r for r in json.loads(body["choices"][0]["message"]["content"])["results"]}
    assert set(results) == {i["id"] for i in items}
    expected = {line["id"]: line["expected"] for line in sms_fixtures[:4]}
    for key, r in results.items():
        same = {"kind": r.get("kind"), "transactions": r["transactions"]} == expected[key]
        assert same == (key != victim)


def test_seeded_random_faults_are_reproducible(make_llm_server, sms_fixtures):
    items = items_of(sms_fixtures[:1])

    def run() -> list[int]:
        server = make_llm_server(p_429=0.3, p_500=0.3, seed=42, retry_after_s=0)
        codes = [post(server.url + "/chat/completions", chat_body(items))[0] for _ in range(12)]
        stats = server.stats()
        assert stats["faults"].get("429", 0) == codes.count(429)
        assert stats["faults"].get("500", 0) == codes.count(500)
        return codes

    first = run()
    assert first == run()
    assert {429, 500, 200} <= set(first)


def test_rpm_limit_rejects_with_429_and_counts_rejections(make_llm_server, sms_fixtures):
    server = make_llm_server(rpm_limit=3, retry_after_s=1)
    items = items_of(sms_fixtures[:1])
    codes = [post(server.url + "/chat/completions", chat_body(items))[0] for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    stats = server.stats()
    assert stats["rejected_429"] == 2 and stats["calls"] == 5 and stats["faults"] == {}


def test_timeout_fault_sleeps_before_answering(llm_server, sms_fixtures):
    llm_server.set_faults(timeout_sleep_s=0.6)
    llm_server.script(["timeout"])
    t0 = time.monotonic()
    status, _, _ = post(llm_server.url + "/chat/completions", chat_body(items_of(sms_fixtures[:1])))
    assert status == 200 and time.monotonic() - t0 >= 0.6
    assert llm_server.stats()["faults"] == {"timeout": 1}


def test_latency_is_added(llm_server, sms_fixtures):
    llm_server.set_faults(latency_ms=300)
    t0 = time.monotonic()
    post(llm_server.url + "/chat/completions", chat_body(items_of(sms_fixtures[:1])))
    assert time.monotonic() - t0 >= 0.3


@pytest.mark.parametrize("llm_server", [{"api_key": "sk-test-secret"}], indirect=True)
def test_server_requires_the_configured_api_key(llm_server, sms_fixtures):
    body = chat_body(items_of(sms_fixtures[:1]))
    status, _, err = post(llm_server.url + "/chat/completions", body, {"Authorization": "Bearer wrong"})
    assert status == 401 and err["error"]["code"] == "invalid_api_key"
    status, _, _ = post(llm_server.url + "/chat/completions", body, {"Authorization": "Bearer sk-test-secret"})
    assert status == 200
    assert llm_server.last_request()["authorization"] is True


def test_bad_requests_get_400(llm_server):
    url = llm_server.url + "/chat/completions"
    assert post(url, {"model": "m"})[0] == 400
    assert post(url, {"model": "m", "messages": [{"role": "user", "content": "not json"}]})[0] == 400
    assert post(url, {"model": "m", "messages": [{"role": "user", "content": '{"sms": [{"id": 1}]}'}]})[0] == 400


def test_admin_rejects_unknown_settings_and_script_entries(llm_server):
    with pytest.raises(RuntimeError, match="400"):
        llm_server.set_faults(p_explode=1)
    with pytest.raises(RuntimeError, match="400"):
        llm_server.set_faults(p_429=0.8, p_500=0.8)
    with pytest.raises(RuntimeError, match="400"):
        llm_server.script(["boom"])
    assert llm_server.set_faults(latency_ms=5)["latency_ms"] == 5
    llm_server.reset(faults=True)
    assert llm_server.faults()["latency_ms"] == 0


def test_cli_prints_one_ready_line_and_exits_cleanly_on_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "smsd.lab.llmserver", "--port", "0",
                             "--answers", str(fixtures_path()), "--p-429", "0.1", "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(REPO))
    try:
        line = proc.stdout.readline()
        assert line.startswith(READY_PREFIX) and line.strip().endswith("/v1")
        url = line[len(READY_PREFIX):].strip()
        with urllib.request.urlopen(url.removesuffix("/v1") + "/_admin/faults", timeout=5) as resp:
            faults = json.loads(resp.read())
        assert faults["p_429"] == 0.1 and faults["seed"] == 1
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert out == ""  # nothing but the ready line on stdout


def test_server_logs_no_sms_text(make_llm_server, sms_fixtures):
    server = make_llm_server(log_level="DEBUG", p_bad_item=0.5, seed=1)
    lines = sms_fixtures[:3]
    for _ in range(3):
        assert post(server.url + "/chat/completions", chat_body(items_of(lines)))[0] == 200
    log_text = server.log_text()
    assert "call n_sms=3" in log_text
    for line in lines:
        assert line["text"][:20] not in log_text
        for txn in line["expected"]["transactions"]:
            assert (txn["counterparty"] or "\0") not in log_text


def test_known_answers_table_fallback_and_jsonl(tmp_path):
    path = tmp_path / "answers.jsonl"
    expected = {"kind": "otp", "transactions": []}
    path.write_text(json.dumps({"text": "your OTP is 1", "expected": expected}) + "\n\n")
    known = llmserver.KnownAnswers.from_jsonl(path)
    assert len(known) == 1
    assert known({"id": "a", "text": "your OTP is 1"}) == expected
    assert known({"id": "b", "text": "??"}) == {"kind": "other", "transactions": []}
    with_fallback = llmserver.KnownAnswers({}, fallback=lambda item: {"kind": "promotion", "transactions": []})
    assert with_fallback({"id": "c", "text": "sale!"})["kind"] == "promotion"
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="answers.jsonl:1"):
        llmserver.KnownAnswers.from_jsonl(path)


def test_rules_extractor_is_loaded_lazily():
    try:
        import smsd.rules  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError):
            llmserver.make_extractor("rules")
    else:
        extract = llmserver.make_extractor("rules")
        answer = extract({"id": "a", "text": "Your OTP is 123456", "sender": None})
        assert answer["kind"] in ("otp", "other")


def test_in_process_server_class(sms_fixtures):
    known = llmserver.KnownAnswers({line["text"]: line["expected"] for line in sms_fixtures})
    with llmserver.LlmServer(known, "127.0.0.1", 0, latency_ms=1) as server:
        server.script(["500"])
        assert post(server.url + "/chat/completions", chat_body(items_of(sms_fixtures[:1])))[0] == 500
        assert post(server.url + "/chat/completions", chat_body(items_of(sms_fixtures[:1])))[0] == 200
        stats = server.stats()
        assert stats["calls"] == 2 and stats["faults"] == {"500": 1}
