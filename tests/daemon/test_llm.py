"""The LLM client: the real openai SDK over real HTTP to the local server (no patching).

Covers the happy path on the labelled fixtures, every injected fault, the
retry policy (Retry-After, cap, no retry on 4xx, stop event), the rate-limiter
hooks, answer validation and the strict response_format.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from decimal import Decimal

import pytest

from smsd import llm, model
from smsd.llm import LlmClient, LlmConfigError, LlmError, LlmStopped, response_format, validate_answer

pytest_plugins = ["tests.fixtures_llm"]


def to_sms(line: dict, user: str = "u1") -> model.Sms:
    return model.Sms(raw_id=line["id"], key=model.sms_key(line["id"]), user_id=user,
                     text=line["text"], sender=line.get("sender"))


def client_for(server, **kw) -> LlmClient:
    # key_header: the local server counts asks per SMS key although the wire ids are "1".."N".
    opts = dict(base_url=server.url, api_key=None, model="test-model", timeout=5.0,
                max_retries=3, backoff_base=0.01, backoff_max=0.05, key_header=True)
    opts.update(kw)
    return LlmClient(**opts)


def expected_json(line: dict) -> dict:
    """The fixture's expected answer in SmsResult.to_json form (all optional fields present)."""
    return model.SmsResult.from_json(dict(line["expected"], id=model.sms_key(line["id"]))).to_json()


class RecordingLimiter:
    """A duck-typed stand-in for ratelimit.RateLimiter that records what the client tells it."""

    def __init__(self):
        self.acquired: list[int] = []
        self.penalties: list[float] = []
        self.adjustments: list[int] = []

    def acquire(self, tokens: int = 0, stop=None) -> float:
        self.acquired.append(tokens)
        return 0.0

    def penalize(self, seconds: float) -> None:
        self.penalties.append(seconds)

    def adjust_tokens(self, delta: int) -> None:
        self.adjustments.append(delta)


# --------------------------------------------------------------------------- happy path

def test_every_fixture_comes_back_as_expected_with_exact_decimals(llm_server, sms_fixtures):
    client = client_for(llm_server)
    got: dict[str, model.SmsResult] = {}
    calls = 0
    for i in range(0, len(sms_fixtures), 40):
        batch = [to_sms(line) for line in sms_fixtures[i:i + 40]]
        answer = client.extract(batch)
        calls += 1
        assert answer.failed == {} and answer.unknown_ids == [] and answer.attempts == 1
        assert answer.request_id and answer.request_id.startswith("req_")
        assert answer.completion_id.startswith("chatcmpl-")
        assert answer.model == "test-model"
        assert answer.usage.prompt_tokens > 0 and answer.usage.completion_tokens > 0
        got.update(answer.results)
    assert len(got) == len(sms_fixtures)
    for line in sms_fixtures:
        result = got[model.sms_key(line["id"])]
        assert result.to_json() == expected_json(line)
        for txn, exp in zip(result.transactions, line["expected"]["transactions"]):
            assert isinstance(txn.amount, Decimal) and str(txn.amount) == exp["amount"]
            if exp["balance"] is not None:
                assert txn.balance == Decimal(exp["balance"]) and str(txn.balance) == exp["balance"]
    stats = llm_server.stats()
    assert stats["calls"] == calls
    assert set(stats["asked"].values()) == {1} and len(stats["asked"]) == len(sms_fixtures)
    assert stats["prompt_tokens"] > 0


def test_request_carries_strict_schema_temperature_and_the_contract_user_document(llm_server, sms_fixtures):
    client = client_for(llm_server, temperature=0.0)
    client.extract([to_sms(sms_fixtures[0])])
    req = llm_server.last_request()
    assert req["model"] == "test-model" and req["temperature"] == 0.0
    assert req["roles"] == ["system", "user"]
    assert req["system_prompt_chars"] == len(llm.SYSTEM_PROMPT)
    assert req["ids"] == ["1"]    # short ids, local to the call
    assert req["response_format"] == response_format(True)
    assert req["authorization"] is True  # the placeholder key is sent: local servers ignore it


def test_empty_batch_makes_no_call(llm_server):
    answer = client_for(llm_server).extract([])
    assert answer.results == {} and answer.attempts == 0
    assert llm_server.stats()["calls"] == 0


# --------------------------------------------------------------------------- retries

def test_429_retry_after_is_honoured_and_the_limiter_is_penalized(llm_server, sms_fixtures):
    llm_server.set_faults(retry_after_s=1)
    llm_server.script(["429", "ok"])
    limiter = RecordingLimiter()
    client = client_for(llm_server, rate_limiter=limiter)
    t0 = time.monotonic()
    answer = client.extract([to_sms(sms_fixtures[0])])
    waited = time.monotonic() - t0
    assert waited >= 1.0
    assert answer.attempts == 2 and len(answer.results) == 1
    stats = llm_server.stats()
    assert stats["calls"] == 2 and stats["faults"] == {"429": 1}
    assert gap(stats["call_times"]) >= 1.0
    assert limiter.penalties == [1.0]
    assert len(limiter.acquired) == 2 and all(t > 0 for t in limiter.acquired)
    assert len(limiter.adjustments) == 1


def gap(times: list[float]) -> float:
    return times[-1] - times[0]


def test_503_retry_after_is_honoured_but_does_not_penalize(llm_server, sms_fixtures):
    llm_server.set_faults(retry_after_s=1)
    llm_server.script(["503", "ok"])
    limiter = RecordingLimiter()
    answer = client_for(llm_server, rate_limiter=limiter).extract([to_sms(sms_fixtures[0])])
    assert answer.attempts == 2
    assert gap(llm_server.stats()["call_times"]) >= 1.0
    assert limiter.penalties == []


def test_500_and_dropped_connections_are_retried(llm_server, sms_fixtures):
    llm_server.script(["500", "close", "500", "ok"])
    answer = client_for(llm_server).extract([to_sms(line) for line in sms_fixtures[:3]])
    assert answer.attempts == 4 and len(answer.results) == 3 and answer.failed == {}
    assert llm_server.stats()["calls"] == 4


def test_timeout_is_retried_with_a_short_client_timeout(llm_server, sms_fixtures):
    llm_server.set_faults(timeout_sleep_s=5)
    llm_server.script(["timeout", "ok"])
    sms = [to_sms(line) for line in sms_fixtures[:2]]
    t0 = time.monotonic()
    answer = client_for(llm_server, timeout=0.5).extract(sms)
    assert time.monotonic() - t0 < 4
    assert answer.attempts == 2 and len(answer.results) == 2
    stats = llm_server.stats()
    assert stats["calls"] == 2 and stats["faults"] == {"timeout": 1}
    # the timed-out call was asked (and paid) too: each id twice
    assert stats["asked"] == {s.key: 2 for s in sms}


def test_retry_cap_is_respected_and_an_outage_stays_retryable(llm_server, sms_fixtures):
    llm_server.script(["close", "500", "close"])   # failures that differ: an outage, not a rule
    with pytest.raises(LlmError) as err:
        client_for(llm_server, max_retries=2).extract([to_sms(sms_fixtures[0])])
    assert err.value.attempts == 3 and err.value.retryable
    assert not isinstance(err.value, (LlmStopped, LlmConfigError))
    assert llm_server.stats()["calls"] == 3


def test_the_same_error_body_on_every_attempt_is_a_configuration_error_after_the_cap(llm_server, sms_fixtures):
    llm_server.set_faults(p_500=1.0)
    with pytest.raises(LlmConfigError) as err:
        client_for(llm_server, max_retries=2).extract([to_sms(sms_fixtures[0])])
    assert err.value.attempts == 3 and err.value.status == 500 and not err.value.retryable
    assert "same error 3 times" in str(err.value) and "injected" in err.value.server_message
    assert llm_server.stats()["calls"] == 3


def test_no_retries_when_max_retries_is_zero(llm_server, sms_fixtures):
    llm_server.script(["429"])
    with pytest.raises(LlmError):
        client_for(llm_server, max_retries=0).extract([to_sms(sms_fixtures[0])])
    assert llm_server.stats()["calls"] == 1


@pytest.mark.parametrize("llm_server", [{"api_key": "sk-right-key"}], indirect=True)
def test_401_is_not_retried_and_the_key_is_not_in_the_error(llm_server, sms_fixtures):
    client = client_for(llm_server, api_key="sk-wrong-key-123456")
    with pytest.raises(LlmError) as err:
        client.extract([to_sms(sms_fixtures[0])])
    assert err.value.status == 401 and not err.value.retryable and err.value.attempts == 1
    assert "sk-wrong-key-123456" not in str(err.value) and "sk-wrong-key-123456" not in repr(client)
    assert llm_server.stats()["calls"] == 1
    answer = client_for(llm_server, api_key="sk-right-key").extract([to_sms(sms_fixtures[0])])
    assert len(answer.results) == 1


def test_400_is_not_retried(llm_server, sms_fixtures):
    llm_server.script(["400", "ok"])
    with pytest.raises(LlmError) as err:
        client_for(llm_server).extract([to_sms(sms_fixtures[0])])
    assert err.value.status == 400 and not err.value.retryable
    assert llm_server.stats()["calls"] == 1


def test_stop_event_cuts_the_back_off_short(llm_server, sms_fixtures):
    llm_server.set_faults(retry_after_s=20)
    llm_server.script(["429"])
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(LlmStopped) as err:
        client_for(llm_server).extract([to_sms(sms_fixtures[0])], stop=stop)
    assert time.monotonic() - t0 < 3
    assert err.value.attempts == 1
    assert llm_server.stats()["calls"] == 1


def test_a_limiter_aborted_by_stop_becomes_llm_stopped(llm_server, sms_fixtures):
    class Aborting(RecordingLimiter):
        def acquire(self, tokens=0, stop=None):
            raise RuntimeError("aborted")

    stop = threading.Event()
    stop.set()
    with pytest.raises(LlmStopped):
        client_for(llm_server, rate_limiter=Aborting()).extract([to_sms(sms_fixtures[0])], stop=stop)
    assert llm_server.stats()["calls"] == 0


# --------------------------------------------------------------------------- partial answers

def test_malformed_answer_fails_every_id_without_echoing_content(llm_server, sms_fixtures):
    sms = [to_sms(line) for line in sms_fixtures[:4]]
    for _ in range(4):  # each malformed variant the server may pick
        llm_server.script(["malformed"])
        answer = client_for(llm_server).extract(sms)
        assert answer.results == {} and answer.attempts == 1
        assert set(answer.failed) == {s.key for s in sms}
        for reason in answer.failed.values():
            assert reason.startswith("answer ") and len(reason) < 40


def test_partial_answer_keeps_the_valid_and_asks_again_only_for_the_rest(llm_server, sms_fixtures):
    lines = sms_fixtures[:8]
    sms = [to_sms(line) for line in lines]
    by_key = {s.key: line for s, line in zip(sms, lines)}
    llm_server.set_faults(seed=5)
    llm_server.script(["partial"])
    client = client_for(llm_server)
    first = client.extract(sms)
    assert first.failed and set(first.failed.values()) == {"missing from answer"}
    assert set(first.results) | set(first.failed) == set(by_key)
    assert not set(first.results) & set(first.failed)
    for key, result in first.results.items():
        assert result.to_json() == expected_json(by_key[key])
    second = client.extract([s for s in sms if s.key in first.failed])
    assert set(second.results) == set(first.failed) and second.failed == {}
    asked = llm_server.stats()["asked"]
    assert asked == {k: (2 if k in first.failed else 1) for k in by_key}


def test_unknown_ids_are_reported_and_ignored(llm_server, sms_fixtures):
    llm_server.script(["unknown"])
    sms = [to_sms(line) for line in sms_fixtures[:2]]
    answer = client_for(llm_server).extract(sms)
    assert len(answer.unknown_ids) == 1 and answer.unknown_ids[0].startswith("unknown-")
    assert set(answer.results) == {s.key for s in sms} and answer.failed == {}


def test_bad_item_fails_only_that_id(llm_server, sms_fixtures):
    sms = [to_sms(line) for line in sms_fixtures[:5]]
    for seed in range(4):  # several corruption kinds
        llm_server.set_faults(seed=seed)
        llm_server.script(["bad_item"])
        answer = client_for(llm_server).extract(sms)
        assert len(answer.failed) == 1, answer.failed
        (key, reason), = answer.failed.items()
        assert reason.startswith("invalid item: ")
        assert set(answer.results) == {s.key for s in sms} - {key}


def test_random_faults_under_retries_never_lose_or_corrupt_a_result(make_llm_server, sms_fixtures):
    server = make_llm_server(p_429=0.1, p_500=0.1, p_malformed=0.1, p_partial=0.15, p_bad_item=0.15,
                             retry_after_s=0, seed=11)
    client = client_for(server, max_retries=8)
    pending = {model.sms_key(line["id"]): line for line in sms_fixtures[:30]}
    done: dict[str, model.SmsResult] = {}
    for _ in range(30):
        if not pending:
            break
        answer = client.extract([to_sms(line) for line in pending.values()][:10])
        for key, result in answer.results.items():
            assert result.to_json() == expected_json(pending[key])
            done[key] = result
            del pending[key]
    assert not pending and len(done) == 30
    faults = server.stats()["faults"]
    assert sum(faults.values()) >= 2, faults  # the dice did throw faults


def test_client_logs_ids_and_counts_but_no_text_or_key(llm_server, sms_fixtures, caplog):
    caplog.set_level(logging.DEBUG)
    llm_server.set_faults(retry_after_s=0)
    llm_server.script(["500", "partial"])
    lines = sms_fixtures[:3]
    answer = client_for(llm_server, api_key="sk-do-not-log-me").extract([to_sms(line) for line in lines])
    text = caplog.text
    assert "n_sms=3" in text and answer.request_id in text
    assert "sk-do-not-log-me" not in text
    for line in lines:
        assert line["text"][:25] not in text


# --------------------------------------------------------------------------- validate_answer

IDS = ["s:a", "s:b", "s:c"]
TXN = {"direction": "debit", "amount": "1234.50", "currency": "INR"}


def answer(*items, **top) -> str:
    return json.dumps({"results": list(items), **top})


def test_validate_accepts_missing_and_null_optional_fields_in_any_order():
    content = answer(
        {"transactions": [dict(TXN, channel=None, balance=None)], "kind": "transaction", "id": "s:c"},
        {"id": "s:a", "kind": "transaction", "transactions": [TXN]},
        {"id": "s:b", "kind": "otp", "transactions": []},
    )
    results, failed, unknown = validate_answer(content, IDS)
    assert failed == {} and unknown == []
    txn = results["s:a"].transactions[0]
    assert txn.amount == Decimal("1234.50") and str(txn.amount) == "1234.50"
    assert txn.channel is None and txn.balance is None and txn.counterparty is None
    assert results["s:b"].kind == "otp" and results["s:b"].transactions == ()
    assert results["s:c"].transactions[0] == txn


def test_validate_full_transaction_round_trips():
    full = dict(TXN, channel="upi", account_mask="XX1234", card_mask=None, counterparty="RAHUL",
                reference="0001", balance="99999.99", occurred_at="2026-08-30T20:20:52", bank="axis")
    results, failed, _ = validate_answer(answer({"id": "s:a", "kind": "transaction", "transactions": [full]}),
                                         ["s:a"])
    assert failed == {}
    assert results["s:a"].to_json()["transactions"] == [full]
    assert results["s:a"].transactions[0].balance == Decimal("99999.99")


def test_validate_tolerates_and_drops_extra_fields():
    content = answer({"id": "s:a", "kind": "transaction", "confidence": 0.9,
                      "transactions": [dict(TXN, note="x", mcc="5411")]}, extra="top")
    results, failed, _ = validate_answer(content, ["s:a"])
    assert failed == {}
    assert results["s:a"].to_json()["transactions"][0]["amount"] == "1234.50"
    assert "note" not in results["s:a"].to_json()["transactions"][0]


@pytest.mark.parametrize("content", ["not json", "", "[1, 2]", '{"result": []}', '{"results": {}}', "null"])
def test_validate_unusable_content_fails_every_id(content):
    results, failed, unknown = validate_answer(content, IDS)
    assert results == {} and unknown == [] and set(failed) == set(IDS)
    assert all(r.startswith("answer ") for r in failed.values())


@pytest.mark.parametrize("bad", [
    {"amount": "1,234.00"}, {"amount": 1234.5}, {"amount": "-5"}, {"amount": "1e3"}, {"amount": None},
    {"direction": "sideways"}, {"currency": "inr"}, {"currency": "Rs"}, {"channel": "cheque"},
    {"balance": "9,999"}, {"counterparty": 42},
])
def test_validate_invalid_transaction_fails_only_that_id(bad):
    content = answer({"id": "s:a", "kind": "transaction", "transactions": [dict(TXN, **bad)]},
                     {"id": "s:b", "kind": "transaction", "transactions": [TXN]})
    results, failed, _ = validate_answer(content, ["s:a", "s:b"])
    assert set(results) == {"s:b"} and set(failed) == {"s:a"}
    assert failed["s:a"].startswith("invalid item: transaction 0: ")


@pytest.mark.parametrize("field", ["direction", "amount", "currency"])
def test_validate_missing_required_transaction_field_is_invalid(field):
    txn = {k: v for k, v in TXN.items() if k != field}
    _, failed, _ = validate_answer(answer({"id": "s:a", "kind": "transaction", "transactions": [txn]}), ["s:a"])
    assert set(failed) == {"s:a"}


def test_validate_item_level_rules():
    content = answer(
        {"id": "s:a", "kind": "bogus", "transactions": []},
        {"id": "s:b", "kind": "transaction", "transactions": []},
        {"id": "s:c", "kind": "transaction", "transactions": "none"},
        {"id": "s:d", "kind": "declined"},  # missing transactions on a non-transaction kind: []
        {"kind": "other", "transactions": []},  # no id: cannot be attributed
        "garbage",
    )
    results, failed, _ = validate_answer(content, ["s:a", "s:b", "s:c", "s:d", "s:e"])
    assert set(results) == {"s:d"}
    assert failed["s:a"] == "invalid item: kind missing or unknown"
    assert failed["s:b"] == "invalid item: kind transaction without transactions"
    assert failed["s:c"] == "invalid item: transactions is not a list"
    assert failed["s:e"] == "missing from answer"


def test_validate_non_transaction_kind_keeps_kind_and_drops_transactions():
    results, failed, _ = validate_answer(
        answer({"id": "s:a", "kind": "declined", "transactions": [TXN]}), ["s:a"])
    assert failed == {} and results["s:a"].kind == "declined" and results["s:a"].transactions == ()


def test_validate_unknown_and_duplicate_ids():
    content = answer(
        {"id": "s:a", "kind": "transaction", "transactions": [dict(TXN, amount="bad")]},
        {"id": "s:a", "kind": "transaction", "transactions": [dict(TXN, amount="2")]},
        {"id": "s:a", "kind": "transaction", "transactions": [dict(TXN, amount="3")]},
        {"id": "s:zzz", "kind": "other", "transactions": []},
        {"id": "s:zzz", "kind": "other", "transactions": []},
    )
    results, failed, unknown = validate_answer(content, ["s:a"])
    assert results["s:a"].transactions[0].amount == Decimal("2")  # the first valid one wins
    assert failed == {} and unknown == ["s:zzz"]


def test_validate_normalizes_blank_text_and_non_iso_dates():
    txn = dict(TXN, counterparty="  ", occurred_at="yesterday", reference="", bank=" hdfc ")
    results, _, _ = validate_answer(answer({"id": "s:a", "kind": "transaction", "transactions": [txn]}), ["s:a"])
    t = results["s:a"].transactions[0]
    assert t.counterparty is None and t.reference is None and t.occurred_at is None and t.bank == "hdfc"
    for ok in ("2026-05-02", "2026-05-02T19:53", "2026-05-02T19:53:18+05:30"):
        results, _, _ = validate_answer(
            answer({"id": "s:a", "kind": "transaction", "transactions": [dict(TXN, occurred_at=ok)]}), ["s:a"])
        assert results["s:a"].transactions[0].occurred_at == ok


def test_validate_keeps_many_transactions_in_order():
    txns = [dict(TXN, amount="10"), dict(TXN, direction="credit", amount="0.50")]
    results, _, _ = validate_answer(answer({"id": "s:a", "kind": "transaction", "transactions": txns}), ["s:a"])
    assert [(t.direction, t.amount) for t in results["s:a"].transactions] == [
        ("debit", Decimal("10")), ("credit", Decimal("0.50"))]


# --------------------------------------------------------------------------- response_format

def _walk_objects(node):
    if isinstance(node, dict):
        if node.get("type") == "object":
            yield node
        for value in node.values():
            yield from _walk_objects(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk_objects(value)


def test_strict_response_format_requires_every_property_and_makes_optional_ones_nullable():
    rf = response_format(True)
    assert rf["type"] == "json_schema"
    assert rf["json_schema"]["name"] == "smsd_transactions" and rf["json_schema"]["strict"] is True
    schema = rf["json_schema"]["schema"]
    objects = list(_walk_objects(schema))
    assert len(objects) == 3
    for obj in objects:
        assert obj["required"] == list(obj["properties"])
        assert obj["additionalProperties"] is False
    text = json.dumps(schema)
    for keyword in ('"pattern"', '"$schema"', '"title"', '"description"'):
        assert keyword not in text
    txn = schema["properties"]["results"]["items"]["properties"]["transactions"]["items"]["properties"]
    for name in model.OPTIONAL_FIELDS:
        t = txn[name]["type"]
        assert isinstance(t, list) and "null" in t, name
    assert None in txn["channel"]["enum"]
    for name in ("direction", "amount", "currency"):
        assert "null" not in json.dumps(txn[name].get("type")), name


def test_non_strict_response_format_is_the_contract_schema_without_its_annotations():
    with open(llm.__file__.replace("llm.py", "llm_response.schema.json")) as fh:
        contract = json.load(fh)
    rf = response_format(False)
    schema = rf["json_schema"]["schema"]
    assert rf["json_schema"]["strict"] is False
    text = json.dumps(schema)
    for keyword in ('"$schema"', '"title"', '"description"'):
        assert keyword not in text
    assert '"pattern"' in text and text.count('"pattern"') == json.dumps(contract).count('"pattern"')

    def constraints(node):   # the contract minus its annotations: the same rules for the model
        if isinstance(node, list):
            return [constraints(n) for n in node]
        if not isinstance(node, dict):
            return node
        return {k: ({n: constraints(v) for n, v in val.items()} if k == "properties" else constraints(val))
                for k, val in node.items() if k not in ("$schema", "title", "description", "$id",
                                                        "examples", "default")}
    assert schema == constraints(contract)


def test_retry_after_header_forms():
    assert llm.retry_after_seconds({"retry-after": "3"}) == 3.0
    assert llm.retry_after_seconds({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert llm.retry_after_seconds({"retry-after": "soon"}) is None
    assert llm.retry_after_seconds({}) is None
    from email.utils import format_datetime
    from datetime import datetime, timedelta, timezone
    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=30), usegmt=True)
    assert 25 <= llm.retry_after_seconds({"retry-after": when}) <= 31
