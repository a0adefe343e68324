"""The supervisor's Prometheus figures: what it adds up, and the ``/metrics`` text.

The supervisor runs no threads and opens no MongoClient, so nothing here
asks anyone anything: every figure is read, at scrape time, from what the
supervisor already knows -- the workers' status lines (their heartbeat JSON,
with cumulative latency histograms), the journals' counters (from the live
worker, else from discovery's read-only scan) and discovery's per-user counts
from MongoDB.  No figure carries a per-user label (1000+ users); per-user
numbers stay in ``smsctl status``.

Counters after a supervisor restart:

* rebuilt from the journals and MongoDB by the first discovery:
  ``smsd_sms_processed_total`` and ``smsd_sms_quarantined_total`` (per-user
  counts in MongoDB of the users that have a journal or pending SMS), and
  ``smsd_llm_calls_total``, ``smsd_llm_repeated_calls_total`` and
  ``smsd_llm_tokens_total`` (sums over the journals);
* reset to zero, as any Prometheus counter does on a restart (``rate()``
  copes): ``smsd_worker_restarts_total`` and the histograms
  ``smsd_llm_latency_seconds`` and ``smsd_flush_latency_seconds``.

How the counters are kept (largest value seen per user) is :mod:`smsd.figures`.
"""
from __future__ import annotations

import math
import time
from decimal import Decimal
from collections import Counter
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from . import __version__
from .figures import Figures
from .histogram import Histogram
from .status import SupervisorView, live_journal, mongo_health, running_users, user_status

#: The content type of the text format (prometheus_client's CONTENT_TYPE_LATEST).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: A scrape storm renders the text at most this often ...
RENDER_EVERY_S = 0.5
#: ... and at most this share of the loop's time goes to rendering (many users: slower renders).
RENDER_SHARE = 0.05
class _Collector:
    """A prometheus_client collector that reads the supervisor at scrape time."""

    def __init__(self, sup: SupervisorView) -> None:
        self.sup = sup

    def collect(self) -> Iterator[Metric]:
        sup, fig = self.sup, self.sup.figures
        yield GaugeMetricFamily("smsd_up", "1 while the supervisor answers.", value=1)
        info = GaugeMetricFamily("smsd_build_info", "The smsd version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily("smsd_uptime_seconds", "Seconds since the supervisor started.",
                                value=round(time.monotonic() - sup.started, 3))

        users = _user_sums(sup)
        yield CounterMetricFamily(
            "smsd_sms_processed", "SMS marked processed in MongoDB (rebuilt from MongoDB on a restart).",
            value=fig.user_total("processed"))
        yield CounterMetricFamily(
            "smsd_sms_quarantined", "SMS quarantined (rebuilt from MongoDB's current count on a restart).",
            value=fig.user_total("quarantined"))
        yield GaugeMetricFamily("smsd_sms_pending", "SMS waiting for an answer, as last counted.",
                                value=users["pending"])
        yield GaugeMetricFamily("smsd_sms_quarantined_now", "SMS in quarantine now (smsctl retry lowers it).",
                                value=users["quarantined"])
        yield GaugeMetricFamily("smsd_sms_ungrounded", "SMS whose answers were not grounded in their text "
                                "(asked again or quarantined), as last counted.",
                                value=users["ungrounded"])
        by_status = GaugeMetricFamily("smsd_users", "Users known to the supervisor, by status.",
                                      labels=["status"])
        for status, n in sorted(users["by_status"].items()):
            by_status.add_metric([status], n)
        yield by_status

        calls = CounterMetricFamily("smsd_llm_calls", "Paid LLM calls by outcome (from the journals; "
                                    "calls in flight are counted when they end).", labels=["outcome"])
        calls.add_metric(["answered"], fig.journal_total("answered_calls"))
        calls.add_metric(["failed"], fig.journal_total("failed_calls"))
        yield calls
        yield CounterMetricFamily("smsd_llm_repeated_calls",
                                  "LLM calls that asked again for an SMS an earlier call had asked.",
                                  value=fig.journal_total("repeated_calls"))
        yield CounterMetricFamily("smsd_rules_answers", "Journal rows answered by the offline rules (not paid).",
                                  value=fig.journal_total("rules_calls"))
        tokens = CounterMetricFamily("smsd_llm_tokens", "LLM tokens billed, by type (from the journals).",
                                     labels=["type"])
        tokens.add_metric(["prompt"], fig.journal_total("prompt_tokens"))
        tokens.add_metric(["cached"], fig.journal_total("cached_tokens"))   # prompt tokens the server had cached
        tokens.add_metric(["completion"], fig.journal_total("completion_tokens"))
        yield tokens
        prices = sup.settings.llm.prices()
        if prices is not None:
            # Decimal up to here; the text format's values are floats by definition.
            usd = (fig.journal_total("prompt_tokens") * prices[0]
                   + fig.journal_total("completion_tokens") * prices[1]) / Decimal(1_000_000)
            yield CounterMetricFamily("smsd_llm_cost_usd", "USD of the tokens billed, at the [llm] price_*_per_mtok "
                                      "prices (cached-prompt discounts are not recorded yet).", value=float(usd))
        yield _histogram("smsd_llm_latency_seconds", "Seconds per answered LLM request (resets on a restart).",
                         fig.latency["llm"])

        yield GaugeMetricFamily("smsd_journal_unflushed", "Journaled SMS results not yet written to MongoDB.",
                                value=users["unflushed"])
        yield _histogram("smsd_flush_latency_seconds",
                         "Seconds per flush of journaled answers to MongoDB (resets on a restart).",
                         fig.latency["flush"])
        ok = mongo_health(sup)
        if ok is not None:   # unknown until the first discovery answers
            yield GaugeMetricFamily("smsd_mongo_up", "1 when MongoDB answers, 0 when it does not.",
                                    value=1 if ok else 0)
        down = sup.health.mongo_down_for()
        yield GaugeMetricFamily("smsd_mongo_down_seconds", "Seconds MongoDB has been unreachable (0 when up).",
                                value=round(down, 1) if down is not None and ok is False else 0)
        yield GaugeMetricFamily("smsd_llm_misconfigured", "1 while the LLM refuses the configuration "
                                "(bad key, unknown model, a rejected request): no workers until a reload.",
                                value=1 if sup.health.llm_misconfigured else 0)
        busy = sum(1 for w in sup.workers.values() if w.user_id is not None)
        yield GaugeMetricFamily("smsd_workers", "Worker processes busy with a user's turn.", value=busy)
        yield GaugeMetricFamily("smsd_workers_idle", "Pre-forked worker processes waiting for a user.",
                                value=len(sup.workers) - busy)
        yield GaugeMetricFamily("smsd_max_workers", "supervisor.max_workers.",
                                value=sup.settings.supervisor.max_workers)
        restarts = CounterMetricFamily("smsd_worker_restarts", "Workers that died and were replaced, by "
                                       "reason (resets on a restart).", labels=["reason"])
        for reason in sorted(set(fig.restarts) | {"crashed", "killed", "hung", "rss"}):
            restarts.add_metric([reason], fig.restarts.get(reason, 0))
        yield restarts


def _user_sums(sup: SupervisorView) -> dict:
    """Pending, quarantined, ungrounded and unflushed SMS summed over users, and users by status.

    One pass with no per-user rows (what ``smsctl status`` builds): a scrape
    with 10,000 users must not hold up the loop.
    """
    running = running_users(sup.workers.values())
    now = time.monotonic()
    sums = {"pending": 0, "quarantined": 0, "ungrounded": 0, "unflushed": 0}
    by_status: Counter[str] = Counter()
    for user in sup.users.values():
        info = user.info
        live = running.get(user.user_id)
        journal = live_journal(live, user.user_id) or info.get("journal") or {}
        counters = info.get("counters") or {}   # the user's smsd_user_stats, as discovery read them
        pending = int(info.get("pending_sms") or 0)
        quarantined = int(counters.get("quarantined_sms") or 0)
        unflushed = int(journal.get("unflushed") or 0)
        sums["pending"] += pending
        sums["quarantined"] += quarantined
        sums["unflushed"] += unflushed
        sums["ungrounded"] += int(counters.get("ungrounded_sms") or 0) + int(journal.get("ungrounded") or 0)
        by_status[user_status(user, live is not None, pending, unflushed, quarantined, now)] += 1
    return dict(sums, by_status=by_status)


def _histogram(name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, buckets=hist.cumulative(), sum_value=hist.sum)


class Metrics:
    """The ``/metrics`` body of one supervisor, rendered at most every :data:`RENDER_EVERY_S`."""

    def __init__(self, sup: SupervisorView) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(sup))   # type: ignore[arg-type]
        self._body = b""
        self._at = -math.inf
        self._every = RENDER_EVERY_S

    def body(self) -> bytes:
        """The Prometheus text format of every figure (a cached copy under a scrape storm)."""
        now = time.monotonic()
        if now - self._at >= self._every:
            self._body = generate_latest(self.registry)
            self._at = time.monotonic()
            self._every = max(RENDER_EVERY_S, (self._at - now) / RENDER_SHARE)
        return self._body
