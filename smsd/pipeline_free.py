"""Answers that cost no LLM call, and the bill's copy to MongoDB: a mixin of
:class:`smsd.pipeline.Pipeline`.

``rules-then-llm`` journals what the offline rules are certain of; the shared
answer cache (:mod:`smsd.answer_cache`) journals what an identical text was
answered before (model ``cache``); both as one answered call with 0 tokens,
flushed like any answer.  :meth:`FreeAnswers._sync_costs` copies the journal's
changed ledger rows to ``smsd_llm_costs``.  Apart from the pipeline so that the
claim → LLM → journal → flush loop reads on its own.
"""
from __future__ import annotations

import json
from typing import Any

from . import grounding
from .llm import validate_answer
from .model import Sms, SmsResult, Usage


class FreeAnswers:
    """The pipeline's SMS answered without a paid call (the attributes are the pipeline's)."""

    settings: Any
    journal: Any
    store: Any
    summary: Any
    cache: Any
    owner: str
    epoch: int
    user_id: str
    _buffer: Any
    _fresh_calls: set

    def _answer_by_rules(self, batch: list[Sms]) -> list[Sms]:
        """With ``rules-then-llm``, journal what the rules are certain of; return the rest."""
        if self.settings.llm.extractor != "rules-then-llm":
            return batch
        from . import rules
        certain: list[tuple[Any, SmsResult]] = []
        rest: list[Sms] = []
        for m in batch:
            answer = rules.extract_certain(m.text, m.sender)
            result = _as_result(m.key, answer) if answer is not None else None
            if result is None or grounding.problem(result, m.text):
                rest.append(m)
            else:
                certain.append((m.raw_id, result))
        self._journal_free(certain, "rules")
        return rest

    def _answer_by_cache(self, batch: list[Sms]) -> list[Sms]:
        """Journal the SMS whose text was answered before (model ``cache``); return the rest."""
        if self.cache is None or not batch:
            return batch
        found, rest = self.cache.split(batch)
        self._journal_free(found, "cache")
        self.summary.cache_hits += len(found)
        return rest

    def _journal_free(self, found: list[tuple[Any, SmsResult]], model: str) -> None:
        """Journal answers that cost no call (``rules``, ``cache``) as one answered call."""
        if found:
            call_id = self.journal.begin_call([(r.key, raw) for raw, r in found], owner=self.owner,
                                              epoch=self.epoch, model=model)
            self.journal.record_answer(call_id, found, failed={}, request_id=None, usage=Usage(), model=model)
            self._fresh_calls.add(call_id)
            self.summary.asked_sms += len(found)
            self.summary.free_sms += len(found)

    def _release(self, sms: list[Sms]) -> None:
        if self.cache is not None:
            self._buffer.extendleft(reversed(self.cache.release(sms)))



def _as_result(key: str, answer: dict) -> SmsResult | None:
    """Validate a rules answer exactly like an LLM answer (one validator for both)."""
    results, _, _ = validate_answer(json.dumps({"results": [dict(answer, id=key)]}), [key])
    return results.get(key)
