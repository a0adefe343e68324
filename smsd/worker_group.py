"""A worker's group turn: several small users at once, their LLM calls filled together.

The supervisor hands a worker ``{"user_ids": [U1..Uk]}`` when several waiting
users each have a few pending SMS (trickle batching, see :mod:`smsd.combiner`
for why).  Each user runs the ordinary one-user turn of :mod:`smsd.worker` in a
thread of its own -- its journal ``flock``, its lease and epoch, its fenced
writes (a copy of the worker's store that shares the MongoDB client but carries
its own epoch), its pipeline and flush -- so a group turn changes nothing a
single turn guarantees.  What every member does at its start (journal open,
lease take, the first reads, the new run's checkpoint) and its lease's renewal
and release are done once for the group (:mod:`smsd.group_start`): per member
they were most of a small user's MongoDB commands.  Only the LLM client is shared, behind a
:class:`~smsd.combiner.CallCombiner`, and every user's turn end is reported on
its own ``turn_over`` line the moment that user is done.

A crash (exception or SIGKILL) in a group turn ends the worker process like a
single turn's crash; the supervisor applies its back-off to each user of the
group (:meth:`smsd.supervisor.Supervisor.worker_exited`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, Callable

from .combiner import CallCombiner
from .config import Settings
from .group_start import prologue
from .group_writes import GroupedStore, GroupWrites
from .logsetup import bind_context

log = logging.getLogger("smsd.worker")


def run_group(settings: Settings, users: list[str], store: Any, extractor: Any, reporter: Any,
              stop: threading.Event, abort: threading.Event, turn: Callable[..., tuple[int, dict]]) -> None:
    """Run one turn per user of ``users`` in threads sharing one combiner; report each turn's end.

    ``turn`` is :func:`smsd.worker._turn` (passed in: this module is imported by it).
    The prologue (:func:`smsd.group_start.prologue`) opens the journals, takes the
    leases and reads the members' start for all of them; the epilogue releases the
    leases of those that completed.  An exception in any user's thread is re-raised
    here, which ends the worker (counted as a crash of every user whose turn it had
    not reported).
    """
    combiner = CallCombiner(extractor, max_sms=settings.llm.batch_size,
                            wait_s=settings.pipeline.trickle_wait_ms / 1000.0)
    # The members' flush writes of one kind, made at the same moment, go out as one command;
    # a member whose call is in flight is waited for as long as a gathered flush waits.
    writes = GroupWrites(settings.pipeline.group_write_wait_ms / 1000.0,
                         settings.pipeline.flush_max_wait_ms / 1000.0, notify=combiner.poke)
    combiner.on_change = writes.poke
    errors: list[BaseException] = []
    bind_context(user_id=None)   # several users: each log line names its user in the message
    began = time.monotonic()
    start = prologue(settings, users, store, extractor, stop, reporter.beat)
    prologue_s = time.monotonic() - began
    for user_id, code, info in start.over:   # journal busy, lease held elsewhere, stopped
        reporter.for_member(user_id).send({"turn_over": user_id, "code": code, "pid": os.getpid(), **info})

    # Every member joins the combiner before any thread starts: a member that asked while
    # the others were still being started saw itself alone and made a call of its own.
    joined = {u: combiner.member(u) for u in start.members}

    def one(user_id: str) -> None:
        member = joined[user_id]
        own = reporter.for_member(user_id)
        twin = writes.join(store.sibling(), user_id, member.elsewhere, member.answering)
        member.writing = writes.writing(twin)
        pre = start.members[user_id].pre
        if isinstance(twin, GroupedStore) and pre is not None and pre.run is not None and pre.run.checkpoint:
            twin.opened(pre.run.checkpoint)   # its flushes need no read of it back
        try:
            code, info = turn(settings, user_id, twin, member, own, stop, abort, start.members[user_id])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the worker's thread
            log.exception("user %s: group turn failed", user_id)
            errors.append(exc)
            return
        finally:
            member.leave()
            twin.close()
        own.send({"turn_over": user_id, "code": code, "pid": os.getpid(), **info})

    threads = [threading.Thread(target=one, args=(u,), name=f"smsd-group-{i}", daemon=True)
               for i, u in enumerate(start.members)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    members_s = time.monotonic() - began - prologue_s
    start.epilogue()
    log.info("group turn of %d users: %d LLM calls for %d requests; %.2f s start, %.2f s members, "
             "%.2f s end", len(users), combiner.calls, combiner.requests, prologue_s, members_s,
             time.monotonic() - began - prologue_s - members_s)
    if errors:
        raise errors[0]
