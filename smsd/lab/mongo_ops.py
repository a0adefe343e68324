"""MongoDB commands per SMS: what a user's turn costs on the wire.

Observation, not mocking: :class:`CommandCounter` is a pymongo
``CommandListener`` registered globally (``pymongo.monitoring.register``), so
it sees every command of every client created afterwards -- the pipeline's own
:class:`smsd.store.Store` included -- without touching smsd's code.
:func:`count_turns` runs users' turns the way a worker does (journal open,
pipeline run, journal close) against a real MongoDB-wire server and a real LLM
server, and returns the commands by name.  ``keep_client`` reuses one Store
(one MongoClient) for every turn, as a long-lived worker does.

:func:`count_group_turns` runs the same users as trickle group turns of
:data:`GROUP` users (prologue, member turns, epilogue: :mod:`smsd.group_start`),
:func:`count_group_prologue` one group's prologue alone.

``python -m smsd.lab.mongo_ops --users 50 --sms 3`` starts a SecantusDB
process and the local LLM server, runs the turns, and prints the figures.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from pymongo import MongoClient, monitoring

#: What is counted: the pipeline with a client per turn, with a kept client, a
#: pre-forked worker's whole turn (lease and fencing included), and the same users
#: in trickle group turns of :data:`GROUP` users (:mod:`smsd.worker_group`).
MODES = ("client_per_turn", "keep_client", "worker_turn", "group_turn")
#: Users per group turn in mode ``group_turn`` (the shipped trickle_group_max_users).
GROUP = 12

#: Commands that are the driver's own housekeeping, not smsd's work.
HOUSEKEEPING = {"endSessions"}


class CommandCounter(monitoring.CommandListener):
    """Counts started commands while :attr:`active` is set (thread-safe): by name in
    :attr:`counts`, by name and collection (``"update smsd_llm_costs"``) in :attr:`by_collection`."""

    def __init__(self) -> None:
        self.counts: collections.Counter = collections.Counter()
        self.by_collection: collections.Counter = collections.Counter()
        #: Microseconds from start to reply, by name and collection: on a server that runs one
        #: command at a time (one serial client) that is the server's time for it, plus the wire.
        self.micros: collections.Counter = collections.Counter()
        self._open: dict[int, str] = {}
        self.active = threading.Event()
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every count."""
        with self._lock:
            self.counts.clear()
            self.by_collection.clear()
            self.micros.clear()
            self._open.clear()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if self.active.is_set():
            # A collection command names its collection as the command's value; hello has 1.
            target = event.command.get(event.command_name)
            where = f"{event.command_name} {target}" if isinstance(target, str) else event.command_name
            with self._lock:
                self.counts[event.command_name] += 1
                self.by_collection[where] += 1
                self._open[event.request_id] = where

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._ended(event.request_id, event.duration_micros)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._ended(event.request_id, event.duration_micros)

    def _ended(self, request_id: int, micros: int) -> None:
        with self._lock:
            where = self._open.pop(request_id, None)
            if where is not None:
                self.micros[where] += micros


_COUNTER: CommandCounter | None = None


def counter() -> CommandCounter:
    """The process's one registered counter (registered on first use)."""
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = CommandCounter()
        monitoring.register(_COUNTER)
    return _COUNTER


def seed_users(uri: str, db_name: str, users: int, sms_each: int) -> None:
    """``users`` users with ``sms_each`` pending bank SMS each."""
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs = [{"user_id": f"user-{u:05d}", "isprocessed": False, "sender": "VM-DEMOBK",
             "received_at": t0 + timedelta(minutes=i),
             "body": f"INR {u % 900 + 1}.{i:02d} debited from A/c XX1234 on 05-09-26 "
                     f"UPI/P2M/{u:06d}{i:06d}/SHOP {u} - Demo Bank"}
            for u in range(users) for i in range(sms_each)]
    client = MongoClient(uri)
    try:
        client[db_name]["sms_fin_rawdata"].insert_many(docs)
    finally:
        client.close()


def count_turns(settings: Any, users: list[str], *, keep_client: bool,
                by_collection: bool = False) -> dict[str, int]:
    """Run one turn per user (replay, claim, LLM, flush, finish); commands by name
    (``by_collection``: by name and collection, ``"find smsd_answer_cache"``)."""
    from ..journal import Journal
    from ..store import Store
    from ..worker import make_pipeline, make_store

    c = counter()
    c.clear()
    shared: Store | None = None
    c.active.set()
    try:
        for user_id in users:
            store = shared or make_store(settings)
            if keep_client:
                shared = store
            with Journal.open(settings.state_dir, user_id) as journal:
                pipeline = make_pipeline(settings, user_id, journal, store,
                                         stop=threading.Event(), abort=threading.Event())
                summary = pipeline.run(resume=True, max_sms=settings.pipeline.worker_max_sms)
            if summary.status != "completed":
                raise RuntimeError(f"user {user_id}: turn ended {summary.status}")
            if not keep_client:
                store.close()
    finally:
        c.active.clear()
        if shared is not None:
            shared.close()
    counts = c.by_collection if by_collection else c.counts
    return {k: v for k, v in sorted(counts.items()) if k.split()[0] not in HOUSEKEEPING}


def count_worker_turns(settings: Any, users: list[str], *, by_collection: bool = False) -> dict[str, int]:
    """One whole turn per user as a pre-forked worker runs it (:func:`smsd.worker._turn`):
    lease take and release, the fenced store, journal, pipeline; commands by name."""
    from .. import worker

    w = _Worker(settings)
    c = counter()
    c.clear()
    c.active.set()
    try:
        for user_id in users:
            code, _ = worker._turn(settings, user_id, w.store, w.extractor, w.reporter,
                                   threading.Event(), threading.Event())
            if code != worker.EXIT_DONE:
                raise RuntimeError(f"user {user_id}: worker turn ended with code {code}")
    finally:
        c.active.clear()
        w.close()
    return _counted(c, by_collection)


class _Worker:
    """A pre-forked worker's parts without a supervisor: fenced store, LLM client, status pipe."""

    def __init__(self, settings: Any) -> None:
        import os

        from .. import worker
        self.store = worker.make_store(settings, fenced=True)
        self.extractor = worker.make_extractor(settings)
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.write_fd, False)
        self.reporter = worker._Reporter(self.write_fd, os.getppid())
        self.reporter.check_parent = lambda: None     # type: ignore[method-assign] - no supervisor here
        threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(self.read_fd, 65536), b"")],
                         daemon=True).start()

    def close(self) -> None:
        import os
        self.store.close()
        os.close(self.write_fd)


def _counted(c: CommandCounter, by_collection: bool) -> dict[str, int]:
    counts = c.by_collection if by_collection else c.counts
    return {k: v for k, v in sorted(counts.items()) if k.split()[0] not in HOUSEKEEPING}


def count_group_turns(settings: Any, users: list[str], *, group: int = GROUP,
                      by_collection: bool = False) -> dict[str, int]:
    """The users' turns as trickle group turns of ``group`` users each
    (:func:`smsd.worker_group.run_group`: prologue, member turns, epilogue); commands by name."""
    from .. import worker
    from ..worker_group import run_group

    w = _Worker(settings)
    c = counter()
    c.clear()
    c.active.set()
    try:
        for start in range(0, len(users), group):
            run_group(settings, users[start:start + group], w.store, w.extractor, w.reporter,
                      threading.Event(), threading.Event(), worker._turn)
    finally:
        c.active.clear()
        w.close()
    return _counted(c, by_collection)


def count_group_prologue(settings: Any, users: list[str], *, by_collection: bool = False) -> dict[str, int]:
    """The commands of one group turn's prologue for ``users`` (:func:`smsd.group_start.prologue`),
    then its epilogue uncounted (the journals closed, the leases released)."""
    from ..group_start import prologue

    w = _Worker(settings)
    c = counter()
    c.clear()
    c.active.set()
    try:
        g = prologue(settings, users, w.store, w.extractor, threading.Event(), lambda state: None)
    finally:
        c.active.clear()
    try:
        g.to_release.extend(g.members)
        g.epilogue()
        for m in g.members.values():
            m.journal.close()
    finally:
        w.close()
    return _counted(c, by_collection)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m smsd.lab.mongo_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--sms", type=int, default=3, help="pending SMS per user")
    p.add_argument("--batch-size", type=int, default=None,
                   help="SMS per LLM call (default: the shipped llm.batch_size)")
    p.add_argument("--by-collection", action="store_true",
                   help="count commands by name and collection (\"update smsd_llm_costs\")")
    p.add_argument("--group", type=int, default=GROUP,
                   help=f"users per group turn in mode group_turn (default {GROUP})")
    p.add_argument("--by-time", action="store_true",
                   help="also print the milliseconds per user turn each command by collection took "
                        "(start to reply: the server's time for it, as one client runs serially)")
    p.add_argument("--mode", action="append", choices=MODES,
                   help="count only this mode (repeatable; default: every mode)")
    p.add_argument("--group-write-wait-ms", type=int, default=None,
                   help="pipeline.group_write_wait_ms of group_turn (0: each flush write alone)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    from ..config import Settings
    if args.batch_size is None:
        args.batch_size = Settings().llm.batch_size
    from ..embedded import EmbeddedMongo
    from .llmserver import LlmServer
    from .llm_extractors import make_extractor

    with tempfile.TemporaryDirectory(prefix="smsd-mongo-ops-") as tmp, \
            EmbeddedMongo(Path(tmp) / "mongo", log_path=Path(tmp) / "mongo.log") as mongo, \
            LlmServer(make_extractor("rules")) as llm:
        out: dict[str, Any] = {"users": args.users, "sms_per_user": args.sms}
        for mode in args.mode or MODES:
            keep = mode != "client_per_turn"
            db_name = f"ops_{mode}"
            settings = Settings()
            settings.mongo.uri, settings.mongo.db = mongo.uri, db_name
            settings.llm.base_url, settings.llm.model = llm.url, "smsd-local"
            settings.llm.api_key = "unused"
            settings.llm.batch_size = args.batch_size
            settings.journal.state_dir = str(Path(tmp) / f"state-{db_name}")
            if args.group_write_wait_ms is not None:
                settings.pipeline.group_write_wait_ms = args.group_write_wait_ms
            seed_users(mongo.uri, db_name, args.users, args.sms)
            store = make_store_for_indexes(settings)
            users = [f"user-{u:05d}" for u in range(args.users)]
            started, cpu = time.perf_counter(), _cpu_s(mongo.pid)
            if mode == "worker_turn":
                counts = count_worker_turns(settings, users, by_collection=args.by_collection)
            elif mode == "group_turn":
                settings.pipeline.trickle_group_max_users = max(settings.pipeline.trickle_group_max_users,
                                                                args.group)
                counts = count_group_turns(settings, users, group=args.group, by_collection=args.by_collection)
            else:
                counts = count_turns(settings, users, keep_client=keep, by_collection=args.by_collection)
            elapsed, cpu = time.perf_counter() - started, _cpu_s(mongo.pid) - cpu
            total = sum(counts.values())
            out[mode] = {
                "commands": counts, "total": total,
                "per_user": round(total / args.users, 2),
                "per_sms": round(total / (args.users * args.sms), 2),
                "ms_per_turn": round(1000 * elapsed / args.users, 1),
                "server_cpu_ms_per_turn": round(1000 * cpu / args.users, 1),
                "ms_per_turn_by_command": {
                    k: round(v / 1000 / args.users, 2)
                    for k, v in sorted(counter().micros.items(), key=lambda kv: -kv[1])
                    if k.split()[0] not in HOUSEKEEPING}}
            store.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{args.users} users x {args.sms} SMS, batch {args.batch_size}")
        for mode in args.mode or MODES:
            r = out[mode]
            print(f"  {mode}: {r['per_sms']} commands/SMS, {r['per_user']} per user turn "
                  f"({r['ms_per_turn']} ms per turn, one process, serial; MongoDB server CPU "
                  f"{r['server_cpu_ms_per_turn']} ms per turn): "
                  + ", ".join(f"{k} {v / args.users:.2f}" for k, v in r["commands"].items()))
            if args.by_time:
                print("    ms per user turn by command: "
                      + ", ".join(f"{k} {v}" for k, v in r["ms_per_turn_by_command"].items()))
    return 0


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) the process ``pid`` has used so far (0 when unknown)."""
    import psutil
    try:
        t = psutil.Process(pid).cpu_times() if pid else None
    except psutil.Error:
        return 0.0
    return t.user + t.system if t else 0.0


def make_store_for_indexes(settings: Any) -> Any:
    """A store with smsd's indexes ensured (as ``smsd run`` does before any worker)."""
    from ..worker import make_store
    store = make_store(settings)
    store.ensure_indexes()
    return store


if __name__ == "__main__":
    sys.exit(main())
