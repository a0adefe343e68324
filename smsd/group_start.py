"""A group turn's prologue and epilogue: what every member needs at its start, in one go.

Why: a member of a trickle group turn (:mod:`smsd.worker_group`) is a user
with a few SMS; its own turn start cost about ten MongoDB commands before its
first LLM call (lease take, latest checkpoint, pending count, the counters'
base, the gated checkpoint insert and its count, the first page, the handover
and answer-cache lookups) and one at its end (the release).  The MongoDB
server's CPU per command is what bounds smsd, so the group thread does them
once for all members, before their threads start:

1. open the members' journals (a busy one: ``EXIT_LOCKED``, as a single turn);
2. take all their leases (:func:`smsd.lease_group.take_many`: a few commands for all);
   a lease another host holds: that member hands its unflushed answers over
   and reports ``EXIT_LEASED``;
3. start one keeper renewing every lease of the group in one command per period
   (:class:`smsd.lease_group.GroupKeeper`; each member's ``may_pay`` keeps its meaning);
4. one read each (:mod:`smsd.group_reads`): the members' latest checkpoints,
   their pending SMS, the handover documents and answer-cache entries of those
   SMS, the processed counts of first runs;
5. the new runs' checkpoints in one lease-gated command.

Each member's pipeline then starts from a :class:`Prestart` -- its run's
checkpoint, its first page, those entries -- and behaves as if it had read them
itself: the page goes through the store's own page rules
(:meth:`smsd.store.Store.page_of`: excluded keys, malformed SMS, the limit) with
the exclusions the pipeline computes at its first claim; a user the one read
could not answer for (its pending set cut off by the read's limit, more keys
excluded than foreseen) reads for itself, as does every member when a read
fails or its lease is of a new epoch (the stamp comes first).  The epilogue
releases the leases of the members that completed, in one command.

Crash windows (SIGKILL anywhere here): journals hold only what the member
threads committed, and their ``flock`` dies with the process.  A kill after the
bulk take (failpoint ``group_leases_taken``) leaves the leases held by this host
until they expire; the next turn of this host takes its own back at once (the
take's filter matches its own holder), another host waits for the expiry.  A
kill after the checkpoint insert leaves runs ``in_progress`` that the next turn
resumes, as a kill after a single turn's ``checkpoint_start``.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from . import answer_cache, batch, group_reads, journal_runs, store_stats
from .answer_cache import CacheGate
from .config import Settings
from .exit_codes import EXIT_DONE, EXIT_LEASED, EXIT_LOCKED
from .failpoints import failpoint
from .fencing import EPOCH_FIELD, FencedStore
from .handover import Handover
from .journal import Journal, JournalLocked
from .lease import Lease
from .lease_group import GroupKeeper, take_many
from .lease_worker import MONGO_ERRORS, WorkerLease
from .model import SmsResult
from .store import new_run_doc
from .store_docs import STATUS_IN_PROGRESS
from .store_stats import BASE_FIELD

log = logging.getLogger("smsd.worker")

#: Threads opening a group's journals at once (the disk's fsyncs overlap).
JOURNAL_OPENERS = 8
#: Threads of the prologue's reads that do not wait for each other (:func:`_read`).
PRESTART_READERS = 3


@dataclass
class RunStart:
    """A member's run as the prologue found it: its latest checkpoint, and the new run's
    checkpoint when the prologue wrote one (``None``: the pipeline opens it itself)."""

    latest: dict | None
    checkpoint: dict | None = None


class Prestart:
    """What one member's pipeline starts from instead of reading it (each part used once)."""

    def __init__(self, user_id: str, store: Any, run: RunStart, docs: list[dict], complete: bool,
                 cache: dict[str, SmsResult | None], cache_tag: tuple[str, str] | None) -> None:
        self.user_id = user_id
        self.store = store
        self.run: RunStart | None = run
        self._docs: list[dict] | None = docs
        self.complete = complete      # docs are all the user's pending documents
        self.cache = cache            # the answer-cache lookup of those SMS (sms key -> hit or None)
        self.cache_tag = cache_tag    # (prompt version, model) of the keys it was looked up by
        self.fell_back = False        # the first claim read for itself

    def prime(self, gate: CacheGate | None) -> None:
        """Give the pipeline's cache gate the lookup read for its SMS (as its page prefetch would),
        if the gate keys texts as the prologue did."""
        if gate is not None and self.cache_tag == (gate.version, gate.model):
            gate.known.update(self.cache)

    def take_run(self) -> RunStart | None:
        """The run's start, once."""
        run, self.run = self.run, None
        return run

    def page(self, excluded: set[str], limit: int) -> tuple[list, list] | None:
        """The first claim's page, as :meth:`smsd.store.Store.fetch_pending` would read it now;
        ``None`` when the pre-read cannot stand for it (then and afterwards the pipeline reads)."""
        docs, self._docs = self._docs, None
        if docs is None:
            return None
        if not self.complete and len(docs) < limit + len(excluded):
            self.fell_back = True
            log.info("user %s: reads its own first page (the group's read was cut off before it)",
                     self.user_id)
            return None
        return self.store.page_of(docs, limit, excluded)


class PreHandover(Handover):
    """A member's handover box whose first lookup was read by the prologue."""

    def __init__(self, db: Any, user_id: str, keys: set[str], found: dict[str, SmsResult]) -> None:
        super().__init__(db, user_id)
        self.keys = keys
        self.found = found

    def adopt(self, keys: list[str]) -> dict[str, SmsResult]:
        if self.keys and set(keys) <= self.keys:
            self.keys = set()    # one use: a later page may hold what was handed over since
            return {k: self.found[k] for k in keys if k in self.found}
        return super().adopt(keys)


class MemberLease(WorkerLease):
    """A member's lease, taken by the prologue and renewed by the group's keeper."""

    def __init__(self, settings: Settings, store: Any, user_id: str, lease: Lease,
                 group: "GroupStart", handover: PreHandover | None) -> None:
        super().__init__(settings, store, user_id)
        self.lease = lease
        self.group = group
        self.pre_handover = handover

    def acquire(self, stop: threading.Event, beat: Callable[[str], None]) -> bool:
        return True   # taken by the prologue

    def keep(self, on_lost: Callable[[str], None]) -> None:
        assert self.group.keeper is not None
        self.keeper = self.group.keeper.member(self.user_id, on_lost)   # type: ignore[assignment]

    def handover(self) -> Handover:
        if self.pre_handover is not None:
            self.pre_handover.db = self.store._database()
            return self.pre_handover
        return super().handover()

    def release(self) -> None:
        """Given back by the epilogue, with the other members' (one command)."""
        if self.lease is not None and not self.lost:
            self.group.to_release.append(self.user_id)


@dataclass
class Member:
    """A member that starts: its journal, its lease, what its pipeline starts from."""

    journal: Journal
    lease: MemberLease
    pre: Prestart | None = None

    def lease_for(self, store: FencedStore) -> MemberLease:
        """The lease, working through the member's own store (its epoch's fence)."""
        self.lease.store = store
        return self.lease


@dataclass
class GroupStart:
    """The prologue's outcome: the members that start, and the turns already over."""

    settings: Settings
    members: dict[str, Member] = field(default_factory=dict)
    over: list[tuple[str, int, dict]] = field(default_factory=list)   # (user, code, info)
    keeper: GroupKeeper | None = None
    to_release: list[str] = field(default_factory=list)

    def epilogue(self) -> None:
        """Release the leases of the members that completed (one command); stop renewing."""
        if self.keeper is None:
            return
        try:
            n = self.keeper.release(self.to_release)
            if n:
                log.info("group turn: %d leases released", n)
        except MONGO_ERRORS as exc:
            log.warning("group turn: leases not released (%s); they expire in %.0f s",
                        type(exc).__name__, self.settings.lease.ttl)
        finally:
            self.keeper.stop()


def prologue(settings: Settings, users: list[str], store: FencedStore, extractor: Any,
             stop: threading.Event, beat: Callable[[str], None]) -> GroupStart:
    """Open the journals, take the leases, read what the members start from (module docstring)."""
    g = GroupStart(settings)
    journals: dict[str, Journal] = {}
    ahead: dict[str, tuple[int, datetime | None]] = {}   # by open_one: (keys excluded, latest run noted)

    def open_one(user_id: str) -> Journal:
        journal = Journal.open(settings.state_dir, user_id, wait=2.0, synchronous=settings.journal.synchronous,
                               background_sync=settings.journal.background_sync)
        # The keys the member's first read excludes, read here on the opener's connection,
        # which then goes to the member's thread: no other thread connects for the prologue.
        try:
            ahead[user_id] = (len(set(journal.unflushed_keys()) | batch.open_keys(journal)),
                              journal_runs.latest_run_at(journal))
        except BaseException:
            journal.close()
            raise
        journal.release_connection()
        return journal
    # In threads: a new journal is a file, its schema and its fsyncs (tens of ms on a busy
    # disk), and SQLite lets go of the GIL meanwhile; one after the other they were most of
    # a group's start.  A connection is used by one thread at a time (journal_conn): the
    # opener's goes to the member's thread once the opener has let go of it.
    with ThreadPoolExecutor(max_workers=JOURNAL_OPENERS, thread_name_prefix="smsd-journal-open") as pool:
        opened = [(u, pool.submit(open_one, u)) for u in users]
    for user_id, fut in opened:
        try:
            journals[user_id] = fut.result()
        except JournalLocked as exc:
            log.warning("user %s: journal busy (%s); the supervisor will try again", user_id, exc)
            g.over.append((user_id, EXIT_LOCKED, {}))
    if not journals:
        return g
    probe = WorkerLease(settings, store, next(iter(journals)))
    held: dict[str, Lease] | None = None
    warned = False
    while not stop.is_set():
        beat("lease")
        taken_at = time.monotonic()   # the leases run from no earlier than this
        try:
            held, expires = take_many(probe.leases, list(journals))
            break
        except MONGO_ERRORS as exc:
            if not warned:
                log.warning("group turn: cannot take the leases, MongoDB unavailable (%s); waiting",
                            type(exc).__name__)
                warned = True
            probe._leases = None
            stop.wait(0.5)
    if held is None:   # stopped first: as a single turn, nothing to report but the journal
        for user_id, journal in journals.items():
            g.over.append((user_id, EXIT_DONE, {"journal": journal.stats()}))
            journal.close()
        return g
    failpoint("group_leases_taken")
    for user_id in [u for u in journals if u not in held]:
        journal = journals.pop(user_id)
        WorkerLease(settings, store, user_id).hand_over(journal)
        log.info("user %s: lease held by another host", user_id)
        g.over.append((user_id, EXIT_LEASED, {"journal": journal.stats()}))
        journal.close()
    if not held:
        return g
    s = settings.lease
    g.keeper = GroupKeeper(probe.leases, held, expires, ttl=s.ttl, fraction=s.renew_fraction,
                           taken_at=taken_at, errors=MONGO_ERRORS)
    g.keeper.start()
    # A new epoch stamps before anything else (WorkerLease.prepare): those members read for themselves.
    ready = [u for u in journals if held[u].stamped]
    try:
        pre = _read(settings, store, extractor, {u: ahead[u] for u in ready}, held) if ready else {}
    except MONGO_ERRORS as exc:
        log.warning("group turn: prologue reads failed (%s); each member reads for itself",
                    type(exc).__name__)
        pre = {}
    for user_id, journal in journals.items():
        got = pre.get(user_id)
        lease = MemberLease(settings, store, user_id, held[user_id], g, got[1] if got else None)
        g.members[user_id] = Member(journal, lease, got[0] if got else None)
    return g


def _read(settings: Settings, store: FencedStore, extractor: Any, ahead: dict[str, tuple[int, datetime | None]],
          held: dict[str, Lease]) -> dict[str, tuple[Prestart, PreHandover]]:
    """The members' start, read in one command per kind (see :mod:`smsd.group_reads`).

    Reads that do not depend on each other go out at once, each in its own thread (and
    pymongo connection): the latest checkpoints with the pending pages; then the new
    runs' checkpoints (counts, then the gated insert) with the handover and answer-cache
    lookups.  Under load each command waits its turn on the server, and one after the
    other they were most of a group's start.
    """
    users = list(ahead)
    page_size = settings.pipeline.page_size
    # What each member's own first read asks for: its page plus the keys its claim excludes
    # (read from its journal by the opener: ``ahead``), and the newest run its journal noted.
    limits = {u: page_size + n for u, (n, _) in ahead.items()}
    since = {u: noted for u, (_, noted) in ahead.items()}
    gate = CacheGate.for_pipeline(settings, extractor, store, None)
    with ThreadPoolExecutor(max_workers=PRESTART_READERS, thread_name_prefix="smsd-prestart") as pool:
        latest_f = pool.submit(group_reads.latest_checkpoints, store, users, since)
        docs, complete = group_reads.pending_pages(store, limits)
        sms = {u: store.page_of(docs[u], max(1, len(docs[u])))[0] for u in users}   # well-formed ones
        found_f = pool.submit(group_reads.handovers, store, {u: [m.key for m in sms[u]] for u in users})
        wanted = {u: {m.key: gate.key(m) for m in sms[u]} for u in users} if gate is not None else {}
        entries_f = pool.submit(group_reads.cache_entries, store,
                                {k for w in wanted.values() for k in w.values()}) if gate is not None else None
        latest = latest_f.result()
        starts = _open_runs(store, users, latest, docs, complete, held)
        found = found_f.result()
        entries = entries_f.result() if entries_f is not None else {}
    hits: dict[str, dict[str, SmsResult | None]] = {u: {} for u in users}
    for u in wanted:
        got = answer_cache.results(wanted[u], entries)
        hits[u] = {key: got.get(key) for key in wanted[u]}
    tag = (gate.version, gate.model) if gate is not None else None
    db = store._database()
    return {u: (Prestart(u, store, starts[u], docs[u], u in complete, hits[u], tag),
                PreHandover(db, u, {m.key for m in sms[u]}, found[u]))
            for u in users}


def _open_runs(store: FencedStore, users: list[str], latest: dict[str, dict | None],
               docs: dict[str, list[dict]], complete: set[str], held: dict[str, Lease]) -> dict[str, RunStart]:
    """Each member's run start; the new runs of users whose pending count is known are
    opened here, in one lease-gated insert (their counters' base read first)."""
    new_runs = [u for u in users if not (latest[u] and latest[u].get("status") == STATUS_IN_PROGRESS)]
    first = [u for u in new_runs if latest[u] is None or latest[u].get(BASE_FIELD) is None]
    first = [u for u in first if u in complete]
    counts = group_reads.processed_counts(store, first) if first else {}
    starts: dict[str, RunStart] = {u: RunStart(latest[u]) for u in users}
    opened = [new_run_doc(u, len(docs[u]), counts[u] if u in first else
                          store_stats.base_for_new_run(store.raw, u, latest[u]),
                          {EPOCH_FIELD: held[u].epoch}) for u in new_runs if u in complete]
    if opened:
        written = group_reads.insert_checkpoints(store, opened)
        for doc in opened:
            if doc["user_id"] in written:
                starts[doc["user_id"]].checkpoint = doc
    return starts
