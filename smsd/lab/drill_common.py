"""The drill's settings, seed data and records, shared by its run loop, kills, monitor and report.

The constants (database name, kinds of kills, LLM faults, the daemon's batch
size and concurrency), the labelled seed SMS with their expected answers, and
the records of a run (:class:`KillEvent`, :class:`Options`,
:class:`DrillError`) are apart from :mod:`smsd.lab.drill` so that
:mod:`smsd.lab.drill_kills`, :mod:`smsd.lab.drill_monitor` and
:mod:`smsd.lab.drill_report` can use them without importing the run loop back.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

KINDS = ("worker", "supervisor", "database", "supervisor-db-down")
#: Kills after which every worker of the killed supervisor must be gone.
SUPERVISOR_KINDS = ("supervisor", "supervisor-db-down")
#: How long after a supervisor kill its children may still live.
ORPHAN_GRACE_S = 5.0
DB_NAME = "smsd_drill"
STATE_FILE = "drill-state.json"
FIXTURES = Path(__file__).resolve().parent / "data" / "sms_fixtures.jsonl"

#: Faults of the LLM server when faults are on (small probabilities).
FAULTS = {"p_429": 0.02, "p_500": 0.02, "p_partial": 0.02, "p_malformed": 0.02}
LATENCY = {"latency_ms": 20.0, "latency_jitter_ms": 60.0}

#: Settings of the daemon under drill (besides paths and URLs).
BATCH_SIZE = 5
CONCURRENCY = 2


# ----------------------------------------------------------------------------- data

def load_fixtures(path: Path | None = None) -> list[dict]:
    """The labelled fixture SMS shipped with smsd (``{"text", "sender", "expected", ...}``)."""
    with open(path or FIXTURES, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def make_raw_id(kind: str, user_index: int, i: int) -> Any:
    """A raw ``_id`` of the given BSON kind: ``objectid``, ``int`` or ``str``."""
    from bson import ObjectId
    if kind == "objectid":
        return ObjectId()
    if kind == "int":
        return 1_000_000 * (user_index + 1) + i
    return f"drill-{user_index:02d}-sms-{i:06d}"


def build_seed(users: int, per_user: int, rng: random.Random
               ) -> tuple[list[dict], dict[Any, dict], dict[str, dict], list[str]]:
    """The SMS documents to insert, raw ``_id`` → expected answer, text → answer, user ids.

    Users cycle through ObjectId, int and string ``_id``\\ s.  Each text is a
    fixture text plus ``" Ref#<n>"`` (unique across the drill).
    """
    lines = load_fixtures()
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    docs: list[dict] = []
    expected: dict[Any, dict] = {}
    table: dict[str, dict] = {}
    user_ids = [f"drill-user-{u:02d}" for u in range(users)]
    kinds = ("objectid", "int", "str")
    n = 0
    for u, user_id in enumerate(user_ids):
        offset = rng.randrange(len(lines))
        for i in range(per_user):
            line = lines[(offset + i) % len(lines)]
            text = f"{line['text']} Ref#{n:07d}"
            n += 1
            raw_id = make_raw_id(kinds[u % len(kinds)], u, i)
            doc = {"_id": raw_id, "user_id": user_id, "body": text,
                   "received_at": base + timedelta(minutes=i), "isprocessed": False}
            if line.get("sender"):
                doc["sender"] = line["sender"]
            docs.append(doc)
            expected[raw_id] = line["expected"]
            table[text] = line["expected"]
    return docs, expected, table, user_ids


# ----------------------------------------------------------------------------- records

@dataclass
class KillEvent:
    """One kill the drill made, and what followed it."""

    n: int
    kind: str
    at_s: float                      # seconds since the daemon was first started
    wall: float                      # time.time() of the kill (journal clock)
    user_id: str | None = None       # worker kill: whose worker
    pid: int | None = None           # the process killed (worker or supervisor)
    workers: list[int] = field(default_factory=list)   # supervisor kill: its workers then
    db_down_s: float | None = None   # database kinds: how long it was down
    resumed_at_s: float | None = None   # new supervisor started / database back / worker killed
    recovery_s: float | None = None     # resumed → the processed count rises again
    recovery_note: str = ""
    new_supervisor_pid: int | None = None


@dataclass
class Options:
    """The drill's parameters (see ``smsd drill --help``)."""

    users: int = 4
    sms: int = 50
    kills: int = 8
    faults: bool = True
    duration: float = 0.0
    seed: int = 0
    kinds: tuple[str, ...] = KINDS
    max_workers: int = 4
    grace: float = 0.0
    pace: str = "auto"
    keep: bool = False
    dir: str | None = None
    quiet: bool = False
    log_format: str = "text"        # supervisor.log_format of the daemon under drill
    api_key: str | None = None      # required by the LLM server, given to smsd as OPENAI_API_KEY


class DrillError(RuntimeError):
    """The drill could not run (setup failed); not a verdict on smsd."""
