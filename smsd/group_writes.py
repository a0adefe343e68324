"""A group turn's flush writes, coalesced: one MongoDB command for all its members.

Why: in a trickle group turn (:mod:`smsd.worker_group`) up to
``trickle_group_max_users`` users each run their own pipeline in a thread, and
after one combined LLM call they all flush at about the same moment, each
issuing the same sequence of commands for its own user (claim, gated
transaction ``$merge`` and its count, ``isprocessed``, checkpoint and user
counters, answer cache, costs).  The MongoDB server's CPU per *command* is what
limits a small-user workload, so k members cost k times the commands of one.
:class:`GroupWrites` merges calls of the same kind that wait at the same moment
into one command (:mod:`smsd.group_commands` builds them) and hands each member
its own result or its own exception.

How: each member's store twin is a :class:`GroupedStore`.  A call of a
coalesced kind joins the open batch of that kind and waits until every member
still running is either in a batch (of any kind) or busy elsewhere (waiting for
the combined LLM call, or its turn is over), or until
``pipeline.group_write_wait_ms`` passed; then the batch's first caller issues
the combined command and everyone returns (the others only wait for their
result).  A member whose request is in the LLM combiner (held, or its call in flight) is waited for longer, up to
``pipeline.flush_max_wait_ms`` (the gathered flush's own bound): a group's
calls are made and answered one after the other (``llm.concurrency`` at a
time), and without that wait each call's answers made a flush round of their
own -- every command of a flush once per call instead of once per group.  The
answers are journaled the moment they arrive, so the wait delays only the
MongoDB write, never what a crash keeps; and a member in a write batch is not
waited for by the combiner (``Member.writing``), and entering a batch tells the
combiner (``notify``: :meth:`smsd.combiner.CallCombiner.poke`), so the two waits
never wait on each other.  A member waited for that long is not waited for again by the
flush's next kinds while the same request is still out.  A batch of one member
runs that member's own per-user path: outside a group turn, and for a member flushing
alone, nothing changes.  Storage stays behind the store interface (huey's
model): the pipeline calls the same methods and cannot tell.

What does not move: each call returns only after its write is acknowledged
with the store's write concern (``j: true``), and only calls of the same kind
are merged, so each user's order of invariants 2-4 (transactions, then
``isprocessed``, then the checkpoint, then the journal rows marked, all in the
member's own thread) is what it was.  Each member's part of a command keeps its
own epoch filter; where a combined result cannot tell every member's outcome
(fewer matched than asked, a write error) each member is settled by its own
existing per-user path, which is idempotent, so StaleEpoch reaches exactly the
members whose lease moved.  StoreUnavailable reaches every member of the batch,
as its own call would have raised it.

Crash windows: a kill during a combined command is the window of a kill during
each member's own command of that kind (DESIGN.md's "after commit, before/mid
flush"): every write is idempotent and each member's journal replays its flush
on restart; nothing is asked of the LLM again.  The failpoint
``group_mid_write`` (after a combined command is acknowledged, before its
members get their results) hits it deterministically.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import group_commands
from .fencing import FencedStore
from .model import FlushItem
from .store_docs import CHECKPOINT_STATUSES, STATUS_COMPLETED, checkpoint_fields
from .store_stats import BASE_FIELD

log = logging.getLogger("smsd.group_writes")

#: The longest the first waiter of a batch sleeps without looking at the members' state.
#: The changes that can make a batch due wake it (:meth:`GroupWrites.poke`: an LLM call of
#: the group answered, a member's turn over, a member entering a batch) and so do its
#: deadlines; this only bounds a change nobody announced.  It polled every 3 ms: in a
#: 300-user run those wake-ups were a tenth of the workers' CPU (yappi).
POLL_S = 0.05


@dataclass(eq=False)
class _Call:
    member: "_Member"
    payload: Any
    result: Any = None
    error: BaseException | None = None
    finished: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Batch:
    kind: str
    run: Callable[[list[Any]], list[Any]]
    started: float
    calls: list[_Call] = field(default_factory=list)


class _Member:
    """One member's state as the coalescer sees it."""

    def __init__(self, name: str, busy: Callable[[], bool], answering: Callable[[], bool]) -> None:
        self.name = name
        self.busy = busy          # True while it waits for the LLM combiner, or once its turn is over
        self.answering = answering  # True while its LLM request is held or in flight: it flushes next
        self.in_batch = 0         # calls of this member waiting in (or being run by) a batch
        self.answered_at = float("-inf")   # when a batch first saw its awaited LLM call answered
        self.given_up = False     # a batch went out without it while it was answering
        self.was_answering = False  # a batch last saw it answering (and waited for it)


def _never() -> bool:
    return False


def _nothing() -> None:
    pass


class GroupWrites:
    """Coalesces the same-kind writes of a group turn's members (module docstring); thread-safe."""

    def __init__(self, wait_s: float = 0.025, answer_wait_s: float = 0.0,
                 notify: Callable[[], None] | None = None) -> None:
        self.wait_s = max(0.0, float(wait_s))
        self.answer_wait_s = max(0.0, float(answer_wait_s))
        # Told when a member enters a batch: the LLM combiner's held call waits for members
        # that are not writing, and nothing else would wake it (CallCombiner.poke).
        self.notify = notify or _nothing
        self._cond = threading.Condition()
        self._members: list[_Member] = []
        self._open: dict[str, _Batch] = {}
        self.batches = 0          # combined commands issued (a batch of two or more calls)
        self.calls = 0            # member calls they carried

    def writing(self, twin: Any) -> Callable[[], bool]:
        """For the LLM combiner: whether ``twin``'s member is in a write batch now."""
        member = getattr(twin, "group_member", None)
        return (lambda: member.in_batch > 0) if member is not None else _never

    def join(self, store: Any, name: str, busy: Callable[[], bool],
             answering: Callable[[], bool] = _never) -> Any:
        """``store`` (a member's twin) as a :class:`GroupedStore` of this group.

        ``busy()`` says the member is elsewhere (in the LLM combiner, or done):
        nobody waits for its calls then, except while ``answering()`` says its
        LLM request is held or in flight (waited for up to ``answer_wait_s``).  A store that
        is not fenced is returned as is.
        """
        if not isinstance(store, FencedStore):
            return store
        twin = copy.copy(store)
        twin.__class__ = GroupedStore
        twin.group_writes = self
        twin.group_member = _Member(name, busy, answering)
        twin.opened_runs = {}
        with self._cond:
            self._members.append(twin.group_member)
        return twin

    def submit(self, member: _Member, kind: str, payload: Any,
               run: Callable[[list[Any]], list[Any]]) -> Any:
        """Add ``payload`` to the open batch of ``kind``; its result once the batch ran.

        ``run(payloads)`` issues the combined command and returns one outcome per
        payload, in order: a result, or an exception to raise in that member's thread.
        """
        call = _Call(member, payload)
        lead: _Batch | None = None
        with self._cond:
            batch = self._open.get(kind)
            if batch is None:
                batch = self._open[kind] = _Batch(kind, run, time.monotonic())
            batch.calls.append(call)
            member.in_batch += 1
            member.given_up = False
            self._cond.notify_all()
            self.notify()
            # The batch's first caller decides when it goes and runs it; the others only wait
            # for their results (each woken by every change of the group, they were most of
            # the group's wake-ups).
            while call is batch.calls[0]:
                due = self._ready(batch, time.monotonic() - batch.started)
                if due <= 0:
                    del self._open[kind]
                    lead = batch
                    break
                self._cond.wait(timeout=min(due, POLL_S))
        if lead is not None:
            self._run(lead)
        else:
            call.finished.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def poke(self) -> None:
        """A member's state changed where this module does not see it (an LLM call of the
        group answered, a member's turn over): the waiting batches look again now."""
        with self._cond:
            self._cond.notify_all()

    def _ready(self, batch: _Batch, waited: float) -> float:
        """Under the lock: 0 if ``batch`` goes out now, ``waited`` seconds after it opened;
        else the seconds after which time alone may make it due (a :meth:`poke` may sooner).

        It waits for a member that may still make a call of this kind: one
        working (up to ``wait_s``) or one whose LLM request is held or in flight
        (up to ``answer_wait_s``); not for one in another batch or done.
        """
        here = {id(c.member) for c in batch.calls}
        now = time.monotonic()
        due = 0.0
        for m in self._members:
            if id(m) in here or m.in_batch:
                continue
            try:
                if m.answering():
                    if not m.given_up and waited < self.answer_wait_s:
                        m.was_answering = True
                        due = max(due, self.answer_wait_s - waited)
                        continue
                    # Waited for once: the next kinds of this flush do not wait for it again.
                    m.given_up = True
                    m.was_answering = False
                    continue
                if m.was_answering:   # answered since a batch waited for it: it flushes next
                    m.was_answering = False
                    m.answered_at = now
                m.given_up = False
                if m.busy():
                    continue
            except Exception:  # noqa: BLE001 - a state we cannot read: do not wait for it
                continue
            # Working: waited for wait_s, counted from its answer if it was waited for.
            due = max(due, self.wait_s - waited, self.wait_s - (now - m.answered_at))
        return due

    def _run(self, batch: _Batch) -> None:
        """Issue the batch's command (outside the lock); hand every caller its outcome."""
        payloads = [c.payload for c in batch.calls]
        try:
            outcomes = batch.run(payloads)
        except BaseException as exc:  # noqa: BLE001 - each member gets its own copy to raise
            outcomes = [_copy_error(exc) for _ in payloads]
        with self._cond:
            if len(payloads) > 1:
                self.batches += 1
                self.calls += len(payloads)
            for c, out in zip(batch.calls, outcomes):
                if isinstance(out, BaseException):
                    c.error = out
                else:
                    c.result = out
                c.member.in_batch -= 1
                c.finished.set()
            self._cond.notify_all()


def _copy_error(exc: BaseException) -> BaseException:
    """A copy of ``exc`` for one member's thread (one exception object raised in several
    threads at once would share, and garble, its traceback)."""
    try:
        err = copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared
        return exc
    err.__cause__ = exc
    return err


class GroupedStore(FencedStore):
    """A group member's fenced store: its flush writes go through its :class:`GroupWrites`.

    Every method keeps the contract of the :class:`FencedStore` method it
    overrides; only the number of commands changes.
    """

    group_writes: GroupWrites
    group_member: _Member
    #: ``{batch_id: known}`` of the runs the group's prologue opened for this member: the
    #: checkpoint as this member alone has written it (see :meth:`checkpoint_progress`).
    opened_runs: dict[str, dict]

    def opened(self, checkpoint: dict) -> None:
        """The prologue inserted ``checkpoint`` (a new run) for this member, under its lease."""
        self.opened_runs[checkpoint["batch_id"]] = {
            "user_id": checkpoint["user_id"], "batch_id": checkpoint["batch_id"],
            "processed_sms": int(checkpoint.get("processed_sms") or 0), "status": checkpoint["status"],
            BASE_FIELD: checkpoint[BASE_FIELD]}

    def _grouped(self, kind: str, payload: Any, run: Callable[[list[Any]], list[Any]]) -> Any:
        return self.group_writes.submit(self.group_member, kind, payload, run)

    def claim(self, items: list[FlushItem]) -> list[FlushItem]:
        """As :meth:`FencedStore.claim`, in one ``update`` command for the waiting members."""
        if not items or not self.epoch:
            return super().claim(items)
        return self._grouped("claim", (self, items), group_commands.claim)

    def _write_transactions(self, user_id: str, docs: list[dict]) -> None:
        """As :meth:`FencedStore._write_transactions`: one gated ``$merge`` and one read."""
        if not self.epoch:
            super()._write_transactions(user_id, docs)
            return
        self._grouped("transactions", (self, user_id, docs), group_commands.transactions)

    def mark_processed(self, user_id: str, raw_ids: list, batch_id: str) -> int:
        """As :meth:`FencedStore.mark_processed` (the number newly marked), grouped."""
        if not raw_ids or not self.epoch:
            return super().mark_processed(user_id, raw_ids, batch_id)
        return self._grouped("mark", (self, user_id, list(raw_ids), batch_id), group_commands.mark)

    def checkpoint_progress(self, user_id: str, batch_id: str, **kw: Any) -> None:
        """As :meth:`FencedStore.checkpoint_progress`, grouped (update, read, counters)."""
        if kw.get("status") not in CHECKPOINT_STATUSES or not self.epoch:
            super().checkpoint_progress(user_id, batch_id, **kw)
            return
        fields = checkpoint_fields(user_id, batch_id, now=group_commands.utcnow(), extra=self.fence_fields,
                                   **kw)
        self._latest_seen.pop(user_id, None)
        self._grouped("checkpoint", (self, user_id, batch_id, fields, kw, self._after(batch_id, kw)),
                      group_commands.checkpoint)

    def _after(self, batch_id: str, kw: dict) -> dict | None:
        """The run's checkpoint as it is once this update lands, when this member knows it.

        A run the prologue opened this turn has had no writer but this member (its
        ``batch_id`` is new, and its writes are fenced by the member's lease), so its
        counters are this member's own ``$max`` and a ``completed`` stays completed;
        the flush needs no read of it back for the users' counters.  Other runs: ``None``.
        """
        known = self.opened_runs.get(batch_id)
        if known is None:
            return None
        known["processed_sms"] = max(known["processed_sms"], int(kw["processed_sms"]))
        if known["status"] != STATUS_COMPLETED:
            known["status"] = kw["status"]
        return dict(known)

    def bulk_upsert(self, name: str, ops: list, *, what: str, write_concern: Any = None) -> dict:
        """As :meth:`Store.bulk_upsert` (the ops that created their document), grouped by collection."""
        if not ops:
            return super().bulk_upsert(name, ops, what=what, write_concern=write_concern)
        return self._grouped(f"bulk {name}", (self, name, ops, what, write_concern), group_commands.bulk)
