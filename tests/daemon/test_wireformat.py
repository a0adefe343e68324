"""Talking to servers of other dialects: response_format modes, error classes, the token cap.

The real openai SDK over HTTP to the local server started with dialect
switches (llama-cpp-python's rejection of json_schema, a grammar engine's
rejection of ``pattern``, a server that honours only one token-cap
parameter, answers cut at ``finish_reason: "length"``).
"""
from __future__ import annotations

import json

import pytest

from smsd import llm, model, wireformat
from smsd.llm import LlmBatchError, LlmClient, LlmConfigError
from smsd.llm_errors import FailureHistory, Failure
from smsd.wireformat import EndpointMemory, grammar_schema, salvage

pytest_plugins = ["tests.fixtures_llm"]


def to_sms(line: dict) -> model.Sms:
    return model.Sms(raw_id=line["id"], key=model.sms_key(line["id"]), user_id="u1",
                     text=line["text"], sender=line.get("sender"))


def client_for(server, tmp_path=None, **kw) -> LlmClient:
    opts = dict(base_url=server.url, api_key=None, model="smsd-local", timeout=5.0, max_retries=2,
                backoff_base=0.01, backoff_max=0.05, response_format="auto",
                memory=EndpointMemory(tmp_path / wireformat.MEMORY_FILE) if tmp_path else None)
    opts.update(kw)
    return LlmClient(**opts)


def batch(sms_fixtures, n=5, start=0) -> list[model.Sms]:
    return [to_sms(line) for line in sms_fixtures[start:start + n]]


# --------------------------------------------------------------------------- response_format

@pytest.mark.parametrize("llm_server", [{"reject_json_schema": True, "reject_pattern": True}], indirect=True)
def test_auto_falls_back_to_json_object_with_a_grammar_safe_schema_and_remembers_it(
        llm_server, sms_fixtures, tmp_path):
    client = client_for(llm_server, tmp_path)
    answer = client.extract(batch(sms_fixtures))
    assert len(answer.results) == 5 and answer.failed == {} and answer.response_format == "json_object"
    assert llm_server.stats()["calls"] == 2          # the refused json_schema call, then json_object
    rf = llm_server.last_request()["response_format"]
    assert rf["type"] == "json_object" and "pattern" not in json.dumps(rf["schema"])
    assert rf["schema"]["properties"]["results"]["items"]["required"] == ["id", "kind", "transactions"]
    memory = json.loads((tmp_path / wireformat.MEMORY_FILE).read_text())
    (entry,) = memory.values()
    assert entry["response_format"] == "json_object" and "json_object" in entry["reason"]
    # A new process starts where the last one ended: no refused call any more.
    llm_server.reset()
    again = client_for(llm_server, tmp_path).extract(batch(sms_fixtures, start=5))
    assert len(again.results) == 5 and llm_server.stats()["calls"] == 1


@pytest.mark.parametrize("llm_server", [{"reject_response_format": True}], indirect=True)
def test_a_server_taking_no_response_format_gets_the_schema_in_the_system_prompt(llm_server, sms_fixtures,
                                                                                 tmp_path):
    answer = client_for(llm_server, tmp_path).extract(batch(sms_fixtures))
    assert len(answer.results) == 5 and answer.response_format == "prompt"
    req = llm_server.last_request()
    assert req["response_format"] is None
    assert req["system_prompt_chars"] > len(llm.SYSTEM_PROMPT) + 500   # the schema went into the prompt
    assert llm_server.stats()["calls"] == 3


@pytest.mark.parametrize("llm_server", [{"reject_json_schema": True}], indirect=True)
def test_an_explicit_json_schema_setting_never_falls_back_and_is_a_configuration_error(llm_server,
                                                                                         sms_fixtures):
    with pytest.raises(LlmConfigError) as err:
        client_for(llm_server, response_format="json_schema").extract(batch(sms_fixtures, 2))
    assert err.value.status == 500 and "json_object" in err.value.server_message
    assert "response_format" in err.value.hint
    assert llm_server.stats()["calls"] == 1


def test_a_chance_400_is_asked_once_more_and_changes_nothing(llm_server, sms_fixtures, tmp_path):
    llm_server.script(["400", "ok"])
    answer = client_for(llm_server, tmp_path).extract(batch(sms_fixtures, 2))
    assert answer.response_format == "json_schema" and len(answer.results) == 2
    assert not (tmp_path / wireformat.MEMORY_FILE).exists()


def test_the_same_400_in_every_format_is_a_configuration_error_not_a_retry_loop(llm_server, sms_fixtures,
                                                                                tmp_path):
    llm_server.script(["400"] * 20)
    with pytest.raises(LlmConfigError) as err:
        client_for(llm_server, tmp_path).extract(batch(sms_fixtures, 2))
    assert err.value.status == 400 and "Invalid request" in err.value.server_message
    assert llm_server.stats()["calls"] == 4      # twice in json_schema, once in each simpler format
    assert not (tmp_path / wireformat.MEMORY_FILE).exists()   # nothing worked: nothing remembered


@pytest.mark.parametrize("fault,status", [("401", 401), ("403", 403), ("404", 404)])
def test_auth_and_not_found_stop_at_once_with_a_hint(llm_server, sms_fixtures, fault, status):
    llm_server.script([fault] * 5)
    with pytest.raises(LlmConfigError) as err:
        client_for(llm_server).extract(batch(sms_fixtures, 2))
    assert err.value.status == status and llm_server.stats()["calls"] == 1
    assert ("OPENAI_API_KEY" if status in (401, 403) else "llm.model") in err.value.hint


@pytest.mark.parametrize("llm_server", [{"strict_model": True, "model": "real-model"}], indirect=True)
def test_an_unknown_model_is_named_in_the_error(llm_server, sms_fixtures):
    with pytest.raises(LlmConfigError) as err:
        client_for(llm_server, model="typo-model").extract(batch(sms_fixtures, 1))
    assert err.value.status == 404 and "typo-model" in str(err.value)


def test_a_context_length_400_is_the_batch_s_fault_not_the_setup_s(llm_server, sms_fixtures):
    llm_server.script(["too_long"])
    with pytest.raises(LlmBatchError) as err:
        client_for(llm_server).extract(batch(sms_fixtures, 3))
    assert not isinstance(err.value, LlmConfigError) and err.value.status == 400


def test_a_failure_history_is_deterministic_only_when_every_body_matches():
    same = [Failure("transient", "HTTP 500", 500, "boom id 1234567") for _ in range(3)]
    history = FailureHistory(list(same))
    assert history.deterministic()
    assert not FailureHistory(same[:1]).deterministic()
    assert not FailureHistory(same + [None]).deterministic()
    assert not FailureHistory([Failure("transient", "HTTP 503", 503, "overloaded")] * 3).deterministic()
    assert not FailureHistory(same + [Failure("transient", "HTTP 500", 500, "other")]).deterministic()


# --------------------------------------------------------------------------- token cap

def test_every_call_carries_a_token_cap_sized_from_its_batch(llm_server, sms_fixtures):
    client = client_for(llm_server, completion_tokens_per_sms=150, completion_tokens_margin=50)
    client.extract(batch(sms_fixtures, 4))
    req = llm_server.last_request()
    assert req["max_tokens"] == 4 * 150 + 50 and req["max_completion_tokens"] is None
    openai_style = client_for(llm_server, completion_tokens_per_sms=10, token_param="max_completion_tokens")
    openai_style.extract(batch(sms_fixtures, 2))
    assert llm_server.last_request()["max_completion_tokens"] == 20
    assert wireformat.default_token_param("https://api.openai.com/v1") == "max_completion_tokens"


def test_an_answer_cut_at_the_cap_keeps_its_complete_results_and_fails_only_the_rest(llm_server,
                                                                                     sms_fixtures):
    whole = client_for(llm_server).extract(batch(sms_fixtures, 5))
    assert not whole.truncated
    llm_server.set_faults(truncate_chars=int(whole.usage.completion_tokens * 4 * 0.6))
    cut = client_for(llm_server).extract(batch(sms_fixtures, 5))
    assert cut.truncated and 1 <= len(cut.results) < 5
    assert set(cut.results) | set(cut.failed) == set(whole.results)
    for key, result in cut.results.items():
        assert result == whole.results[key]          # what was kept is exactly what a whole answer says
    assert all("token cap" in why for why in cut.failed.values())


@pytest.mark.parametrize("llm_server", [{"token_param": "max_completion_tokens"}], indirect=True)
def test_a_server_that_ignores_max_tokens_gets_the_other_parameter(llm_server, sms_fixtures, tmp_path):
    client = client_for(llm_server, tmp_path, completion_tokens_per_sms=20, completion_tokens_margin=0)
    first = client.extract(batch(sms_fixtures, 5))
    assert not first.truncated and first.usage.completion_tokens > 100    # the cap (100) was ignored
    assert client.wire.token_param == "max_completion_tokens"
    second = client.extract(batch(sms_fixtures, 5, start=5))
    assert llm_server.last_request()["max_completion_tokens"] == 100
    assert second.truncated and second.usage.completion_tokens <= 100
    entry, = json.loads((tmp_path / wireformat.MEMORY_FILE).read_text()).values()
    assert entry["token_param"] == "max_completion_tokens"


# --------------------------------------------------------------------------- pure functions

def test_grammar_schema_leaves_out_what_grammar_engines_reject_and_keeps_the_structure():
    schema = wireformat.load_schema()
    g = grammar_schema(schema)
    text = json.dumps(g)
    assert "pattern" not in text and "$schema" not in text and "title" not in g
    txn = g["properties"]["results"]["items"]["properties"]["transactions"]["items"]
    assert txn["required"] == ["direction", "amount", "currency"]
    assert txn["properties"]["direction"]["enum"] == ["debit", "credit"]
    assert txn["properties"]["currency"] == {"type": "string", "description": "ISO 4217"}
    assert "pattern" in json.dumps(schema)        # the contract schema itself is untouched


@pytest.mark.parametrize("content,ids", [
    ('{"results": [{"id": "a", "kind": "otp", "transactions": []}, {"id": "b", "ki', ["a"]),
    ('{"results": [{"id": "a", "kind": "otp", "transactions": []},', ["a"]),
    ('{"results": [{"id": "a", "kind": "otp", "transactions": []}, {"id": "b", "kind": "other", '
     '"transactions": []}, {"id": "c", "kind": "transaction", "transactions": [{"amount": "1', ["a", "b"]),
    ('{"results": [{"id": "x", "text": "a ] } , [ string"}, {"id"', ["x"]),
    ('{"results": [', []),
    ('Sure! Here is', []),
    ('', []),
])
def test_salvage_keeps_only_items_that_decoded_whole(content, ids):
    kept = salvage(content)
    got = [item["id"] for item in json.loads(kept)["results"]] if kept else []
    assert got == ids
