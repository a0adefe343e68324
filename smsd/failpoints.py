"""Failpoints: make the process SIGKILL itself at a named point.

``SMSD_FAILPOINT=after_commit`` kills the process the first time it reaches
``failpoint("after_commit")``.  ``SMSD_FAILPOINT=after_commit@3`` kills it the
third time.  ``SMSD_FAILPOINT=before_claim:hang`` makes the process hang there
(no heartbeat) instead of dying, to test hang detection;
``SMSD_FAILPOINT=worker_forked:pause=2`` makes it sleep 2 s there and go on, to
hold a race window open (a signal arriving inside it); ``after_claim:stop``
makes it SIGSTOP itself there (a host frozen at that point; SIGCONT resumes it
where it stopped, to test fencing).  Several points may
be given, separated by commas.  Crash tests
and drills use this to hit each window of DESIGN.md's table
deterministically; with the variable unset a failpoint costs one dict lookup.

The points smsd defines are listed in :data:`POINTS`.
"""
from __future__ import annotations

import os
import signal
import time

POINTS = {
    "before_claim": "before reading the next batch of pending SMS",
    "before_llm_call": "after the call is journaled as sent, before the HTTP request",
    "after_llm_answer": "after the LLM answered, before the journal commit",
    "after_commit": "after the journal commit, before any Mongo write",
    "group_leases_taken": "a group turn's prologue: the members' leases taken, their threads not started",
    "group_between_commits": "a group turn's combined call answered: the first user committed, the others not",
    "after_claim": "multi-host: after the flush's claim, before its transaction writes",
    "mid_flush": "after the transactions are upserted, before isprocessed is set",
    "group_mid_write": "a group turn: a write combined for several users is acknowledged, before they get their results",
    "after_flush": "after the Mongo writes, before the journal row is marked flushed",
    "after_mark_flushed": "after the journal row is marked flushed",
    "batch_before_upload": "batch mode: the job and its calls are journaled, before the file upload",
    "batch_after_upload": "batch mode: the file is uploaded, before its id is journaled",
    "batch_after_create": "batch mode: the batch is created, before its id is journaled",
    "batch_polling": "batch mode: before a poll of an open batch",
    "batch_mid_download": "batch mode: some output lines are journaled, not all",
    "batch_after_download": "batch mode: every output line is journaled, before the job is marked done",
    "worker_forked": "in a new worker, before it installs its signal handlers",
    "supervisor_no_watchdog": "the supervisor stops pinging the systemd watchdog (not a kill)",
}

_counts: dict[str, int] = {}


def _armed() -> dict[str, tuple[int, str]]:
    spec = os.environ.get("SMSD_FAILPOINT", "")
    armed: dict[str, tuple[int, str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        part, _, action = part.partition(":")
        name, _, nth = part.partition("@")
        armed[name] = (int(nth) if nth.isdigit() else 1, action or "kill")
    return armed


def enabled(name: str) -> bool:
    """True when ``name`` is named in ``SMSD_FAILPOINT`` (for non-fatal points)."""
    return name in _armed()


def failpoint(name: str) -> None:
    """SIGKILL this process here if ``SMSD_FAILPOINT`` names ``name`` (on its n-th visit)."""
    if "SMSD_FAILPOINT" not in os.environ:
        return
    armed = _armed()
    if name not in armed:
        return
    nth, action = armed[name]
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] < nth:
        return
    if action == "hang":
        while True:
            time.sleep(3600)
    if action.startswith("pause="):
        time.sleep(float(action.partition("=")[2]))
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)   # frozen here until someone sends SIGCONT
        return
    os.kill(os.getpid(), signal.SIGKILL)
