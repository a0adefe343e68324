"""How the answer's format is asked of a server, and what a server is known to accept.

OpenAI-compatible servers differ in what they take besides the messages:

- ``json_schema`` — ``response_format: {"type": "json_schema", ...}`` (OpenAI,
  vLLM, LiteLLM, Ollama's compatibility layer);
- ``json_object`` — ``{"type": "json_object", "schema": ...}``: llama.cpp and
  llama-cpp-python read the schema from that field and turn it into a grammar;
- ``prompt`` — no ``response_format`` at all: the schema is in the system prompt.

``llm.response_format = "auto"`` starts with ``json_schema`` and steps down
when the server rejects it; :class:`EndpointMemory` keeps the choice per
endpoint (base URL and model) in the state directory, so each process does not
find it out again.  The token-cap parameter is chosen the same way
(``max_completion_tokens`` for OpenAI itself, ``max_tokens`` elsewhere, and the
other one when a server refuses or ignores it).

The schema sent to a grammar engine (:func:`grammar_schema`) leaves out what
such engines reject (``pattern``, ``format``, ``$schema``, long descriptions);
answers are still validated client-side against the contract's full schema.

:func:`salvage` keeps the complete result items of an answer cut short at the
token cap, so only the rest is asked again.
"""
from __future__ import annotations

import copy
import importlib.resources
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .model import SmsResult

log = logging.getLogger("smsd.wireformat")

SCHEMA_NAME = "smsd_transactions"
MODES = ("json_schema", "json_object", "prompt")
SETTINGS = ("auto",) + MODES
TOKEN_PARAMS = ("max_completion_tokens", "max_tokens")
MEMORY_FILE = "llm-endpoints.json"
#: Descriptions longer than this are left out of the grammar schema (they are prompt, not grammar).
MAX_DESCRIPTION = 60
_GRAMMAR_STRIP = ("$schema", "$id", "title", "pattern", "format", "examples", "default")


def load_schema() -> dict:
    """The contract's answer schema (``llm_response.schema.json``, shipped in the package)."""
    text = importlib.resources.files("smsd").joinpath("llm_response.schema.json").read_text("utf-8")
    return json.loads(text)


_SCHEMA = load_schema()
#: Keywords left out of the strict schema (annotations, and ``pattern``, validated locally).
_STRIP = ("$schema", "title", "description", "pattern", "format", "$id", "examples", "default")


def _strictify(node: Any) -> Any:
    if isinstance(node, list):
        return [_strictify(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key in _STRIP:
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _strictify(sub) for name, sub in value.items()}  # names, not keywords
        else:
            out[key] = _strictify(value)
    if "enum" in out and "type" not in out:
        vals = out["enum"]
        if vals and all(isinstance(v, str) or v is None for v in vals):
            out["type"] = ["string", "null"] if None in vals else "string"
    if out.get("type") == "object" or "properties" in out:
        props = out.get("properties", {})
        required = set(node.get("required", ()))
        for name, sub in props.items():
            if name not in required:
                props[name] = _nullable(sub)
        out["required"] = list(props)
        out["additionalProperties"] = False
    return out


def _nullable(node: dict) -> dict:
    node = dict(node)
    t = node.get("type")
    if isinstance(t, str) and t != "null":
        node["type"] = [t, "null"]
    elif isinstance(t, list) and "null" not in t:
        node["type"] = t + ["null"]
    if "enum" in node and None not in node["enum"]:
        node["enum"] = list(node["enum"]) + [None]
    return node


#: Annotations: they tell a reader what a field means and cost prompt tokens on every call.
_ANNOTATIONS = ("$schema", "title", "description", "$id", "examples", "default")


def _lean(node: Any) -> Any:
    if isinstance(node, list):
        return [_lean(n) for n in node]
    if not isinstance(node, dict):
        return node
    return {key: ({name: _lean(sub) for name, sub in value.items()}
                  if key in ("properties", "$defs", "definitions") and isinstance(value, dict)
                  else _lean(value))
            for key, value in node.items() if key not in _ANNOTATIONS}


def schema_response_format(strict: bool) -> dict:
    """The ``response_format`` argument.

    Strict: the contract schema as OpenAI's strict mode wants it (every property
    required, optional ones nullable, ``additionalProperties: false``, no
    ``pattern``/annotations).  Non-strict: the schema as in the file without its
    annotations (the same constraints); the model may leave absent fields out,
    which costs fewer completion tokens (docs/BENCHMARKS.md, "LLM cost").
    """
    if strict:
        return {"type": "json_schema",
                "json_schema": {"name": SCHEMA_NAME, "strict": True, "schema": _strictify(_SCHEMA)}}
    return {"type": "json_schema",
            "json_schema": {"name": SCHEMA_NAME, "strict": False, "schema": _lean(copy.deepcopy(_SCHEMA))}}


def grammar_schema(node: Any) -> Any:
    """The schema without what grammar engines (llama.cpp, outlines) reject or choke on."""
    if isinstance(node, list):
        return [grammar_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key in _GRAMMAR_STRIP:
            continue
        if key == "description" and (not isinstance(value, str) or len(value) > MAX_DESCRIPTION):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: grammar_schema(sub) for name, sub in value.items()}
        else:
            out[key] = grammar_schema(value)
    return out


def prompt_instructions(schema: dict) -> str:
    """The system-prompt addition of ``prompt`` mode: the schema, and "JSON only"."""
    return ("\nAnswer with one JSON object and nothing else (no prose, no code fences). "
            "It must be valid under this JSON Schema:\n"
            + json.dumps(grammar_schema(schema), separators=(",", ":")))


def request_options(mode: str, schema_format: dict, schema: dict) -> tuple[dict, str]:
    """``(extra create() arguments, system-prompt addition)`` for one mode.

    ``schema_format`` is the ``json_schema`` ``response_format`` (strict or not);
    ``schema`` the contract schema.
    """
    if mode == "json_schema":
        return {"response_format": schema_format}, ""
    if mode == "json_object":
        return {"response_format": {"type": "json_object", "schema": grammar_schema(schema)}}, ""
    if mode == "prompt":
        return {}, prompt_instructions(schema)
    raise ValueError(f"unknown response_format mode {mode!r}")


def next_mode(mode: str) -> str | None:
    """The mode to try when ``mode`` is rejected (None: nothing left)."""
    i = MODES.index(mode)
    return MODES[i + 1] if i + 1 < len(MODES) else None


def default_token_param(base_url: str) -> str:
    """OpenAI's own API reads ``max_completion_tokens``; the compatible servers all read ``max_tokens``."""
    host = (urlsplit(base_url).hostname or "").lower()
    return "max_completion_tokens" if host.endswith("openai.com") else "max_tokens"


def token_cap(n_sms: int, per_sms: int, margin: int) -> int:
    """The completion-token cap of a call of ``n_sms`` SMS."""
    return max(1, per_sms * max(1, n_sms) + margin)


def endpoint_key(base_url: str, model: str) -> str:
    return f"{base_url.rstrip('/')}#{model}"


class EndpointMemory:
    """What an endpoint was found to accept, kept in ``<state_dir>/llm-endpoints.json``.

    One small JSON object ``{endpoint: {"response_format", "token_param", "reason", "at"}}``,
    replaced atomically.  Several worker processes may write it: each writes the
    same finding, so the last writer wins harmlessly.  A state directory that
    cannot be written keeps the finding in memory (and says so once).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._warned = False

    def load(self) -> dict:
        if self.path is None:
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, base_url: str, model: str) -> dict:
        entry = self.load().get(endpoint_key(base_url, model))
        return entry if isinstance(entry, dict) else {}

    def put(self, base_url: str, model: str, **values: Any) -> None:
        if self.path is None:
            return
        with self._lock:
            data = self.load()
            entry = dict(data.get(endpoint_key(base_url, model)) or {})
            entry.update(values, at=time.time())
            data[endpoint_key(base_url, model)] = entry
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            try:
                tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
                os.replace(tmp, self.path)
            except OSError as exc:
                if not self._warned:
                    log.warning("cannot keep the endpoint's format in %s (%s); found again by each process",
                                self.path, exc.strerror)
                    self._warned = True


class WireChoice:
    """The response-format mode and token-cap parameter used for one endpoint, thread-safe.

    ``setting`` is ``llm.response_format``; only ``auto`` ever changes its mode.
    """

    def __init__(self, setting: str, *, base_url: str, model: str,
                 memory: EndpointMemory | None = None, token_param: str = "auto") -> None:
        if setting not in SETTINGS:
            raise ValueError(f"response_format must be one of {', '.join(SETTINGS)}")
        self.setting = setting
        self.base_url = base_url
        self.model = model
        self.memory = memory or EndpointMemory(None)
        self._lock = threading.Lock()
        known = self.memory.get(base_url, model)
        remembered = known.get("response_format")
        self.mode = setting if setting != "auto" else (remembered if remembered in MODES else MODES[0])
        self.token_param_setting = token_param
        param = known.get("token_param")
        self.token_param = (token_param if token_param != "auto" else
                            param if param in TOKEN_PARAMS else default_token_param(base_url))
        if setting == "auto" and remembered in MODES and remembered != MODES[0]:
            log.info("endpoint %s model %s: response_format %s (found %s)", base_url, model, remembered,
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(known.get("at") or 0)))

    @property
    def adaptive(self) -> bool:
        return self.setting == "auto"

    def settle(self, mode: str, reason: str) -> None:
        """A call in ``mode`` succeeded after ``reason``: keep it, log it once."""
        with self._lock:
            if mode == self.mode:
                return
            self.mode = mode
        log.warning("endpoint %s model %s rejects the richer response_format (%s): using %s from now on",
                    self.base_url, self.model, reason, mode)
        self.memory.put(self.base_url, self.model, response_format=mode, reason=reason[:200])

    def switch_token_param(self, reason: str) -> str | None:
        """The server refused or ignored the token-cap parameter: use the other one (once)."""
        if self.token_param_setting != "auto":
            return None
        with self._lock:
            other = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(self.token_param)]
            self.token_param = other
        log.warning("endpoint %s model %s: token cap sent as %s from now on (%s)",
                    self.base_url, self.model, other, reason)
        self.memory.put(self.base_url, self.model, token_param=other)
        return other


def salvage(content: str | None) -> str | None:
    """The complete result items of an answer cut short, as a whole answer; None if none.

    ``{"results": [{...}, {...}, {"id": "s3", "ki`` → ``{"results": [{...}, {...}]}``.
    Each kept item went through the JSON decoder whole; the caller validates
    them like any answer, so a salvage can never let through what a full
    answer could not.
    """
    if not content:
        return None
    start = content.find('"results"')
    if start < 0:
        return None
    bracket = content.find("[", start)
    if bracket < 0:
        return None
    decoder = json.JSONDecoder()
    items: list = []
    pos = bracket + 1
    while True:
        while pos < len(content) and content[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(content) or content[pos] == "]":
            break
        try:
            item, pos = decoder.raw_decode(content, pos)
        except ValueError:
            break   # the cut: everything before it is kept
        items.append(item)
    return json.dumps({"results": items}, ensure_ascii=False) if items else None


def to_keys(answer: Any, wire: list[str], keys: list[str]) -> Any:
    """An :class:`~smsd.llm.LlmAnswer` with the call's wire ids ("1".."N") mapped back to SMS keys."""
    if wire == keys:
        return answer
    to_key = dict(zip(wire, keys))
    answer.results = {to_key[w]: SmsResult(key=to_key[w], kind=r.kind, transactions=r.transactions)
                      for w, r in answer.results.items()}
    answer.failed = {to_key[w]: reason for w, reason in answer.failed.items()}
    answer.dropped = {to_key[w]: n for w, n in answer.dropped.items()}
    return answer      # unknown_ids stay as sent: they name nothing of this call
