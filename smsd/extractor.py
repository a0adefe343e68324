"""Builds what the pipeline asks: the LLM client, or the offline rules.

``extractor = "llm"`` and ``"rules-then-llm"`` ask the LLM through
:class:`smsd.llm.LlmClient` (the pipeline answers the certain SMS itself for
the latter); ``"rules"`` answers everything offline, paying for nothing.
"""
from __future__ import annotations

import json
import threading

from .config import Settings
from .llm import LlmAnswer, LlmClient, validate_answer
from .wireformat import MEMORY_FILE, EndpointMemory
from .model import Sms, Usage
from .ratelimit import RateLimiter


class RulesExtractor:
    """Answers like the LLM client, from :mod:`smsd.rules`, with no paid call."""

    model = "rules"

    def extract(self, sms: list[Sms], *, stop: threading.Event | None = None,
                wire_ids: list[str] | None = None) -> LlmAnswer:
        from . import rules
        content = json.dumps({"results": [dict(rules.extract(m.text, m.sender), id=m.key) for m in sms]})
        results, failed, unknown = validate_answer(content, [m.key for m in sms])
        return LlmAnswer(results=results, failed=failed, unknown_ids=unknown, request_id=None,
                         model=self.model, usage=Usage(), attempts=1)


def build_extractor(settings: Settings, rate_limiter: RateLimiter | None = None):
    """The extractor the settings ask for."""
    if settings.llm.extractor == "rules":
        return RulesExtractor()
    llm = settings.llm
    return LlmClient(base_url=llm.base_url, api_key=llm.api_key, model=llm.model, timeout=llm.timeout,
                     max_retries=llm.max_retries, backoff_base=llm.backoff_base,
                     backoff_max=llm.backoff_max, rate_limiter=rate_limiter,
                     strict_schema=llm.strict_schema, response_format=llm.response_format,
                     token_param=llm.token_param, completion_tokens_per_sms=llm.completion_tokens_per_sms,
                     completion_tokens_margin=llm.completion_tokens_margin,
                     memory=EndpointMemory(settings.state_dir / MEMORY_FILE),
                     short_ids=llm.short_ids, key_header=llm.key_header)


def build_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The host-wide limiter, shared through a file in the runtime directory."""
    llm = settings.llm
    if not llm.requests_per_minute and not llm.tokens_per_minute:
        return None
    settings.runtime_dir.mkdir(parents=True, exist_ok=True)
    return RateLimiter(settings.runtime_dir / "ratelimit.state",
                       llm.requests_per_minute or None, llm.tokens_per_minute or None)
