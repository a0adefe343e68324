"""The supervisor's status payloads: ``smsctl status`` and the systemd status line.

Read-only views built from what :class:`smsd.supervisor.Supervisor` knows:
the per-user rows (with the live worker's journal counts over the last
discovery's), the whole reply of the ``status`` command (workers, users,
journal backlog, LLM totals, MongoDB health, and for one user its
checkpoint), and the one-line summary sent to systemd.  They are apart from
the supervisor because they decide nothing: the wire format of ``status``
changes here without touching the process lifecycle.  The supervisor is
passed in, typed by :class:`SupervisorView` (this module never imports
:mod:`smsd.supervisor`).
"""
from __future__ import annotations

import json
import time
from typing import Protocol

from . import __version__, ledger
from .children import WorkerProc, rss, running_users
from .config import Settings
from .control_protocol import CommandError
from .figures import Figures
from .health import Health
from .lease_sched import LeaseView
from .scheduler import UserState
from .wireformat import MEMORY_FILE, EndpointMemory


class SupervisorView(Protocol):
    """What the status payloads read of the supervisor."""

    pid: int
    state: str
    started: float
    settings: Settings
    mongo: dict
    workers: dict[int, WorkerProc]
    users: dict[str, UserState]
    figures: Figures
    metrics_url: str | None
    applied_generation: int
    health: Health
    lease: LeaseView

    def run_admin(self, cmd: str, args: dict) -> dict: ...


def status_line(sup: SupervisorView) -> str:
    """One line for systemd (``STATUS=``) and the log."""
    users = status_users(sup)
    pending = sum(u["pending_sms"] for u in users)
    backlog = sum(int((u.info.get("journal") or {}).get("unflushed") or 0) for u in sup.users.values())
    mongo = "ok" if sup.mongo.get("ok") else "degraded: MongoDB unreachable" \
        if sup.mongo.get("ok") is False else "checking"
    down = sup.health.mongo_down_for()
    if down is not None and sup.mongo.get("ok") is False:
        mongo += f" for {down:.0f} s"
    busy = sum(1 for w in sup.workers.values() if w.user_id is not None)
    line = (f"{sup.state}: {busy} workers, {pending} SMS pending, "
            f"journal backlog {backlog}, MongoDB {mongo}")
    if sup.health.llm_misconfigured:
        line += f", llm: misconfigured ({sup.health.llm_error[:160]}); fix it, then smsctl reload"
    return line


def llm_format(settings: Settings) -> str:
    """The response_format in use: the setting, or what ``auto`` found for this endpoint."""
    llm = settings.llm
    if llm.response_format != "auto":
        return llm.response_format
    found = EndpointMemory(settings.state_dir / MEMORY_FILE).get(llm.base_url, llm.model)
    return f"auto ({found.get('response_format') or 'json_schema'})"


def user_status(user: UserState, live: bool, pending: int, unflushed: int, quarantined: int,
                now: float) -> str:
    """A user's status word in ``smsctl status`` (and ``smsd_users{status}``)."""
    if user.paused:
        return "paused"
    if user.failed:
        return "failed"
    if live:
        return "in_progress"
    if pending or unflushed:
        return "waiting" if user.next_start > now else "in_progress"
    if quarantined:
        return "quarantined"
    return "completed"


def status_users(sup: SupervisorView) -> list[dict]:
    """Every user's status row, busiest first: most pending SMS, then most unflushed rows.

    The counts come from what discovery keeps (the per-user counters of
    :mod:`smsd.store_stats`, the pending count, the journal's), so a status
    costs no MongoDB read whatever the number of users: ``total_sms`` is
    processed + quarantined + pending.
    """
    running = running_users(sup.workers.values())
    now = time.monotonic()
    out = []
    for user in sup.users.values():
        info = user.info
        live = running.get(user.user_id)
        journal = live_journal(live, user.user_id) or info.get("journal") or {}
        counters = info.get("counters") or {}
        pending = int(info.get("pending_sms") or 0)
        processed = int(counters.get("processed_sms") or 0)
        quarantined = int(counters.get("quarantined_sms") or 0)
        unflushed = int(journal.get("unflushed") or 0)
        # A worker that just finished counts as working until the next discovery brings its last counts.
        busy = live is not None or user.done_generation >= sup.applied_generation
        status = user_status(user, busy, pending, unflushed, quarantined, now)
        out.append({"user_id": user.user_id,
                    "total_sms": processed + quarantined + pending,
                    "processed_sms": processed,
                    "pending_sms": pending, "quarantined_sms": quarantined,
                    # quarantined by the grounding check (MongoDB) + still being asked again (journal)
                    "ungrounded_sms": int(counters.get("ungrounded_sms") or 0) + int(journal.get("ungrounded") or 0),
                    "unflushed": unflushed, "status": status, "restarts": user.restarts,
                    "last_exit": user.last_exit})
    out.sort(key=lambda u: (-u["pending_sms"], -u["unflushed"], u["user_id"]))
    return out


def status_totals(users: list[dict]) -> dict:
    """Sums over every user's row: users, SMS total/processed/pending/quarantined/ungrounded, unflushed rows."""
    totals = {"users": len(users), "total_sms": 0, "processed_sms": 0, "pending_sms": 0,
              "quarantined_sms": 0, "ungrounded_sms": 0, "unflushed": 0}
    for u in users:
        for key in ("total_sms", "processed_sms", "pending_sms", "quarantined_sms", "ungrounded_sms",
                    "unflushed"):
            totals[key] += u[key]
    return totals


def page_args(args: dict) -> tuple[int | None, int]:
    """``(limit, offset)`` of a ``status`` request: ``limit`` absent or null = every user."""
    limit, offset = args.get("limit"), args.get("offset", 0)
    for name, value in (("limit", limit), ("offset", offset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise CommandError(f"{name} must be a whole number >= 0, not {value!r}")
    return limit, int(offset or 0)


def live_journal(live: WorkerProc | None, user_id: str) -> dict | None:
    """The journal counters of ``user_id`` in its worker's newest heartbeat, if it describes that user.

    A group turn's heartbeats describe its first user only; the others keep their last report.
    """
    if live is None or live.user_id != user_id or not live.status:
        return None
    return live.status.get("journal") or None


def user_journals(sup: SupervisorView) -> dict[str, dict]:
    """Each user's journal counters: the live worker's newest, else the last discovery's."""
    running = running_users(sup.workers.values())
    out = {}
    for user in sup.users.values():
        journal = user.info.get("journal") or {}
        journal = live_journal(running.get(user.user_id), user.user_id) or journal
        out[user.user_id] = journal
    return out


def mongo_health(sup: SupervisorView) -> bool | None:
    """MongoDB as the last discovery saw it, False as soon as a worker finds it down (None: not known yet)."""
    if any(w.status.get("mongo_ok") is False for w in sup.workers.values()):
        return False
    return sup.mongo.get("ok")


def open_batches(sup: SupervisorView, user_id: str | None = None) -> list[dict]:
    """Open Batch API jobs of every user (or one), oldest first: ids, states, counts, age; no text."""
    now = time.time()
    out = []
    for uid, journal in user_journals(sup).items():
        if user_id and uid != user_id:
            continue
        for job in journal.get("batches") or []:
            counts = job.get("request_counts")
            out.append({"user_id": uid, "batch_id": job.get("batch_id"), "job_id": job.get("job_id"),
                        "state": job.get("server_state") or job.get("state"), "sms": job.get("n_sms"),
                        "requests": json.loads(counts) if isinstance(counts, str) else counts,
                        "age_s": round(now - float(job.get("created_at") or now), 1)})
    return sorted(out, key=lambda b: -b["age_s"])


def status_leases(sup: SupervisorView) -> list[dict]:
    """The leases this host holds: ``[{user_id, owner, epoch, expires_at}]``.

    From the last discovery, with each live worker's own (fresher) lease over it.
    """
    rows = {row["user_id"]: {k: row.get(k) for k in ("user_id", "owner", "epoch", "expires_at")}
            for row in sup.lease.held if row.get("owner") == sup.lease.host}
    for w in sup.workers.values():
        lease = w.status.get("lease") or {}
        if lease.get("owner") == sup.lease.host:
            rows[w.user_id] = {k: lease.get(k) for k in ("user_id", "owner", "epoch", "expires_at")}
    return [rows[k] for k in sorted(rows)]


def status_reply(sup: SupervisorView, user_id: str | None = None, *,
                 limit: int | None = None, offset: int = 0) -> dict:
    """The reply of the ``status`` control command.

    ``users`` is one page of :func:`status_users` (busiest first, ``limit``
    rows from ``offset``; all when ``limit`` is ``None``), or with ``user_id``
    that user's row and its checkpoint; ``totals`` always covers every user
    (``processed_sms`` as the metrics count it: the counters, raised by the
    live workers' reports), ``paging`` says where the page is.
    """
    now = time.monotonic()
    workers = [{"user_id": w.user_id, "pid": w.pid, "group": list(w.group),
                "state": w.recycle_reason and f"stopping ({w.recycle_reason})" or
                w.status.get("state", "starting"),
                "uptime_s": round(now - w.started, 1), "rss_bytes": rss(w.pid),
                "restarts": sup.users[w.user_id].restarts if w.user_id in sup.users else 0,
                "last_heartbeat_s": round(now - w.last_seen, 1)}
               for w in sup.workers.values() if w.user_id is not None]   # idle workers: no entry
    llm: dict = {"calls": 0, "repeated_calls": 0, "prompt_tokens": 0, "completion_tokens": 0}
    unflushed = 0
    journals = user_journals(sup)
    for journal in journals.values():
        unflushed += int(journal.get("unflushed") or 0)
        for key in ("calls", "repeated_calls", "prompt_tokens", "completion_tokens"):
            llm[key] += int(journal.get(key) or 0)
    # The bill: cost_usd, repeated_usd, saved_usd (money as Decimal strings), cache_hits.
    bill, user_bills = ledger.totals(journals)
    llm.update(bill)
    mongo_ok = mongo_health(sup)
    llm.update(sup.health.llm_view(), response_format=llm_format(sup.settings))
    down = sup.health.mongo_down_for()
    users = status_users(sup)
    totals = status_totals(users)
    totals["processed_sms"] = max(totals["processed_sms"], sup.figures.user_total("processed"))
    for u in users:
        u.update(user_bills.get(u["user_id"]) or {})
    if user_id:
        page = [u for u in users if u["user_id"] == user_id]
        offset, limit = 0, None
    else:
        page = users[offset:] if limit is None else users[offset:offset + limit]
    more = offset + len(page) < len(users) and not user_id
    ungrounded = sum(u["ungrounded_sms"] for u in page) if user_id else totals["ungrounded_sms"]
    batches = open_batches(sup, user_id)
    reply = {"pid": sup.pid, "version": __version__, "state": sup.state,
             "uptime_s": round(now - sup.started, 1), "rss_bytes": rss(sup.pid),
             "mongo": {"ok": mongo_ok, "error": None if mongo_ok else sup.mongo.get("error"),
                       "down_for_s": round(down, 1) if down is not None and not mongo_ok else None},
             "workers": workers if not user_id else [w for w in workers if w["user_id"] == user_id],
             "users": page, "journal": {"unflushed": unflushed}, "llm": llm,
             "ungrounded_sms": ungrounded, "batches": batches, "totals": totals,
             "paging": {"offset": offset, "limit": limit, "returned": len(page),
                        "next_offset": offset + len(page) if more else None},
             "metrics_url": sup.metrics_url,
             "max_workers": sup.settings.supervisor.max_workers,
             "idle_workers": sum(1 for w in sup.workers.values() if w.user_id is None),
             "host": sup.lease.host, "leases": status_leases(sup)}
    if user_id:
        try:
            reply["checkpoint"] = sup.run_admin("checkpoint", {"user_id": user_id}).get("checkpoint")
        except (TimeoutError, RuntimeError) as exc:
            reply["checkpoint"] = None
            reply["checkpoint_error"] = str(exc)
    return reply
