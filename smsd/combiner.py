"""Trickle batching: one LLM call filled with the SMS of several users of a group turn.

Why: a 24/7 deployment mostly sees users with 1-3 new SMS.  Asked per user,
each call carries 1-3 SMS and pays the whole fixed prefix (system prompt and
schema, about 1,150 tokens) for them: ~650 prompt tokens per SMS against ~117
in a backfill.  The prefix is paid per *call*, so the fix is fewer calls, not a
shorter prefix.

How (and why this way): a worker given a *group* of small users
(:mod:`smsd.worker_group`) runs one ordinary :class:`smsd.pipeline.Pipeline`
per user, each in its own thread with its own journal, lock, lease and fenced
writes, so none of the per-user guarantees move.  They share one
:class:`CallCombiner`, which stands where the LLM client stands: each
pipeline's ``_ask`` journals ``begin_call`` in its own journal first (nothing
is paid that is not journaled), then calls :meth:`Member.extract`.  The
combiner holds a request briefly -- until every member still working has a
request waiting or in flight, the call is full (``llm.batch_size`` SMS), or
``pipeline.trickle_wait_ms`` passed -- and then one of the waiting threads
makes ONE real call with all the held SMS, wire ids renumbered "1".."N" over
the combined call.  The answer is split back: each requester gets its SMS's
results and failures, the request id and its share of the usage, and returns
at once to commit in its own thread (DESIGN.md: commit in the thread that
received the answer).  Shares are integer token splits that sum exactly to
the call's usage, and the price is linear in tokens, so the ledger's USD over
the users is the call's USD.

Crash window: a kill after the combined answer and between the members'
commits loses the answers of the members not yet committed; their journal rows
still say "asked", so after a restart exactly that call's SMS of those users
are asked again (counted as repeated in their ledgers) -- the same window one
user's call has, once per member.  The failpoint ``group_between_commits``
hits it deterministically: the other members wait for the first one's commit,
then the process dies.

A request's journal record keeps its own local wire ids ("1".."n"); the
combined call's numbering is not journaled because an online answer is never
replayed from the wire (after a crash the call is asked again).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .failpoints import enabled, failpoint
from .llm import LlmAnswer
from .model import Sms, Usage
from .model import wire_ids as model_wire_ids

log = logging.getLogger("smsd.combiner")

#: The failpoint between the commits of a combined call's members.
BETWEEN_COMMITS = "group_between_commits"
#: A member that has not asked yet is waited for this many times ``wait_s``: the
#: group's users start together, and a freshly forked worker's first turn (its
#: first MongoDB connection, twelve journals and leases) can take longer than
#: ``wait_s`` on a loaded host; once every member has asked, ``wait_s`` applies.
FIRST_ASK_FACTOR = 4


def split_counts(total: int, weights: list[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, integers that sum exactly to ``total``.

    Largest remainder; ties go to the earlier share, so the split is deterministic.
    """
    whole = sum(weights)
    if whole <= 0:
        return [total] + [0] * (len(weights) - 1) if weights else []
    shares = [total * w // whole for w in weights]
    rest = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % whole), i))
    for i in order[:rest]:
        shares[i] += 1
    return shares


def split_usage(usage: Usage, weights: list[int]) -> list[Usage]:
    """Each requester's share of one call's usage (by SMS), summing exactly to it.

    The uncached and cached prompt tokens are split apart, so no share has more
    cached than prompt tokens and the shares' prices add up to the call's price.
    """
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    uncached = split_counts(usage.prompt_tokens - cached, weights)
    cached_s = split_counts(cached, weights)
    completion = split_counts(usage.completion_tokens, weights)
    return [Usage(prompt_tokens=u + c, completion_tokens=o, cached_tokens=c)
            for u, c, o in zip(uncached, cached_s, completion)]


@dataclass(eq=False)
class _Request:
    member: "Member"
    sms: list[Sms]
    stop: threading.Event | None
    answer: LlmAnswer | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    committed: threading.Event = field(default_factory=threading.Event)
    first: "_Request | None" = None      # the first requester of the same combined call


class CallCombiner:
    """Fills LLM calls with the SMS of several pipelines (module docstring); thread-safe."""

    def __init__(self, extractor: Any, *, max_sms: int, wait_s: float) -> None:
        self.extractor = extractor
        self.max_sms = max(1, int(max_sms))
        self.wait_s = max(0.0, float(wait_s))
        self.short_ids = bool(getattr(extractor, "short_ids", False))
        self._cond = threading.Condition()
        self._pending: list[_Request] = []
        self._members: list[Member] = []
        #: Called (outside the lock) when a call was answered or a member left: the group's
        #: flush writes wait on those members (:meth:`smsd.group_writes.GroupWrites.poke`).
        self.on_change: Callable[[], None] = _nothing
        self.calls = 0            # real calls made (for the log line and tests)
        self.requests = 0         # member requests they carried

    def member(self, user_id: str) -> "Member":
        """The extractor one pipeline of the group uses."""
        m = Member(self, user_id)
        with self._cond:
            self._members.append(m)
        return m

    # ------------------------------------------------------------- members
    def leave(self, member: "Member") -> None:
        """A member's pipeline is done: nobody waits for its requests any more."""
        with self._cond:
            member.active = False
            self._cond.notify_all()
        self.on_change()

    def poke(self) -> None:
        """A member's state changed outside the combiner (it entered a flush write,
        :mod:`smsd.group_writes`): a held call waiting for it looks again now.

        Without it the held call slept out its whole wait (``trickle_wait_ms``) while
        the writer's batch waited for the held call's members: each waited for the other.
        """
        with self._cond:
            self._cond.notify_all()

    def ask(self, member: "Member", sms: list[Sms], stop: threading.Event | None) -> _Request:
        """Hold ``sms`` until the combined call is due, make it (in some member's thread), answer."""
        req = _Request(member, list(sms), stop)
        with self._cond:
            member.asked = True
            self._pending.append(req)
            member.waiting += 1
            started = time.monotonic()
            self._cond.notify_all()
            while not req.done.is_set():
                batch = self._due(started)
                if batch:
                    self._cond.release()
                    try:
                        self._call(batch)
                    finally:
                        self._cond.acquire()
                    continue
                if req in self._pending:
                    left = self.wait_s * FIRST_ASK_FACTOR - (time.monotonic() - started)
                    self._cond.wait(timeout=max(0.001, min(self.wait_s, left)))
                else:   # taken by another member's thread: wait for its answer
                    self._cond.release()
                    try:
                        req.done.wait()
                    finally:
                        self._cond.acquire()
        return req

    def _due(self, started: float) -> list[_Request]:
        """Under the lock: the requests of the next combined call if it is due now, else []."""
        if not self._pending:
            return []
        held = sum(len(r.sms) for r in self._pending)
        waiting = {id(r.member) for r in self._pending}
        idle = [m for m in self._members
                if m.active and m.in_flight == 0 and id(m) not in waiting and not m.writing()]
        waited = time.monotonic() - started
        limit = self.wait_s * (FIRST_ASK_FACTOR if any(not m.asked for m in idle) else 1)
        if held < self.max_sms and idle and waited < limit:
            return []
        batch, n = [], 0
        for r in list(self._pending):
            if batch and n + len(r.sms) > self.max_sms:
                break
            batch.append(r)
            n += len(r.sms)
        for r in batch:
            self._pending.remove(r)
            r.member.waiting -= 1
            r.member.in_flight += 1
        return batch

    def _call(self, batch: list[_Request]) -> None:
        """One real call for ``batch`` (outside the lock); every requester gets its share."""
        sms = [m for r in batch for m in r.sms]
        wire = model_wire_ids(len(sms)) if self.short_ids else [m.key for m in sms]
        stop = next((r.stop for r in batch if r.stop is not None), None)
        try:
            answer: LlmAnswer | None = self.extractor.extract(sms, stop=stop, wire_ids=wire)
            error: BaseException | None = None
        except BaseException as exc:  # noqa: BLE001 - every requester gets the call's error
            answer, error = None, exc
        shares = split_answer(answer, [r.sms for r in batch]) if answer is not None else []
        with self._cond:
            self.calls += 1
            self.requests += len(batch)
            for i, r in enumerate(batch):
                r.member.in_flight -= 1
                r.error = error
                r.answer = shares[i] if shares else None
                r.first = batch[0] if i else None
                r.done.set()
            self._cond.notify_all()
        self.on_change()
        if len(batch) > 1:
            log.debug("combined call: %d SMS of %d requests", len(sms), len(batch))


def split_answer(answer: LlmAnswer, parts: list[list[Sms]]) -> list[LlmAnswer]:
    """One answer per requester: its SMS's results, failures, drops; its usage share."""
    usages = split_usage(answer.usage, [len(p) for p in parts])
    out = []
    for i, (part, usage) in enumerate(zip(parts, usages)):
        keys = {m.key for m in part}
        out.append(replace(
            answer,
            results={k: v for k, v in answer.results.items() if k in keys},
            failed={k: v for k, v in answer.failed.items() if k in keys},
            dropped={k: v for k, v in answer.dropped.items() if k in keys},
            unknown_ids=list(answer.unknown_ids) if i == 0 else [],   # reported once
            usage=usage))
    return out


def _never() -> bool:
    return False


def _nothing() -> None:
    pass


class Member:
    """One pipeline's view of the combiner: answers like the LLM client it wraps."""

    def __init__(self, combiner: CallCombiner, user_id: str) -> None:
        self._combiner = combiner
        self.user_id = user_id
        self.active = True
        self.asked = False        # has made a request (a member still starting is waited for longer)
        self.waiting = 0
        self.in_flight = 0
        # Set by the group turn: the member is in a flush write (waiting for the others'
        # answers, smsd.group_writes), so a held call does not wait for it to ask.
        self.writing: Callable[[], bool] = _never
        self._last = threading.local()

    def __getattr__(self, name: str) -> Any:
        # model, short_ids, response_format_sent, ...: the real client's
        return getattr(self._combiner.extractor, name)

    def extract(self, sms: list[Sms], *, stop: threading.Event | None = None,
                wire_ids: list[str] | None = None) -> LlmAnswer:
        """Ask ``sms`` in the next combined call; this requester's share of its answer.

        ``wire_ids`` (this call's own ids, as journaled) are renumbered over the
        combined call; the answer is keyed by SMS key, so nothing maps back by them.
        """
        req = self._combiner.ask(self, sms, stop)
        self._last.req = req
        if req.error is not None:
            raise req.error
        assert req.answer is not None
        if req.first is not None and enabled(BETWEEN_COMMITS):
            req.first.committed.wait(timeout=10.0)
            failpoint(BETWEEN_COMMITS)
        return req.answer

    def committed(self) -> None:
        """The pipeline committed the last answer this thread got (the crash tests' failpoint)."""
        req = getattr(self._last, "req", None)
        if req is not None:
            req.committed.set()

    def leave(self) -> None:
        """This member's pipeline has finished."""
        self._combiner.leave(self)

    def answering(self) -> bool:
        """Its request is held or its combined call is in flight: it commits, then flushes, next."""
        return self.active and (self.waiting > 0 or self.in_flight > 0)

    def elsewhere(self) -> bool:
        """Waiting for a combined call or in one, or finished: making no MongoDB writes now."""
        return not self.active or self.answering()
