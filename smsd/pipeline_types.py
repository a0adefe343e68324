"""What a pipeline run talks to and reports: the extractor it asks, the handover box,
the run's summary, and :class:`StaleEpoch` (a flush MongoDB refused).

Apart from :mod:`smsd.pipeline` so that the worker, the fencing store and the
tools can name these without the pipeline's machinery.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

from .llm import LlmAnswer
from .llm_errors import LlmConfigError
from .model import Sms, SmsResult


class Extractor(Protocol):
    """What the pipeline asks: the LLM client, or anything answering like it."""

    model: str

    def extract(self, sms: list[Sms], *, stop: threading.Event | None = None,
                wire_ids: list[str] | None = None) -> LlmAnswer: ...


class StaleEpoch(Exception):
    """A flush was refused because another owner holds a newer lease on the user."""


class HandoverBox(Protocol):
    """Answers another host paid for and handed over (:class:`smsd.handover.Handover`)."""

    def adopt(self, keys: list[str]) -> dict[str, SmsResult]: ...

    def forget(self, keys: list[str]) -> None: ...


@dataclass
class RunSummary:
    """What one run did, for the one-line summary and the worker's report."""

    user_id: str
    batch_id: str = ""
    total_sms: int = 0
    processed_sms: int = 0        # the checkpoint's counter (whole batch, across resumes)
    newly_processed: int = 0      # marked processed by this process
    asked_sms: int = 0
    llm_calls: int = 0
    failed_calls: int = 0
    quarantined: int = 0
    replayed_answers: int = 0
    status: str = "in_progress"
    stopped: bool = False
    elapsed_s: float = 0.0
    pending_left: int | None = None
    last_processed_id: Any = None
    resumed_from: dict | None = None
    config_error: LlmConfigError | None = None   # the LLM refuses our setup: asking stopped
    # The bill of this run (smsd.ledger): USD of the paid calls, of those that
    # re-bought SMS, and SMS answered without a paid call (rules, cache).
    cost_usd: Decimal = Decimal(0)
    repeated_usd: Decimal = Decimal(0)
    paid_sms: int = 0
    free_sms: int = 0
    cache_hits: int = 0
    cache_races: int = 0          # SMS paid while another call paid for the same text
    unpriced_calls: int = 0

    @property
    def saved_usd(self) -> Decimal:
        """SMS answered without a paid call, at this run's average USD per paid SMS."""
        return self.cost_usd / self.paid_sms * self.free_sms if self.paid_sms else Decimal(0)
