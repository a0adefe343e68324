"""The answers ``smsd evaluate`` scores: what smsd would store, extractor by extractor.

``rules`` answers each SMS with :func:`smsd.rules.extract`; ``llm`` asks the
configured endpoint through the daemon's own client (:class:`smsd.llm.LlmClient`,
same prompt, schema, validation and retries) in batches of ``llm.batch_size``;
``rules-then-llm`` answers what :func:`smsd.rules.extract_certain` is certain of
and asks the endpoint for the rest.  Every answer then goes through the
validator and the grounding check, as in the pipeline: an invalid or
ungrounded answer is asked again alone up to ``pipeline.max_attempts`` times,
and if it never passes it is scored as "nothing stored".  No journal and no
MongoDB are involved.

:class:`Answers` also counts what it cost: calls, prompt and completion
tokens, and USD from ``[llm] price_prompt_per_mtok`` /
``price_completion_per_mtok`` when the config gives them (Decimal, never float).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from smsd import grounding, rules
from smsd.config import Settings
from smsd.llm import LlmClient, LlmError, validate_answer
from smsd.model import Sms

EXTRACTORS = ("rules", "llm", "rules-then-llm")
NOTHING = {"kind": None, "transactions": []}


@dataclass
class Cost:
    """What answering the data set cost (JSON-ready with :meth:`to_dict`)."""

    sms: int = 0
    calls: int = 0
    failed_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    by_rules: int = 0              # answered by the rules (no paid call)
    invalid: int = 0               # never a valid answer within the attempts
    ungrounded: int = 0            # answers rejected by the grounding check (each attempt)
    prices: tuple[Decimal, Decimal] | None = None
    notes: list[str] = field(default_factory=list)

    def per_1000(self, n: int) -> Decimal:
        return (Decimal(n) * 1000 / self.sms).quantize(Decimal("0.1")) if self.sms else Decimal(0)

    def usd_per_1000(self) -> Decimal | None:
        if self.prices is None or not self.sms:
            return None
        prompt, completion = self.prices
        usd = (self.prompt_tokens * prompt + self.completion_tokens * completion) / Decimal(1_000_000)
        return (usd * 1000 / self.sms).quantize(Decimal("0.000001"))

    def to_dict(self) -> dict:
        usd = self.usd_per_1000()
        return {"sms": self.sms, "calls": self.calls, "failed_calls": self.failed_calls,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "prompt_tokens_per_1000_sms": str(self.per_1000(self.prompt_tokens)),
                "completion_tokens_per_1000_sms": str(self.per_1000(self.completion_tokens)),
                "usd_per_1000_sms": None if usd is None else str(usd),
                "by_rules": self.by_rules, "invalid": self.invalid, "ungrounded": self.ungrounded,
                "notes": list(self.notes)}


def prices(settings: Settings) -> tuple[Decimal, Decimal] | None:
    """USD per million prompt and completion tokens from the config (``price_*_per_mtok``,
    else the model's ``[llm.prices]`` entry), or None."""
    return settings.llm.prices()


def _stored(key: str, answer: dict, text: str) -> tuple[dict | None, str | None]:
    """(what smsd would store, None) or (None, failure reason) for one answer."""
    results, failed, _ = validate_answer(json.dumps({"results": [dict(answer, id=key)]}), [key])
    result = results.get(key)
    if result is None:
        return None, failed.get(key, "invalid")
    reason = grounding.problem(result, text)
    if reason:
        return None, reason
    out = result.to_json()
    out.pop("id")
    return out, None


class Answers:
    """Answers every row of a data set with one extractor; counts the cost."""

    def __init__(self, extractor: str, settings: Settings, client: LlmClient | None = None) -> None:
        if extractor not in EXTRACTORS:
            raise ValueError(f"unknown extractor {extractor!r} ({'|'.join(EXTRACTORS)})")
        self.extractor = extractor
        self.settings = settings
        self.client = client
        self.cost = Cost(prices=prices(settings))
        if extractor != "rules" and self.cost.prices is None:
            self.cost.notes.append(f"USD not computed: no price for model {settings.llm.model!r}; add "
                                   f"[llm.prices.\"{settings.llm.model}\"] to config.toml")

    def __call__(self, rows: list[dict]) -> list[dict]:
        self.cost.sms = len(rows)
        out: list[dict] = [dict(NOTHING) for _ in rows]
        ask: list[int] = []
        for i, row in enumerate(rows):
            if self.extractor == "llm":
                ask.append(i)
                continue
            fn = rules.extract if self.extractor == "rules" else rules.extract_certain
            answer = fn(row["text"], row.get("sender"))
            stored, reason = _stored(f"e:{i}", answer, row["text"]) if answer is not None else (None, None)
            if stored is not None:
                out[i] = stored
                self.cost.by_rules += self.extractor != "rules"
            elif self.extractor == "rules":
                self.cost.invalid += 1
                self.cost.ungrounded += bool(reason and reason.startswith(grounding.PREFIX))
            else:
                ask.append(i)   # not certain, or certain but ungrounded: the LLM decides
        if ask:
            self._ask(rows, ask, out)
        return out

    def _ask(self, rows: list[dict], ask: list[int], out: list[dict]) -> None:
        """Ask the endpoint in batches; what fails is asked again alone, as the pipeline does."""
        assert self.client is not None, "an LLM extractor needs a client"
        size = max(1, self.settings.llm.batch_size)
        attempts = max(1, self.settings.pipeline.max_attempts)
        pending = [ask[i:i + size] for i in range(0, len(ask), size)]
        tries = dict.fromkeys(ask, 0)
        while pending:
            batch = pending.pop(0)
            sms = [Sms(raw_id=i, key=f"e:{i}", user_id="evaluate", text=rows[i]["text"],
                       sender=rows[i].get("sender")) for i in batch]
            self.cost.calls += 1
            try:
                answer = self.client.extract(sms)
            except LlmError as exc:
                self.cost.failed_calls += 1
                self.cost.notes.append(f"a call for {len(batch)} SMS failed: {exc}")
                self.cost.invalid += len(batch)
                continue
            self.cost.prompt_tokens += answer.usage.prompt_tokens
            self.cost.completion_tokens += answer.usage.completion_tokens
            answer = grounding.ground(answer, sms)
            for i in batch:
                key = f"e:{i}"
                tries[i] += 1
                if key in answer.results:
                    stored = answer.results[key].to_json()
                    stored.pop("id")
                    out[i] = stored
                    continue
                self.cost.ungrounded += answer.failed.get(key, "").startswith(grounding.PREFIX)
                if tries[i] < attempts:
                    pending.append([i])
                else:
                    self.cost.invalid += 1


def format_cost(extractor: str, cost: Cost, endpoint: str | None) -> str:
    """The cost lines of the report (no SMS text)."""
    lines = [f"extractor: {extractor}" + (f" ({endpoint})" if endpoint else "")]
    if extractor != "rules":
        lines.append(f"LLM calls {cost.calls} (failed {cost.failed_calls}); answered by the rules "
                     f"{cost.by_rules}/{cost.sms}")
        lines.append(f"tokens per 1,000 SMS: {cost.per_1000(cost.prompt_tokens)} prompt + "
                     f"{cost.per_1000(cost.completion_tokens)} completion "
                     f"(total {cost.prompt_tokens} + {cost.completion_tokens})")
        usd = cost.usd_per_1000()
        if usd is not None:
            lines.append(f"USD per 1,000 SMS: {usd} (prices from config: {cost.prices[0]} / "
                         f"{cost.prices[1]} USD per million prompt / completion tokens)")
    lines.append(f"rejected: {cost.ungrounded} ungrounded answers; {cost.invalid} SMS never "
                 f"got a valid, grounded answer")
    lines += cost.notes
    return "\n".join(lines)


def describe(client: Any) -> str | None:
    """"model at base_url" of a client, for the report (never the key)."""
    if client is None:
        return None
    return f"model {client.model} at {client.base_url}"
