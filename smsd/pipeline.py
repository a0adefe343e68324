"""One user's job: replay the journal, then claim → LLM → journal → flush.

This module is where DESIGN.md's invariants are kept, in this order:

* invariant 1 — :meth:`Pipeline._ask` commits the answer to the journal, in the LLM
  thread that received it and whatever the main loop is doing, before
  :meth:`Pipeline.flush` writes anything to MongoDB (which reads what is committed);
* invariants 2-4 — :meth:`Pipeline.flush` is the one function that writes a
  journaled answer to MongoDB: for all the answers committed so far, one bulk
  upsert of transactions (acknowledged, journaled), then one ``update_many`` of
  ``isprocessed``, then one checkpoint update, then the journal rows are marked;
* invariant 5 — :meth:`Pipeline._claim` never hands out an SMS that has a
  result in the journal;
* invariant 6 — :meth:`Pipeline._note_failures` quarantines an SMS after
  ``max_attempts`` failed answers; it never marks it processed.

The process model (who runs a pipeline, signals, restarts) lives elsewhere:
``smsd once`` runs one in the foreground, a supervisor worker runs one per turn.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Callable

from . import grounding
from . import batch
from .config import Settings
from .failpoints import failpoint
from .flush_policy import FlushPolicy
from .histogram import FLUSH_BUCKETS, LLM_BUCKETS, Histogram
from . import journal_runs
from .journal import Answer, Journal
from .pipeline_free import FreeAnswers, _as_result  # noqa: F401 - _as_result re-exported
from . import answer_cache
from .ledger import FREE_MODELS, cost_usd, price_for, write_costs
from .llm import LlmAnswer, LlmError
from .llm_errors import LlmBatchError, LlmConfigError
from .model import FlushItem, Quarantine, Sms, Usage
from .model import wire_ids as model_wire_ids
from .store import Store, StoreUnavailable
from .pipeline_types import Extractor, HandoverBox, RunSummary, StaleEpoch  # noqa: F401 - re-exported

log = logging.getLogger("smsd.pipeline")

#: Journal answers replayed per loop turn, between new LLM calls.
REPLAY_CHUNK = 64


@dataclass
class _Call:
    call_id: str
    sms: list[Sms]
    wire: list[str] | None = None      # the ids on the wire, as in the call's journal record
    sent_at: float = field(default_factory=time.monotonic)


@dataclass
class _Outcome:
    """What the LLM thread hands the main loop once the call's fate is journaled."""

    answer: LlmAnswer | None = None
    error: LlmError | None = None
    failed: dict[str, str] = field(default_factory=dict)   # key -> why it has no result
    cost: Decimal | None = None        # USD of the call (None: its model has no price)
    repeated_usd: Decimal = Decimal(0)  # of which re-bought SMS of earlier calls


class Pipeline(FreeAnswers):
    """Runs one user's SMS through the LLM into MongoDB, journal first.

    ``stop`` asks for a drain: no new LLM calls, in-flight calls finish,
    everything answered is flushed, then :meth:`run` returns.  ``abort``
    additionally cuts waits short (fast stop).
    """

    #: Set by a worker that holds a lease: False while the lease may be expiring.
    may_pay: Callable[[], bool] | None = None

    def __init__(self, *, user_id: str, journal: Journal, store: Store, extractor: Extractor,
                 settings: Settings, owner: str = "", epoch: int = 0,
                 stop: threading.Event | None = None, abort: threading.Event | None = None,
                 on_tick: Callable[["Pipeline"], None] | None = None,
                 fence: Callable[[list[FlushItem]], list[FlushItem]] | None = None,
                 handover: HandoverBox | None = None, start: Any = None) -> None:
        self.user_id = user_id
        self.journal = journal
        self.store = store
        self.extractor = extractor
        self.settings = settings
        self.owner = owner
        self.epoch = epoch
        self.stop = stop or threading.Event()
        self.abort = abort or threading.Event()
        self.on_tick = on_tick
        # Multi-host fencing hook (smsd.fencing.FencedStore.claim): the flush's first write;
        # raises StaleEpoch when a newer epoch owns the user, drops SMS already processed.
        self.fence = fence
        self.handover = handover
        self.summary = RunSummary(user_id=user_id)
        # Sent in the worker's status line; the supervisor adds them up for /metrics.
        self.latency = {"llm": Histogram(LLM_BUCKETS), "flush": Histogram(FLUSH_BUCKETS)}
        self.mongo_ok = True
        self.mongo_error: str | None = None
        self.mongo_down_since: float | None = None   # monotonic time of the first failure of an outage
        self._batch_id = ""
        self._buffer: deque[Sms] = deque()
        self._retry: deque[Sms] = deque()     # SMS whose answer failed: asked again alone
        self._inflight: dict[Future, _Call] = {}
        self._exhausted = False
        self._next_store_try = 0.0
        self._store_backoff = 0.5
        self._llm_backoff_until = 0.0
        self._llm_failures = 0
        self._backlog = True        # unknown until the first replay chunk: assume some
        self._stop_seen: float | None = None   # when a drain first found MongoDB down
        # Calls answered and committed by this pipeline (set from the LLM threads):
        # their SMS cannot have transaction documents from an earlier answer unless
        # the call re-asked them, so their flush skips the stale-document find.
        self._fresh_calls: set[str] = set()
        # The checkpoint counters last written, so the run's end does not write them twice.
        self._checkpoint_written: tuple | None = None
        self._none_pending = False      # the last count found nothing pending (reset by a claim)
        # The shared answer cache (needs an LLM client: its prompt and schema version the key).
        self.cache = answer_cache.CacheGate.for_pipeline(settings, extractor, store, journal)
        # While calls are in flight, answers gather into page-sized flushes (smsd.flush_policy).
        self.flushing = FlushPolicy(settings.pipeline.flush_gather_sms, settings.pipeline.flush_max_wait_ms)
        # A group turn's prologue read this run's start (smsd.group_start.Prestart): used once.
        self.start = start
        if start is not None:
            start.prime(self.cache)

    # ------------------------------------------------------------------ run
    def run(self, *, limit: int | None = None, resume: bool = True,
            max_sms: int | None = None) -> RunSummary:
        """Process this user's pending SMS.

        ``limit`` caps the SMS of this run (the seed's ``--limit``: it also sets
        the run's ``total_sms``); ``max_sms`` caps what this call asks before it
        returns with the run still ``in_progress`` (a worker's turn).
        """
        started = time.monotonic()
        s = self.summary
        try:
            if not self._wait_for_store(self._start_run, resume, limit):
                s.stopped = True
                return s
            # The journal's backlog (a crash's answered-but-unflushed rows) is replayed
            # by the loop in chunks, between new calls: a big backlog does not hold
            # back the first new LLM call.
            caps = [x for x in (limit, max_sms) if x is not None]
            budget = min(caps) if caps else None     # 0: ask nothing, only replay and flush
            # Each LLM thread opens its journal connection as it starts, not with its first answer.
            with ThreadPoolExecutor(max_workers=self.settings.llm.concurrency, thread_name_prefix="smsd-llm",
                                    initializer=self.journal.prepare_committer) as pool:
                self._loop(pool, budget)
            self._wait_for_store(self._flush_backlog)
            self._wait_for_store(self._finish_run, limit)
        finally:
            s.elapsed_s = time.monotonic() - started
            s.stopped = self.stop.is_set()
        return s

    def _loop(self, pool: ThreadPoolExecutor, budget: int | None) -> None:
        s = self.summary
        while True:
            if self.on_tick:
                self.on_tick(self)
            # A configuration error ends the asking like a drain: what is answered is flushed.
            draining = self.stop.is_set() or self.summary.config_error is not None
            room = budget is None or s.asked_sms < budget
            if not draining and room and not self._buffer and not self._retry and not self._exhausted:
                self._claim()
            if not draining and room:
                self._submit(pool, budget)
            if not self._inflight:
                if draining or not room or (self._exhausted and not self._buffer and not self._retry
                                            and not (self.cache and self.cache.held)):
                    return
                # Nothing in flight but work remains: the store is down, the
                # backlog is full, or the LLM is backing off.  Flush and wait.
                self._flush_backlog_quietly(REPLAY_CHUNK)
                if not self._backlog or not self.mongo_ok:
                    self._sleep(0.2)
                continue
            # No zero wait while MongoDB is down: the flush is backing off, and a spinning
            # loop would take the GIL from the LLM threads committing their answers (nor the
            # gathered answers' deadline: it has passed, and the flush waits for MongoDB).
            timeout = self.flushing.wait_s(0.0 if self._backlog else 0.5) if self.mongo_ok else 0.5
            done, _ = wait(list(self._inflight), timeout=timeout,
                           return_when=FIRST_COMPLETED)
            for fut in done:
                self._on_answer(self._inflight.pop(fut), fut)
            # A replay, a drain or a full page flushes now; else the answers gather (journaled).
            if self._backlog or draining or self.stop.is_set() or self.flushing.due(self.journal.unflushed_count()):
                self._flush_backlog_quietly(REPLAY_CHUNK)

    # ---------------------------------------------------------------- claim
    def _claim(self) -> None:
        """Read the next page of pending SMS that have no result in the journal (invariant 5)."""
        if time.monotonic() < self._next_store_try:
            return
        failpoint("before_claim")
        exclude = {sms.key for call in self._inflight.values() for sms in call.sms}
        if self.cache:
            exclude.update(m.key for m in self.cache.held)
        # Answered but not yet flushed (a replay in progress): still pending in MongoDB,
        # so the store skips them and the page holds SMS that still need an answer.
        exclude.update(self.journal.unflushed_keys())
        # The SMS of an open batch job are answered by the Batch API, not asked online.
        exclude.update(batch.open_keys(self.journal))
        try:
            pre = self.start.page(exclude, self.settings.pipeline.page_size) if self.start else None
            page, malformed = pre if pre is not None else self.store.fetch_pending(
                self.user_id, limit=self.settings.pipeline.page_size, exclude_keys=exclude)
        except StoreUnavailable as exc:
            self._store_down(exc)
            return
        self._store_up()
        self._none_pending = False
        if malformed:
            self._quarantine([Quarantine(raw_id=m.raw_id, key=m.key, user_id=m.user_id,
                                         reason=f"malformed: {m.reason}") for m in malformed])
        answered = self.journal.answered_keys(s.key for s in page)
        fresh = [s for s in page if s.key not in answered]
        if self.handover is not None and fresh:
            fresh = self._adopt(fresh)
        if self.cache and fresh:
            self.cache.prefetch(fresh)
        if len(page) + len(malformed) < self.settings.pipeline.page_size:
            # A short page is the end of the pending set: no second read to find it empty
            # (SMS that arrive later are found by the next discovery).
            self._exhausted = True
        self._buffer.extend(fresh)

    def _adopt(self, page: list[Sms]) -> list[Sms]:
        """Journal what another host paid for and handed over (no call is bought); return the rest."""
        try:
            handed = self.handover.adopt([m.key for m in page])
        except StoreUnavailable:
            return page
        got = [m for m in page if m.key in handed]
        if not got:
            return page
        call_id = self.journal.begin_call([(m.key, m.raw_id) for m in got], owner=self.owner,
                                          epoch=self.epoch, model="handover")
        self.journal.record_answer(call_id, [(m.raw_id, handed[m.key]) for m in got], failed={},
                                   request_id=None, usage=Usage(), model="handover")
        log.info("user %s: %d SMS answered by another host's handover", self.user_id, len(got))
        try:
            self.handover.forget([m.key for m in got])
        except StoreUnavailable:
            pass   # left behind, harmless: the SMS is answered in our journal
        return [m for m in page if m.key not in handed]

    # --------------------------------------------------------------- submit
    def _submit(self, pool: ThreadPoolExecutor, budget: int | None) -> None:
        s = self.summary
        llm = self.settings.llm
        while len(self._inflight) < llm.concurrency and (self._buffer or self._retry):
            if time.monotonic() < self._llm_backoff_until:
                return
            if self.may_pay is not None and not self.may_pay():
                return  # the lease may be expiring (MongoDB out of reach): no paid call now
            if not self.mongo_ok and self.journal.unflushed_count() >= self.settings.journal.max_backlog:
                return  # MongoDB is down: pause paid calls until the flush can catch up
            left = None if budget is None else budget - s.asked_sms
            if left is not None and left <= 0:
                return
            # A previously failed SMS is asked alone, so one poison SMS cannot
            # make a whole batch fail again.
            size = 1 if self._retry else llm.batch_size
            queue = self._retry if self._retry else self._buffer
            n = size if left is None else min(size, left)
            batch = [queue.popleft() for _ in range(min(n, len(queue)))]
            batch = self._answer_by_cache(self._answer_by_rules(batch))
            if not batch:
                continue
            # The ids on the wire are the call's own ("1".."N"), kept in its journal record.
            wire = model_wire_ids(len(batch)) if getattr(self.extractor, "short_ids", False) \
                else [m.key for m in batch]
            call_id = self.journal.begin_call([(m.key, m.raw_id) for m in batch], owner=self.owner,
                                              epoch=self.epoch, model=self.extractor.model,
                                              wire_ids=wire,
                                              text_hashes=self.cache.hashes(batch) if self.cache else None)
            failpoint("before_llm_call")
            s.asked_sms += len(batch)
            s.llm_calls += 1
            call = _Call(call_id, batch, wire)
            self._inflight[pool.submit(self._ask, call)] = call

    # --------------------------------------------------------------- answer
    def _ask(self, call: _Call) -> _Outcome:
        """In the LLM thread: ask, then journal the outcome at once (invariant 1).

        The commit happens here, in the thread that received the response, whatever
        the main loop is doing meanwhile (a slow claim or flush, MongoDB down), so a
        kill can only lose an answer in the milliseconds between its last byte and
        this commit (DESIGN.md's crash table).  The main loop only decides what
        follows (:meth:`_on_answer`).
        """
        try:
            answer = self.extractor.extract(call.sms, stop=self.abort, wire_ids=call.wire)
        except LlmBatchError as exc:
            # Too long for the model: the SMS's fault, each of them counts an attempt.
            self.journal.record_failure(call.call_id, str(exc))
            return _Outcome(error=exc)
        except LlmError as exc:
            # The call failed as a whole (outage, timeouts after retries): not the
            # SMS's fault, so no attempt is counted.
            self.journal.record_failure(call.call_id, str(exc), [])
            return _Outcome(error=exc)
        failpoint("after_llm_answer")
        # An answer whose values are not in its SMS is an invalid item, asked again alone.
        answer = grounding.ground(answer, call.sms)
        keys = [m.key for m in call.sms]
        items = [(m.raw_id, answer.results[m.key]) for m in call.sms if m.key in answer.results]
        failed = {k: answer.failed.get(k, "missing from answer") for k in keys if k not in answer.results}
        price = price_for(answer.model, self.settings.llm.price_table)
        cost = cost_usd(answer.usage, price) if price else None
        repeated = self.journal.record_answer(call.call_id, items, failed=failed,
                                              request_id=answer.request_id, usage=answer.usage,
                                              model=answer.model, cost_usd=cost)
        self._fresh_calls.add(call.call_id)
        committed = getattr(self.extractor, "committed", None)
        if committed is not None:   # a group turn's combiner (smsd.combiner): its crash window
            committed()
        failpoint("after_commit")
        return _Outcome(answer=answer, failed=failed, cost=cost, repeated_usd=repeated)

    def _on_answer(self, call: _Call, fut: Future) -> None:
        """In the main loop, for a call whose outcome is journaled: retries, back-off, quarantine."""
        s = self.summary
        outcome: _Outcome = fut.result()
        exc = outcome.error
        if isinstance(exc, LlmConfigError):
            # Asking again cannot help (bad key, unknown model, a request always refused):
            # no attempt is counted against the SMS; the run stops asking.
            s.failed_calls += 1
            if s.config_error is None:
                log.error("user %s: LLM misconfigured, not asking any more: %s; fix: %s",
                          self.user_id, exc, exc.hint)
            s.config_error = exc
            self._buffer.extendleft(reversed(call.sms))
            self._release(call.sms)
            return
        if isinstance(exc, LlmBatchError):
            # Each SMS is asked alone next (the retry queue), then quarantined at the cap.
            s.failed_calls += 1
            self._release(call.sms)   # no answer: they no longer pay for their texts
            self._note_failures(call.sms, dict.fromkeys((m.key for m in call.sms),
                                                        "batch refused as too long"))
            return
        if exc is not None:
            s.failed_calls += 1
            self._llm_failures += 1
            delay = min(60.0, 2.0 ** self._llm_failures)
            self._llm_backoff_until = time.monotonic() + delay
            log.warning("user %s: LLM call failed (%s); retrying %d SMS in %.0f s",
                        self.user_id, exc, len(call.sms), delay,
                        extra={"user_id": self.user_id, "call_id": call.call_id, "n_sms": len(call.sms),
                               "retry_in_s": delay})
            self._buffer.extendleft(reversed(call.sms))
            self._release(call.sms)
            return
        self._llm_failures = 0
        answer, failed = outcome.answer, outcome.failed
        assert answer is not None
        if answer.elapsed_ms:
            self.latency["llm"].observe(answer.elapsed_ms / 1000.0)
        if answer.model in FREE_MODELS:
            s.free_sms += len(answer.results)
        else:
            s.cost_usd += outcome.cost or 0
            s.repeated_usd += outcome.repeated_usd
            s.paid_sms += len(call.sms)
            s.unpriced_calls += int(outcome.cost is None)
        if answer.unknown_ids:
            log.warning("user %s: answer %s named %d unknown ids (ignored)",
                        self.user_id, call.call_id, len(answer.unknown_ids),
                        extra={"user_id": self.user_id, "call_id": call.call_id,
                               "unknown_ids": len(answer.unknown_ids)})
        if failed:
            self._release([m for m in call.sms if m.key in failed])
            self._note_failures([m for m in call.sms if m.key in failed], failed)

    def _note_failures(self, sms: list[Sms], reasons: dict[str, str]) -> None:
        """Ask failed SMS again, alone, until ``max_attempts``; then quarantine (invariant 6)."""
        attempts = self.journal.attempts(m.key for m in sms)
        cap = self.settings.pipeline.max_attempts
        give_up = []
        for m in sms:
            n = attempts.get(m.key, 0)
            if n >= cap:
                reason = reasons[m.key]
                if not reason.startswith(grounding.PREFIX):  # "ungrounded: amount" says it all
                    reason = f"unparsed after {n} attempts: {reason}"
                give_up.append(Quarantine(raw_id=m.raw_id, key=m.key, user_id=m.user_id,
                                          reason=reason, attempts=n))
            else:
                self._retry.append(m)
        if give_up:
            self._quarantine(give_up)

    def _quarantine(self, items: list[Quarantine]) -> None:
        self.journal.add_quarantine(items)   # decided locally first, like any result
        self.summary.quarantined += len(items)
        for q in items:
            log.warning("user %s: SMS %s quarantined: %s", self.user_id, q.key, q.reason,
                        extra={"user_id": self.user_id, "sms_key": q.key, "attempts": q.attempts})
        self._flush_backlog_quietly()

    # ---------------------------------------------------------------- flush
    def flush(self, answers: list[Answer]) -> int:
        """Write journaled answers to MongoDB, idempotently; the only such writer.

        Order (DESIGN.md invariants 2-4): the transactions with an acknowledged,
        journaled write; then ``isprocessed`` for their SMS; then the checkpoint;
        only then the journal rows are marked flushed.  A crash anywhere in
        between replays this same function on the same rows, which rewrites the
        same documents.  Returns how many SMS were newly marked processed.
        """
        if not answers:
            return 0
        started = time.monotonic()
        items = [FlushItem(raw_id=raw_id, user_id=self.user_id, result=result,
                           provenance=answer.provenance())
                 for answer in answers for raw_id, result in answer.items]
        # Within one journal an SMS has one result (the first answer wins), so an older
        # answer's extra transaction documents can only exist where this pipeline did not
        # see the SMS's whole history: rows journaled before it started (a replay: another
        # process, a previous owner, a lost state directory) and calls that re-asked an SMS
        # (`smsctl retry`, a failed call).  Only those pay the stale-document find.
        stale = {result.key for answer in answers
                 if answer.call_id not in self._fresh_calls or answer.repeated_sms
                 for _, result in answer.items}
        if self.fence is not None:
            # Only those pay the claim, too (smsd.fencing: what the claim is for).  A fresh
            # answer's SMS were read pending by this turn under its lease: the gated
            # transaction write and the fenced isprocessed refuse them if the lease moved.
            claimed = [item for item in items if item.result.key in stale]
            if claimed:
                kept = {id(item) for item in self.fence(claimed)}   # StaleEpoch: a newer owner
                items = [item for item in items if item.result.key not in stale or id(item) in kept]
            if not items:                  # all processed already: invariant 3 holds for them
                self.journal.mark_flushed([a.call_id for a in answers])
                return 0
            failpoint("after_claim")
        self.store.upsert_transactions(items, replace_stale=stale)
        failpoint("mid_flush")
        raw_ids = [item.raw_id for item in items]
        newly = self.store.mark_processed(self.user_id, raw_ids, self._batch_id)
        s = self.summary
        s.newly_processed += newly
        s.processed_sms += newly
        s.last_processed_id = raw_ids[-1]
        # The flush that processes the run's last pending SMS completes its checkpoint in
        # the same update: a kill before _finish_run must not leave the run in_progress
        # for ever (no pending SMS, no journal backlog: no worker would ever resume it).
        # SMS quarantined by this run count as settled: a run whose last SMS were answered
        # after its quarantines would otherwise wait for _finish_run, and a kill before it
        # left the run in_progress with nothing pending.
        settled = s.processed_sms + s.quarantined >= s.total_sms
        done = bool(s.total_sms) and settled and (
            (self._nothing_left_in_hand(answers) and not self.journal.unflushed_quarantine())
            or self._count_pending() == 0)
        self._write_checkpoint(total_sms=s.total_sms if done else None,
                               status="completed" if done else "in_progress")
        if self.cache is not None:   # only flushed answers: their SMS are stored and processed
            races, back = self.cache.fill(answers)
            self.summary.cache_races += races
            self._buffer.extendleft(reversed(back))
        failpoint("after_flush")
        self.journal.mark_flushed([a.call_id for a in answers])
        failpoint("after_mark_flushed")
        self.latency["flush"].observe(time.monotonic() - started)
        return newly

    def _flush_backlog(self, max_answers: int | None = None) -> bool:
        """Flush unflushed answers (all, or up to ``max_answers``) and quarantine decisions."""
        flushed = 0
        self._backlog = True
        while max_answers is None or flushed < max_answers:
            limit = 64 if max_answers is None else min(64, max_answers - flushed)
            answers = self.journal.unflushed(limit=limit)
            if answers:
                self.flush(answers)
                flushed += len(answers)
            if len(answers) < limit:
                # Drained as of the read: answers committed during this flush gather for the next.
                self._backlog = False
                break
        self.flushing.flushed()
        if self.flushing.costs_due(bool(self._inflight) and not self.stop.is_set()):
            self._sync_costs()
        pending = self.journal.unflushed_quarantine()
        if pending:
            self.store.quarantine(pending)
            self.journal.mark_quarantine_flushed([q.key for q in pending])
            # MongoDB now carries the reason and count; `smsctl retry` gives a fresh set of attempts.
            self.journal.clear_failures([q.key for q in pending])
            if self._batch_id and self._count_pending() == 0:
                # A quarantine may be the run's last act: complete the checkpoint now, as the
                # last flush does, so a kill before _finish_run cannot leave it in_progress.
                self._write_checkpoint(total_sms=None, status="completed")
        return True

    def _nothing_left_in_hand(self, flushing: list[Answer]) -> bool:
        """The last page was short and all it held is flushed: no count needed to complete.

        An SMS that arrived since is a new run's (the next discovery finds it).
        """
        # A call whose whole answer is in this flush is not in hand any more, even if the
        # main loop has not collected its future yet: the LLM thread journals the answer
        # before the future completes, and a flush after a timed-out wait can take it.
        flushed = {(a.call_id, r.key) for a in flushing for _, r in a.items}
        inflight = any(any((call.call_id, m.key) not in flushed for m in call.sms)
                       for call in self._inflight.values())
        held = self._buffer or self._retry or inflight or (self.cache and self.cache.held)
        self._none_pending = self._exhausted and not held
        return self._none_pending

    def _count_pending(self) -> int:
        left = self.store.count_pending(self.user_id)
        self._none_pending = left == 0
        return left

    def _write_checkpoint(self, *, total_sms: int | None, status: str) -> None:
        """Move the run's checkpoint (``$max`` counters); skip a write that would change nothing."""
        s = self.summary
        state = (s.processed_sms, total_sms, s.last_processed_id, status)
        if state == self._checkpoint_written:
            return
        self.store.checkpoint_progress(self.user_id, self._batch_id, processed_sms=s.processed_sms,
                                       total_sms=total_sms, last_processed_id=s.last_processed_id,
                                       status=status)
        self._checkpoint_written = state

    def _sync_costs(self) -> None:
        """Copy the journal's changed ledger rows to MongoDB (``$max``: a replay cannot count twice)."""
        rows = self.journal.unsynced_ledger()
        if rows:
            write_costs(self.store, self.user_id, rows)
            self.journal.mark_ledger_synced(rows)

    def _flush_backlog_quietly(self, max_answers: int | None = None) -> None:
        if time.monotonic() < self._next_store_try:
            return
        try:
            self._flush_backlog(max_answers)
        except StoreUnavailable as exc:
            self._store_down(exc)
        else:
            self._store_up()

    # ------------------------------------------------------------- run state
    def _start_run(self, resume: bool, limit: int | None) -> bool:
        s = self.summary
        run = self.start.take_run() if self.start is not None and resume and limit is None else None
        latest = run.latest if run else self.store.latest_checkpoint(
            self.user_id, since=journal_runs.latest_run_at(self.journal)) if resume else None
        if latest and latest.get("status") == "in_progress":
            started = latest
            self._batch_id = latest["batch_id"]
            s.resumed_from = dict(latest)
            s.total_sms = int(latest.get("total_sms") or 0)
            # isprocessed may have been set by a flush whose checkpoint update was
            # lost to a crash: count what MongoDB says, never less than we knew.
            s.processed_sms = max(int(latest.get("processed_sms") or 0),
                                  self.store.count_processed_in_batch(self.user_id, self._batch_id))
            s.last_processed_id = latest.get("last_processed_id")
        elif run and run.checkpoint:   # opened by the group's prologue
            started = run.checkpoint
            self._batch_id, s.total_sms = run.checkpoint["batch_id"], run.checkpoint["total_sms"]
        else:
            pending = self.store.count_pending(self.user_id)
            total = pending if limit is None else min(pending, limit)
            started = self.store.checkpoint_start(self.user_id, total)
            self._batch_id = started["batch_id"]
            s.total_sms = total
        s.batch_id = self._batch_id
        journal_runs.note_run(self.journal, started)   # the next turn's read starts there
        return True

    def _finish_run(self, limit: int | None) -> bool:
        s = self.summary
        # The flush that completed the run has just counted: nothing was claimed since.
        left = 0 if self._none_pending else self._count_pending()
        s.pending_left = left
        done = left == 0 or (limit is not None and s.processed_sms + s.quarantined >= s.total_sms)
        if done:
            s.status = "completed"
            s.total_sms = max(s.total_sms, s.processed_sms)
        self._write_checkpoint(total_sms=s.total_sms, status=s.status)
        return True

    def _wait_for_store(self, fn: Callable[..., bool], *args: Any) -> bool:
        """Call ``fn`` until MongoDB answers; False if stopped first."""
        while True:
            try:
                result = fn(*args)
            except StoreUnavailable as exc:
                self._store_down(exc)
                if self.abort.is_set() or (self.stop.is_set() and fn is not self._flush_backlog):
                    return False
                if self.stop.is_set() and self._stop_deadline_passed():
                    return False
                if self.on_tick:
                    self.on_tick(self)
                self._sleep(max(0.05, self._next_store_try - time.monotonic()))
                continue
            self._store_up()
            return result

    def _stop_deadline_passed(self) -> bool:
        # A drain waits for MongoDB for a while, but not for ever: what is not
        # flushed stays in the journal and is replayed by the next start.
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return time.monotonic() - self._stop_seen > self.settings.supervisor.drain_timeout

    def _store_down(self, exc: Exception) -> None:
        if self.mongo_ok:
            log.warning("user %s: MongoDB unavailable (%s); journaling until it answers",
                        self.user_id, type(exc).__name__)
            self.mongo_down_since = time.monotonic()
        self.mongo_ok = False
        self.mongo_error = type(exc).__name__
        self._next_store_try = time.monotonic() + self._store_backoff
        self._store_backoff = min(self._store_backoff * 2, 5.0)

    def _store_up(self) -> None:
        if not self.mongo_ok:
            log.info("user %s: MongoDB answers again", self.user_id)
        self.mongo_ok = True
        self.mongo_error = None
        self.mongo_down_since = None
        self._store_backoff = 0.5
        self._next_store_try = 0.0

    def _sleep(self, seconds: float) -> None:
        self.abort.wait(seconds)


