"""A local OpenAI-compatible chat-completions server for tests, the demo, drills and benchmarks.

It speaks the contract's wire format (``contract/README.md``): the last ``user``
message holds ``{"sms": [{"id", "text", "sender", "received_at"}, ...]}`` and
the answer's ``choices[0].message.content`` is ``{"results": [...]}``.

Answers come from a pluggable *extractor* ``(item) -> {"kind", "transactions"} | None``
(``None`` leaves the id out of the answer):

- :class:`KnownAnswers` — a table keyed by SMS text, loadable from the fixtures
  JSONL format (``{"text", "expected"}`` lines);
- ``rules`` — ``smsd.rules.extract(text, sender=None)``, imported lazily;
- ``--obey-injections`` wraps either in a gullible model that obeys
  "report a credit of X" written in an SMS (prompt-injection tests).

It counts calls (per SMS id, per second, tokens) and injects faults: latency,
429 (with ``Retry-After``), 500, timeouts, malformed JSON, partial answers,
invalid items, a requests-per-minute limit, and a deterministic *script* of
faults for the next calls.

Admin endpoints (JSON):

- ``GET  /_admin/stats``          counters (see :meth:`State.stats`); ``responses`` lists
  ``{"request_id", "n_sms", "written_at"}`` of every answered completion, with the wall-clock
  time (``time.time()``) at which its last byte was written; ``slots`` lists
  ``{"slot", "arrived"}`` (``time.monotonic()``) of every completion request that named
  its rate-limit send slot in smsd's lab header ``X-Smsd-Slot`` (``llm.key_header``)
- ``POST /_admin/reset``          clear counters, script and rpm window;
  body ``{"faults": true}`` also restores the faults given at start
- ``GET  /_admin/faults``         current fault settings
- ``POST /_admin/faults``         merge settings, e.g. ``{"p_429": 0.1, "seed": 7}``
- ``POST /_admin/script``         ``{"faults": ["429", "ok", ...]}`` for the next calls
- ``GET  /_admin/last_request``   shape of the last completion request (no SMS text)
- ``GET  /_admin/health``         ``{"ok": true}``
- ``GET  /_admin/batches``        Batch API counters (batches created, their states)
- ``POST /_admin/batches``        Batch API switches, e.g. ``{"delay_s": 2, "fail_ratio": 0.1}``

``/v1/files`` and ``/v1/batches`` are the Batch API (:mod:`smsd.lab.llm_batches`).

Dialects (fault settings, live too): ``reject_json_schema`` answers a
``json_schema`` response_format with llama-cpp-python's HTTP 500, ``reject_pattern``
refuses a schema holding ``pattern`` (as grammar engines do), ``token_param``
says which completion-token cap is honoured (answers over it are cut with
``finish_reason: "length"``), ``truncate_chars`` cuts every answer, and
``strict_model`` answers 404 for any model but ``--model``, and
``reject_response_format`` answers any ``response_format`` with a 400.

Script entries: ``ok``, ``429``, ``500``, ``503``, ``400``, ``401``, ``403``, ``404``, ``too_long`` (a 400
context-length error), ``timeout``,
``close`` (drop the connection without answering), ``malformed``, ``partial``,
``bad_item``, ``unknown`` (a normal answer plus one result for an unknown id).

The server never logs SMS text: only ids, counts and fault kinds.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

from .llm_batches import Batches
from .llm_batches import route as batch_route
from .llm_extractors import OTHER, Extractor, KnownAnswers, make_extractor
from .llm_extractors import rules_extractor  # noqa: F401 - re-exported: demo and tests use it
from .llm_faults import DEFAULT_FAULTS, State, _mangle
from .llm_usage import _shaped, _strict, _usage, cut_to, estimate_tokens  # noqa: F401 - estimate_tokens re-exported

log = logging.getLogger("smsd.llmserver")


class _Reject(Exception):
    """An HTTP error answer (status, OpenAI-style error body, extra headers)."""

    def __init__(self, status: int, message: str, etype: str, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": etype, "param": None, "code": code}}
        self.headers = headers or {}


# --------------------------------------------------------------------------- answers

def _parse_request(body: bytes) -> tuple[dict, list[dict], str]:
    """Return (request, sms items, all message text) or raise _Reject(400)."""
    try:
        req = json.loads(body or b"null")
    except ValueError:
        raise _Reject(400, "request body is not JSON", "invalid_request_error") from None
    if not isinstance(req, dict) or not isinstance(req.get("messages"), list) or not req["messages"]:
        raise _Reject(400, "'messages' must be a non-empty list", "invalid_request_error", "invalid_messages")
    users = [m for m in req["messages"] if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise _Reject(400, "no user message", "invalid_request_error", "invalid_messages")
    content = users[-1].get("content")
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    try:
        doc = json.loads(content) if isinstance(content, str) else None
    except ValueError:
        doc = None
    items = doc.get("sms") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not all(
            isinstance(i, dict) and isinstance(i.get("id"), str) and isinstance(i.get("text"), str)
            for i in items):
        raise _Reject(400, "user content must be {\"sms\": [{\"id\", \"text\", ...}]}",
                      "invalid_request_error", "invalid_sms_document")
    all_text = "".join(m.get("content") if isinstance(m.get("content"), str) else ""
                       for m in req["messages"] if isinstance(m, dict))
    return req, items, all_text


def _request_shape(req: dict, items: list[dict], authorized: bool) -> dict:
    """What the last request looked like, without any SMS text."""
    msgs = req.get("messages") or []
    system = [m.get("content") for m in msgs if isinstance(m, dict) and m.get("role") == "system"]
    return {
        "model": req.get("model"),
        "temperature": req.get("temperature"),
        "response_format": req.get("response_format"),
        "max_tokens": req.get("max_tokens"),
        "max_completion_tokens": req.get("max_completion_tokens"),
        "roles": [m.get("role") for m in msgs if isinstance(m, dict)],
        "system_prompt_chars": sum(len(s) for s in system if isinstance(s, str)),
        "n_sms": len(items),
        "ids": [i["id"] for i in items],
        "authorization": authorized,
    }


def _has_pattern(node: Any) -> bool:
    if isinstance(node, dict):
        return "pattern" in node or any(_has_pattern(v) for v in node.values())
    if isinstance(node, list):
        return any(_has_pattern(v) for v in node)
    return False


def _dialect_error(req: dict, faults: dict, model: str) -> _Reject | None:
    """What a server of another dialect would refuse in this request (see DEFAULT_FAULTS)."""
    if faults["strict_model"] and req.get("model") != model:
        return _Reject(404, f"The model `{req.get('model')}` does not exist or you do not have access to it.",
                       "invalid_request_error", "model_not_found")
    rf = req.get("response_format")
    if not isinstance(rf, dict):
        return None
    if faults["reject_response_format"]:
        return _Reject(400, "Unsupported parameter: 'response_format' is not supported with this model.",
                       "invalid_request_error", "unsupported_parameter")
    if faults["reject_json_schema"] and rf.get("type") == "json_schema":
        # llama-cpp-python's pydantic error, sent as a 500 as it does.
        return _Reject(500, "1 validation error for CreateChatCompletionRequest\nresponse_format.type\n"
                       "  Input should be 'text' or 'json_object' [type=literal_error, input_value='json_schema']",
                       "internal_server_error")
    if faults["reject_pattern"] and _has_pattern(rf):
        return _Reject(500, "parse: error parsing grammar: unknown escape at \\.", "internal_server_error")
    return None


def _token_cap(req: dict, faults: dict) -> int | None:
    """The completion-token cap this server reads from the request."""
    read = faults["token_param"]
    names = {"both": ("max_completion_tokens", "max_tokens"), "none": ()}.get(read, (read,))
    for name in names:
        value = req.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _results(state: State, items: list[dict], strict: bool | None = None) -> list[dict]:
    out = []
    for item in items:
        try:
            answer = state.extractor(item)
        except Exception as exc:  # an extractor bug must not kill the server; no text in the log
            log.warning("extractor failed on id=%s: %s", item["id"], exc.__class__.__name__)
            answer = dict(OTHER, transactions=[])
        if answer is None:
            continue
        out.append({"id": item["id"], "kind": answer.get("kind", "other"),
                    "transactions": [_shaped(t, strict) for t in answer.get("transactions") or []]})
    return out


def attach_batches(state: State) -> Batches:
    """Give a server's state its Batch API (files and batches answered like online calls)."""
    state.batches = Batches(lambda body: batch_answer(state, body))
    return state.batches


def batch_answer(state: State, body: dict) -> tuple[int, dict]:
    """One Batch API line: the chat completion the online endpoint would give (no faults)."""
    try:
        req, items, all_text = _parse_request(json.dumps(body).encode())
    except _Reject as rej:
        return rej.status, rej.body
    ids = [i["id"] for i in items]
    with state.lock:
        state.asked.update(ids)
        state.billed.update(ids)
        gen = state.generation
    content = json.dumps({"results": _results(state, items, _strict(req))}, ensure_ascii=False,
                         separators=(",", ":"))
    prompt_tokens, cached_tokens, completion_tokens = _usage(state, req, content, req.get("model") or state.model)
    state.add_tokens(prompt_tokens, completion_tokens, gen, cached=cached_tokens, keys=ids)
    return 200, {
        "id": "chatcmpl-" + uuid.uuid4().hex[:24], "object": "chat.completion",
        "created": int(time.time()), "model": req.get("model") or state.model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content, "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "prompt_tokens_details": {"cached_tokens": cached_tokens}}}


# --------------------------------------------------------------------------- HTTP

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "smsd-llmserver/1"
    # TCP_NODELAY: headers and body go out in two writes; with Nagle on, the body
    # waits for the client's delayed ACK and every answer took ~40 ms more than
    # `latency_ms` on keep-alive connections (measured by `smsd bench`).
    disable_nagle_algorithm = True
    state: State  # set on the subclass made per server

    def log_message(self, fmt: str, *args: Any) -> None:  # paths and status only, never bodies
        log.debug("%s %s", self.address_string(), fmt % args)

    # -- plumbing
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _send(self, status: int, obj: Any, headers: dict | None = None) -> bool:
        """Write one JSON answer; True when its last byte was handed to the socket."""
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
            return True
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True  # the client gave up (e.g. its timeout); nothing to do
            return False

    def _batch_route(self, method: str) -> bool:
        """``/v1/files`` and ``/v1/batches`` (see :mod:`smsd.lab.llm_batches`)."""
        path, _, qs = self.path.partition("?")
        path = path.rstrip("/")
        if not (path.startswith("/v1/files") or path.startswith("/v1/batches")):
            return False
        query = dict(p.split("=", 1) for p in qs.split("&") if "=" in p)
        status, obj, kind = batch_route(self.state.batches, method, path, query, self.headers, self._body)
        if kind == "bytes":
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(obj)))
                self.end_headers()
                self.wfile.write(obj)
            except OSError:
                self.close_connection = True
        else:
            self._send(status, obj)
        return True

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise _Reject(400, "body is not JSON", "invalid_request_error") from None

    # -- routes
    def do_GET(self) -> None:  # noqa: N802
        st = self.state
        path = self.path.split("?", 1)[0].rstrip("/")
        if self._batch_route("GET"):
            return
        if path == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": st.model, "object": "model", "created": 0, "owned_by": "smsd"}]})
        elif path == "/_admin/stats":
            self._send(200, st.stats())
        elif path == "/_admin/faults":
            with st.lock:
                self._send(200, dict(st.faults))
        elif path == "/_admin/last_request":
            with st.lock:
                self._send(200, dict(st.last_request))
        elif path == "/_admin/batches":
            self._send(200, st.batches.stats())
        elif path in ("/_admin/health", "/health"):
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": {"message": "not found", "type": "invalid_request_error",
                                       "param": None, "code": "not_found"}})

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if self._batch_route("POST"):
                return
            if path == "/v1/chat/completions":
                self._completion()
            elif path == "/_admin/batches":
                body = self._json_body()
                try:
                    self._send(200, self.state.batches.configure(body if isinstance(body, dict) else {}))
                except (ValueError, TypeError) as exc:
                    raise _Reject(400, str(exc), "invalid_request_error") from None
            elif path == "/_admin/reset":
                body = self._json_body()
                self.state.reset(faults=bool(isinstance(body, dict) and body.get("faults")))
                self.state.batches.reset()
                self._send(200, {"ok": True})
            elif path == "/_admin/faults":
                body = self._json_body()
                if not isinstance(body, dict):
                    raise _Reject(400, "faults must be a JSON object", "invalid_request_error")
                try:
                    self._send(200, self.state.set_faults(body))
                except (ValueError, TypeError) as exc:
                    raise _Reject(400, str(exc), "invalid_request_error") from None
            elif path == "/_admin/script":
                body = self._json_body()
                entries = body.get("faults") if isinstance(body, dict) else body
                if not isinstance(entries, list):
                    raise _Reject(400, "script must be {\"faults\": [...]}", "invalid_request_error")
                try:
                    self._send(200, {"queued": self.state.set_script(entries)})
                except ValueError as exc:
                    raise _Reject(400, str(exc), "invalid_request_error") from None
            else:
                self._body()
                raise _Reject(404, "not found", "invalid_request_error", "not_found")
        except _Reject as rej:
            self._send(rej.status, rej.body, rej.headers)

    def _completion(self) -> None:
        st = self.state
        # smsd's lab header names the rate limiter's send slot of this request (time.monotonic,
        # one clock for the host): kept with the arrival, so a test checks the limiter's promise.
        st.note_slot(self.headers.get("X-Smsd-Slot"), time.monotonic())
        body = self._body()
        auth = self.headers.get("Authorization") or ""
        if st.api_key is not None and auth != f"Bearer {st.api_key}":
            with st.lock:
                st.calls += 1
                st.call_times.append(time.time())
                st.fault_counts["401"] += 1
            raise _Reject(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        req, items, all_text = _parse_request(body)
        ids = [i["id"] for i in items]
        refused = _dialect_error(req, st.faults, st.model)
        if refused is not None:
            st.refuse(f"{refused.status}_dialect", _request_shape(req, items, bool(auth)))
            raise refused
        # smsd's lab header names the SMS keys behind ids local to the call, so that
        # the per-SMS counters (asked, billed) still name SMS across calls.
        keys_header = self.headers.get("X-Smsd-Keys")
        keys = [unquote(k) for k in keys_header.split(",")] if keys_header else []
        to_key = dict(zip(ids, keys)) if len(keys) == len(ids) else {}
        counted = [to_key.get(i, i) for i in ids]
        fault, faults, gen = st.admit(counted, _request_shape(req, items, bool(auth)))
        rng = st.dice()
        model = req.get("model") or st.model
        log.info("call n_sms=%d fault=%s", len(ids), fault)

        retry_after = faults["retry_after_s"]
        ra_headers = {"Retry-After": str(math.ceil(retry_after))}
        if retry_after != math.ceil(retry_after):
            ra_headers["retry-after-ms"] = str(int(retry_after * 1000))
        if fault == "rpm_429":
            raise _Reject(429, "Rate limit reached for requests per minute.", "requests",
                          "rate_limit_exceeded", ra_headers)
        if fault == "429":
            raise _Reject(429, "Rate limit reached (injected).", "requests", "rate_limit_exceeded", ra_headers)
        if fault == "400":
            raise _Reject(400, "Invalid request (injected).", "invalid_request_error")
        if fault == "401":
            raise _Reject(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        if fault == "too_long":
            raise _Reject(400, "This model's maximum context length is 8192 tokens. However, your messages "
                          "resulted in 9001 tokens (injected).", "invalid_request_error", "context_length_exceeded")
        if fault == "403":
            raise _Reject(403, "You are not allowed to use this model (injected).", "invalid_request_error",
                          "permission_denied")
        if fault == "404":
            raise _Reject(404, f"The model `{model}` does not exist (injected).", "invalid_request_error",
                          "model_not_found")

        delay = faults["latency_ms"] + rng.uniform(0, faults["latency_jitter_ms"])
        if delay > 0 and st.stopping.wait(delay / 1000.0):
            self.close_connection = True
            return
        if fault == "500":
            raise _Reject(500, "The server had an error while processing your request (injected).", "server_error")
        if fault == "503":
            raise _Reject(503, "The engine is currently overloaded (injected).", "server_error",
                          headers=ra_headers)
        if fault == "close":
            self.close_connection = True
            try:
                self.connection.shutdown(2)
            except OSError:
                pass
            return
        if fault == "timeout":
            if st.stopping.wait(faults["timeout_sleep_s"]):
                self.close_connection = True
                return

        results = _results(st, items, _strict(req))
        content, touched = _mangle(fault, results, rng)
        finish = "stop"
        cap = _token_cap(req, faults)
        cut = cut_to(st, content, cap, model) if cap is not None else None
        if cut is not None:
            content, finish = cut, "length"
        if faults["truncate_chars"] and len(content) > faults["truncate_chars"]:
            content, finish = content[: faults["truncate_chars"]], "length"
        prompt_tokens, cached_tokens, completion_tokens = _usage(st, req, content, model)
        st.add_tokens(prompt_tokens, completion_tokens, gen, cached=cached_tokens, keys=counted)
        request_id = "req_" + uuid.uuid4().hex
        headers = {"x-request-id": request_id}
        if fault != "ok":
            headers["x-smsd-fault"] = fault
            if touched:
                headers["x-smsd-fault-ids"] = ",".join(to_key.get(t, t) for t in touched)
        sent = self._send(200, {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "smsd-llmserver",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": cached_tokens}},
        }, headers)
        if sent:
            st.note_response(request_id, len(ids), time.time(), gen)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-connection (crash tests, drills, the demo) is routine: no traceback."""
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            log.debug("client %s went away", client_address)
            return
        super().handle_error(request, client_address)


class LlmServer:
    """The server in a background thread, for in-process use (demo, bench).

    ``LlmServer(extractor, host, port=0, api_key=None, model="smsd-local", **faults)``;
    ``.start()``, ``.stop()``, ``.url`` (``http://host:port/v1``), ``.stats()``,
    ``.set_faults(**kw)``, ``.script([...])``, ``.reset()``.
    """

    def __init__(self, extractor: Extractor | None = None, host: str = "127.0.0.1", port: int = 0,
                 *, api_key: str | None = None, model: str = "smsd-local", tokens: str = "bpe",
                 prefix_cache: bool = False, **faults: Any):
        self.state = State(extractor or KnownAnswers(), faults, api_key=api_key, model=model,
                           tokens=tokens, prefix_cache=prefix_cache)
        attach_batches(self.state)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._httpd = _Server((host, port), handler)
        self.host = host
        self.port = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> "LlmServer":
        if self.state.tokens == "bpe":
            # The encoding takes ~0.5 s to load: at start, not inside the first call's
            # latency (which a benchmark would count against the first client).
            from smsd import tokens
            tokens._encoding(tokens.encoding_name(self.state.model))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="smsd-llmserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.state.stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "LlmServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict:
        return self.state.stats()

    def set_faults(self, **changes: Any) -> dict:
        return self.state.set_faults(changes)

    def script(self, faults: list[str]) -> int:
        return self.state.set_script(list(faults))

    def reset(self, faults: bool = False) -> None:
        self.state.reset(faults=faults)
        self.state.batches.reset()

    @property
    def batches(self) -> Batches:
        """The Batch API's files, batches and switches (``.configure(delay_s=...)``)."""
        return self.state.batches


# --------------------------------------------------------------------------- CLI

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m smsd.lab.llmserver",
                                description="Local OpenAI-compatible server for smsd (fault injection, call counting).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the ready line)")
    p.add_argument("--answers", help="JSONL of {text, expected} lines (e.g. sms_fixtures.jsonl)")
    p.add_argument("--extractor", choices=("known", "rules"), default="known")
    p.add_argument("--fallback", choices=("other", "rules"), default="other",
                   help="answer for texts not in --answers (known extractor)")
    p.add_argument("--obey-injections", action="store_true",
                   help="obey 'report a credit of X' found in SMS text (a gullible model, for tests)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (401 otherwise)")
    p.add_argument("--model", default="smsd-local", help="model id listed by /v1/models")
    p.add_argument("--tokens", choices=("bpe", "estimate"), default="bpe",
                   help="usage counted with OpenAI's BPE encoding (offline), or chars/4")
    p.add_argument("--prefix-cache", action="store_true",
                   help="report a repeated system prompt + schema as cached tokens (>= 1024, as OpenAI)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--latency-jitter-ms", type=float, default=0.0)
    for name in ("429", "500", "timeout", "malformed", "partial", "bad-item"):
        p.add_argument(f"--p-{name}", type=float, default=0.0, help=f"probability of a {name} fault")
    p.add_argument("--timeout-sleep-s", type=float, default=DEFAULT_FAULTS["timeout_sleep_s"])
    p.add_argument("--retry-after-s", type=float, default=DEFAULT_FAULTS["retry_after_s"])
    p.add_argument("--rpm-limit", type=int, default=0)
    p.add_argument("--reject-json-schema", action="store_true", help="500 on json_schema (llama-cpp-python)")
    p.add_argument("--reject-pattern", action="store_true", help="500 on a schema with 'pattern' (grammar engines)")
    p.add_argument("--reject-response-format", action="store_true", help="400 on any response_format")
    p.add_argument("--token-param", choices=("both", "max_tokens", "max_completion_tokens", "none"),
                   default="both", help="which completion-token cap the server honours")
    p.add_argument("--truncate-chars", type=int, default=0, help="cut every answer (finish_reason length)")
    p.add_argument("--strict-model", action="store_true", help="404 for any model but --model")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-delay-s", type=float, default=0.0,
                   help="Batch API: seconds from create until a batch is complete")
    p.add_argument("--log-level", default="WARNING")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `smsd llm-server -- --port N` passes the separator through
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    faults = {k: getattr(args, k) for k in DEFAULT_FAULTS}
    try:
        extractor = make_extractor(args.extractor, args.answers, args.fallback,
                                   obey_injections=args.obey_injections)
        server = LlmServer(extractor, args.host, args.port, api_key=args.api_key, model=args.model,
                           tokens=args.tokens, prefix_cache=args.prefix_cache, **faults)
    except (OSError, ValueError, ImportError) as exc:
        print(f"smsd-llmserver: {exc}", file=sys.stderr)
        return 2
    server.batches.configure({"delay_s": args.batch_delay_s})
    done = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    server.start()
    print(f"smsd-llmserver listening on {server.url}", flush=True)
    while not done.wait(0.1):
        pass
    server.stop()
    log.info("stopped after %d calls", server.stats()["calls"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
