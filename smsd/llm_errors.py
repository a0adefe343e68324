"""What a failed LLM call means: the error classes and how an HTTP failure is read.

Three kinds of failure, because each asks for a different reaction:

- **transient** (timeouts, dropped connections, 408/409/429, 502/503/504, a 500
  whose body changes): back off and ask again; a daemon rides these out.
- **configuration** (401/403 bad key, 404 unknown model or path, a 400/422 that
  the contract's request should never get, or the same error body on every
  attempt): asking again cannot help, so :class:`LlmConfigError` stops the
  asking and names the fix.  ``smsd once`` exits 78, ``smsd run`` shows
  ``llm: misconfigured`` until the configuration is reloaded.
- **batch** (the request was too long for the model: context length, 413): the
  SMS of that call, not the setup, are at fault; they count an attempt each
  and are asked again alone, then quarantined.

:func:`read_status_error` turns an ``openai.APIStatusError`` into a
:class:`Failure`; :class:`FailureHistory` tells when the same failure came back
on every attempt of a call.  Messages are scrubbed of keys before they are
kept anywhere.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

#: Statuses that say "later": never a configuration error, however often they repeat.
TRANSIENT_STATUSES = frozenset({408, 409, 429, 502, 503, 504})
#: Statuses that say "your setup": no retry, no probe.
CONFIG_STATUSES = frozenset({401, 403, 404})

_KEYLIKE = re.compile(r"(sk-|Bearer\s+)[A-Za-z0-9_\-*.]{3,}")
_VOLATILE = re.compile(r"\b(?:[0-9a-f]{8,}|[0-9a-f-]{32,}|\d{5,})\b", re.I)
#: An error that names the response format: the server does not take ours.
_FORMAT_WORDS = re.compile(r"response_format|json_schema|json_object|'text'|grammar", re.I)
_TOO_LONG = re.compile(r"context.length|context_length|maximum context|too many tokens|"
                       r"prompt is too long|exceeds the (?:model'?s? )?(?:context|maximum)", re.I)
_PARAMS = ("max_completion_tokens", "max_tokens")


class LlmError(Exception):
    """The call failed as a whole (HTTP errors, timeouts) after the retries allowed.

    ``status`` is the last HTTP status (None for timeouts/connection errors),
    ``retryable`` tells whether asking again later may help, ``attempts`` how
    many HTTP attempts were made.  The message never contains the API key.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False,
                 attempts: int = 0, request_id: str | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.attempts = attempts
        self.request_id = request_id


class LlmStopped(LlmError):
    """The stop event was set while waiting between attempts."""


class LlmConfigError(LlmError):
    """Asking again cannot help: the key, the model, the URL or the request is wrong.

    ``server_message`` is the server's own words (key masked); ``hint`` says
    what to check.  Never retryable.
    """

    def __init__(self, message: str, *, hint: str, server_message: str = "", **kw: Any):
        kw["retryable"] = False
        super().__init__(message, **kw)
        self.hint = hint
        self.server_message = server_message


class LlmBatchError(LlmError):
    """The server refused this batch (too long): the SMS count an attempt, not the setup."""


def scrub(text: str, secret: str | None = None, limit: int = 300) -> str:
    """``text`` without the API key or anything that looks like one, cut to ``limit``."""
    if secret:
        text = text.replace(secret, "***")
    return _KEYLIKE.sub(lambda m: m.group(1) + "***", text)[:limit]


@dataclass(frozen=True)
class Failure:
    """One failed HTTP attempt, as smsd reads it."""

    kind: str                      # transient | config | batch | format | param
    reason: str                    # short, for logs: "HTTP 401 invalid_api_key"
    status: int | None = None
    message: str = ""              # the server's message, scrubbed
    param: str | None = None       # kind "param": the token-cap parameter the server refused

    @property
    def signature(self) -> tuple:
        """What must repeat for the failure to count as deterministic (ids and counters left out)."""
        return (self.status, _VOLATILE.sub("#", self.message))


def _server_text(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        return json.dumps(body, default=str)
    if isinstance(body, str) and body:
        return body
    return str(getattr(exc, "message", "") or exc)


def read_status_error(exc: Any, secret: str | None = None) -> Failure:
    """Classify an ``openai.APIStatusError`` (an HTTP answer with an error status)."""
    status = int(exc.status_code)
    etype = getattr(exc, "type", None) or getattr(exc, "code", None) or ""
    reason = f"HTTP {status}" + (f" {etype}" if etype else "")
    message = scrub(_server_text(exc), secret)
    blob = message + " " + str(getattr(exc, "param", None) or "")
    if status in TRANSIENT_STATUSES:
        return Failure("transient", reason, status, message)
    if status in CONFIG_STATUSES:
        return Failure("config", reason, status, message)
    if status == 413 or _TOO_LONG.search(blob):
        return Failure("batch", reason, status, message)
    for param in _PARAMS:
        if param in blob and status < 500:
            return Failure("param", reason, status, message, param=param)
    if _FORMAT_WORDS.search(blob):
        return Failure("format", reason, status, message)
    if status >= 500:
        return Failure("transient", reason, status, message)
    return Failure("config", reason, status, message)


def hint_for(status: int | None, *, base_url: str, model: str, key_set: bool) -> str:
    """What to check for a configuration error, in the words of the settings."""
    if status in (401, 403):
        where = "OPENAI_API_KEY (or the openai_api_key credential)"
        return (f"the server refused the API key: check {where}" if key_set else
                f"the server wants an API key and none is set: set {where}")
    if status == 404:
        return (f"the server does not know model {model!r} or the path {base_url}/chat/completions: "
                "check llm.model / SMSD_LLM_MODEL and llm.base_url / SMSD_LLM_BASE_URL (it usually ends in /v1)")
    return ("the server rejects smsd's request every time: check llm.base_url, llm.model and "
            "llm.response_format (try \"auto\"); `smsd doctor` shows what the endpoint accepts")


@dataclass
class FailureHistory:
    """The failures of one call's attempts, to tell a deterministic failure from an outage."""

    failures: list[Failure | None] = field(default_factory=list)

    def add(self, failure: Failure | None) -> None:
        """Record an attempt's failure (None: no HTTP answer at all, e.g. a timeout)."""
        self.failures.append(failure)

    def deterministic(self) -> bool:
        """Two or more attempts, all answered with the same non-transient-status error body."""
        if len(self.failures) < 2 or any(f is None for f in self.failures):
            return False
        first = self.failures[0]
        if first.status in TRANSIENT_STATUSES:
            return False
        return all(f.signature == first.signature for f in self.failures)
