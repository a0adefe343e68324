"""What the local LLM server bills and how its "model" shapes an answer.

:func:`_usage` counts a request's tokens as OpenAI bills them (BPE over the
whole request, :mod:`smsd.tokens`) and simulates prompt caching; :func:`_shaped`
writes a transaction as a model does under the request's schema mode.  Apart
from :mod:`smsd.lab.llmserver` because billing and answer shape are independent
of how the server speaks HTTP.
"""
from __future__ import annotations

import math
from typing import Any

from ..model import OPTIONAL_FIELDS
from .llm_faults import State


def estimate_tokens(text: str) -> int:
    """A rough token count: one token per four characters, rounded up (``--tokens estimate``)."""
    return math.ceil(len(text) / 4)


#: OpenAI caches prompt prefixes of at least this many tokens, then in steps of CACHE_STEP.
CACHE_MIN_TOKENS = 1024
CACHE_STEP = 128


def _usage(state: State, req: dict, content: str, model: str) -> tuple[int, int, int]:
    """(prompt, cached, completion) tokens of one answered request, as the server bills them.

    ``bpe`` (default) counts the whole request with OpenAI's encoding
    (:mod:`smsd.tokens`); ``estimate`` is chars/4 of the message texts.
    With ``prefix_cache``, a request whose system prompt and schema were seen
    before gets that prefix as cached tokens, as OpenAI's prompt caching does
    (only from 1024 tokens on, in steps of 128).
    """
    msgs = [m for m in req.get("messages") or [] if isinstance(m, dict)]
    if state.tokens == "estimate":
        text = "".join(m.get("content") if isinstance(m.get("content"), str) else "" for m in msgs)
        return estimate_tokens(text), 0, estimate_tokens(content)
    from smsd import tokens
    rf = req.get("response_format")
    prompt = tokens.request_tokens(msgs, rf, model)
    cached = 0
    if state.prefix_cache:
        system = "".join(m.get("content") or "" for m in msgs if m.get("role") == "system")
        prefix = tokens.prefix_tokens(system, rf, model)
        key = hash((system, tokens.schema_text(rf)))
        with state.lock:
            seen = key in state.prefixes
            state.prefixes.add(key)
        if seen and prefix >= CACHE_MIN_TOKENS:
            cached = CACHE_MIN_TOKENS + (prefix - CACHE_MIN_TOKENS) // CACHE_STEP * CACHE_STEP
    return prompt, cached, tokens.count(content, model)


def _strict(req: dict) -> bool | None:
    """The request's schema mode: True (strict), False (non-strict schema), None (no schema)."""
    rf = req.get("response_format")
    if not isinstance(rf, dict) or not isinstance(rf.get("json_schema"), dict):
        return None
    return bool(rf["json_schema"].get("strict"))


def _shaped(txn: Any, strict: bool | None) -> Any:
    """A transaction as a model answers under the schema: strict mode writes every
    field (null when absent), a non-strict schema lets it leave absent ones out;
    with no schema, as the extractor gave it."""
    if not isinstance(txn, dict) or strict is None:
        return txn
    if strict:
        return {**txn, **{k: txn.get(k) for k in OPTIONAL_FIELDS}}
    return {k: v for k, v in txn.items() if v is not None or k not in OPTIONAL_FIELDS}


def cut_to(state: State, content: str, cap: int, model: str) -> str | None:
    """``content`` cut to ``cap`` completion tokens as the server counts them, or None if it fits."""
    if state.tokens == "estimate":
        return content[: cap * 4] if estimate_tokens(content) > cap else None
    from smsd import tokens
    enc = tokens._encoding(tokens.encoding_name(model))
    ids = enc.encode(content, disallowed_special=())
    return enc.decode(ids[:cap]) if len(ids) > cap else None
