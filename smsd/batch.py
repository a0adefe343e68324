"""Batch mode: a user's backlog through OpenAI's Batch API, journal first.

A backfill of millions of SMS needs no answer within the minute; the Batch
API answers within 24 h at half the price.  A *job* here is one batch on the
server: up to ``llm.batch_max_sms`` pending SMS cut into calls of
``llm.batch_size`` (the same request as an online call: same system prompt,
schema and wire format; ``custom_id`` = the journal's call id).

Journal first at every step, so that a crash anywhere resumes the same batch
and never creates a second one for the same SMS:

1. the calls (``begin_call``: the SMS are now "sent") and the job with the
   SHA-256 of its input file are committed — *prepared*;
2. the file is uploaded; its id is committed — *uploaded*;
3. the batch is created with ``metadata={"smsd_job": job_id}``; its id is
   committed — *created*.  A crash between the create and that commit is
   resolved on restart by finding the batch through its metadata
   (``batches.list``), never by creating another;
4. polled with back-off until it ends; the output and error files are read
   and every answered line is committed (``record_answer``, validated exactly
   like an online answer) before the job is marked *done*.  The flush is the
   pipeline's, as for any journaled answer.

While a job is open its SMS are not asked online (:func:`open_keys`, which the
pipeline's claim excludes).  A batch that expires, fails or is cancelled
keeps its answered lines; its other calls are marked failed (not counted as
the SMS's attempts: not their fault) and the SMS go back to the queue.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

import openai

from .config import Settings
from .failpoints import failpoint
from .journal import Journal
from .ledger import cost_usd, price_for
from .llm import LlmClient, validate_answer
from .model import Quarantine, Sms, Usage, raw_id_from_bytes
from .store import Store, StoreUnavailable

log = logging.getLogger("smsd.batch")

METADATA_KEY = "smsd_job"
OPEN_STATES = ("prepared", "uploaded", "created")
#: Steps in a row that may fail (server or MongoDB unreachable) before ``run`` gives up.
MAX_FAILED_STEPS = 5
#: The server's batch states that end a batch.
FINAL_BATCH_STATES = ("completed", "failed", "expired", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS batch_jobs (
    job_id       TEXT PRIMARY KEY,
    state        TEXT NOT NULL CHECK (state IN ('prepared', 'uploaded', 'created', 'done',
                                                'failed', 'expired', 'cancelled')),
    model        TEXT NOT NULL,
    input_sha256 TEXT NOT NULL,
    n_calls      INTEGER NOT NULL,
    n_sms        INTEGER NOT NULL,
    file_id      TEXT,
    batch_id     TEXT,
    server_state TEXT,
    request_counts TEXT,
    answered     INTEGER NOT NULL DEFAULT 0,
    failed       INTEGER NOT NULL DEFAULT 0,
    created_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    next_poll_at REAL NOT NULL DEFAULT 0,
    polls        INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS batch_calls (
    call_id TEXT PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES batch_jobs (job_id)
) STRICT;
CREATE INDEX IF NOT EXISTS batch_calls_job ON batch_calls (job_id);
"""


def _ensure_tables(journal: Journal) -> None:
    # Companion tables in the user's journal file, created on first use: a journal
    # that never ran a batch is unchanged, and its schema version stays the same.
    with journal.transaction() as db:
        for statement in filter(str.strip, SCHEMA.split(";")):
            db.execute(statement)


def open_keys(journal: Journal) -> set[str]:
    """The SMS of the user's open batch jobs: the online claim must not ask them."""
    if not _has_tables(journal):
        return set()
    rows = journal.query(
        "SELECT cs.sms_key FROM call_sms cs JOIN batch_calls bc ON bc.call_id = cs.call_id"
        " JOIN batch_jobs j ON j.job_id = bc.job_id"
        f" WHERE j.state IN ({','.join('?' * len(OPEN_STATES))})", OPEN_STATES)
    return {r[0] for r in rows}


def jobs(journal: Journal, *, open_only: bool = False) -> list[dict]:
    """The user's batch jobs, newest first (for status output: ids, states, counts; no text)."""
    if not _has_tables(journal):
        return []
    where = f" WHERE state IN ({','.join('?' * len(OPEN_STATES))})" if open_only else ""
    cols = ("job_id", "state", "model", "n_calls", "n_sms", "file_id", "batch_id", "server_state",
            "answered", "failed", "created_at", "updated_at", "polls")
    rows = journal.query(f"SELECT {', '.join(cols)} FROM batch_jobs{where} ORDER BY created_at DESC",
                         OPEN_STATES if open_only else ())
    return [dict(zip(cols, r)) for r in rows]


def _has_tables(journal: Journal) -> bool:
    return bool(journal.query("SELECT 1 FROM sqlite_master WHERE name = 'batch_jobs'"))


@dataclass
class StepReport:
    """What one :meth:`BatchRunner.step` did."""

    created: int = 0          # jobs created (0 or 1)
    finished: int = 0         # jobs that ended this step
    open: int = 0             # jobs still open after the step
    answered_sms: int = 0
    requeued_sms: int = 0
    error: str | None = None  # why the step stopped early (server or MongoDB unreachable)


class BatchRunner:
    """Runs one user's batch jobs: create, resume, poll, collect.  One step at a time.

    The daemon calls :meth:`step` once per worker turn (it never waits for a
    batch); ``smsd once --mode batch`` calls :meth:`run` which polls until
    the user's jobs have ended.
    """

    def __init__(self, *, settings: Settings, journal: Journal, store: Store, client: LlmClient,
                 user_id: str, owner: str = "", epoch: int = 0,
                 stop: threading.Event | None = None) -> None:
        self.settings = settings
        self.journal = journal
        self.store = store
        self.client = client
        self.user_id = user_id
        self.owner = owner
        self.epoch = epoch
        self.stop = stop or threading.Event()
        self.api = client.sdk
        _ensure_tables(journal)

    # ------------------------------------------------------------------ driving
    def step(self, *, create: bool = True) -> StepReport:
        """Advance every open job by one move; then create a job if asked and none is open.

        The server or MongoDB being unreachable ends the step early: every
        state is journaled, so the next step resumes where this one stopped.
        """
        report = StepReport()
        try:
            for job in jobs(self.journal, open_only=True):
                self._advance(job, report)
            # SMS a batch just gave back wait for the next step: no hot loop on a failing endpoint.
            if create and not report.requeued_sms and not jobs(self.journal, open_only=True) \
                    and not self.stop.is_set():
                report.created = int(self._create_job())
        except (openai.APIError, StoreUnavailable) as exc:
            report.error = type(exc).__name__
            log.warning("user %s: batch step stopped (%s); it resumes on the next step",
                        self.user_id, report.error)
        report.open = len(jobs(self.journal, open_only=True))
        return report

    def run(self, *, create: bool = True, poll_max: float | None = None) -> StepReport:
        """Send the backlog job after job (if ``create``) and poll until none is open.

        SMS that a batch did not answer (expired, failed lines) are not sent
        again in the same run: the next run or worker turn takes them, so an
        endpoint that keeps failing cannot hold this loop.
        """
        total = StepReport()
        delay = 0.2
        poll_max = poll_max or self.settings.llm.batch_poll_interval
        failures = 0
        while not self.stop.is_set():
            r = self.step(create=create)
            failures = failures + 1 if r.error else 0
            if failures >= MAX_FAILED_STEPS:
                total.error = r.error   # everything is journaled: the next run resumes here
                break
            for name in ("created", "finished", "answered_sms", "requeued_sms"):
                setattr(total, name, getattr(total, name) + getattr(r, name))
            total.open = r.open
            create = create and not r.requeued_sms
            if not r.open and not r.created:
                break
            if r.open and not r.created:
                self.stop.wait(delay)
                delay = min(poll_max, delay * 2)
        return total

    # ------------------------------------------------------------------ create
    def _create_job(self) -> bool:
        exclude = set(self.journal.unflushed_keys()) | open_keys(self.journal)
        page, malformed = self.store.fetch_pending(self.user_id, limit=self.settings.llm.batch_max_sms,
                                                   exclude_keys=exclude)
        if malformed:
            self.journal.add_quarantine([Quarantine(raw_id=m.raw_id, key=m.key, user_id=m.user_id,
                                                    reason=f"malformed: {m.reason}") for m in malformed])
        answered = self.journal.answered_keys(s.key for s in page)
        sms = [s for s in page if s.key not in answered]
        if not sms:
            return False
        size = self.settings.llm.batch_size
        job_id = uuid.uuid4().hex
        lines: list[bytes] = []
        call_ids: list[str] = []
        for i in range(0, len(sms), size):
            chunk = sms[i:i + size]
            call_id = self.journal.begin_call([(m.key, m.raw_id) for m in chunk], owner=self.owner,
                                              epoch=self.epoch, model=self.client.model)
            call_ids.append(call_id)
            lines.append(json.dumps({"custom_id": call_id, "method": "POST", "url": "/v1/chat/completions",
                                     "body": self.client.request_body(chunk)},
                                    ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
        data = b"\n".join(lines) + b"\n"
        now = time.time()
        with self.journal.transaction() as db:
            db.execute("INSERT INTO batch_jobs (job_id, state, model, input_sha256, n_calls, n_sms,"
                       " created_at, updated_at) VALUES (?, 'prepared', ?, ?, ?, ?, ?, ?)",
                       [job_id, self.client.model, hashlib.sha256(data).hexdigest(), len(call_ids),
                        len(sms), now, now])
            db.conn.executemany("INSERT INTO batch_calls (call_id, job_id) VALUES (?, ?)",
                                [(c, job_id) for c in call_ids])
        log.info("user %s: batch job %s prepared: %d SMS in %d calls", self.user_id, job_id,
                 len(sms), len(call_ids))
        self._upload(job_id, data)
        return True

    def _input(self, job_id: str) -> bytes:
        """Rebuild a prepared job's input file from its journaled calls (the texts from MongoDB)."""
        call_ids = [r[0] for r in self.journal.query(
            "SELECT bc.call_id FROM batch_calls bc JOIN calls c ON c.call_id = bc.call_id"
            " WHERE bc.job_id = ? ORDER BY c.seq", [job_id])]
        lines = [json.dumps({"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
                             "body": self.client.request_body(self._call_sms(c))},
                            ensure_ascii=False, separators=(",", ":")).encode("utf-8") for c in call_ids]
        return b"\n".join(lines) + b"\n"

    def _upload(self, job_id: str, data: bytes) -> None:
        failpoint("batch_before_upload")
        f = self.api.files.create(file=(f"smsd-{job_id}.jsonl", data, "application/jsonl"), purpose="batch")
        failpoint("batch_after_upload")
        self._set(job_id, state="uploaded", file_id=f.id)
        self._create_batch(job_id, f.id)

    def _create_batch(self, job_id: str, file_id: str) -> None:
        found = self._find(job_id)
        if found is None:
            found = self.api.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                            completion_window="24h", metadata={METADATA_KEY: job_id})
            failpoint("batch_after_create")
        self._set(job_id, state="created", batch_id=found.id, server_state=found.status)
        log.info("user %s: batch job %s is batch %s", self.user_id, job_id, found.id)

    def _find(self, job_id: str) -> Any:
        """The server's batch for ``job_id``, found by its metadata, or None."""
        for b in self.api.batches.list(limit=100):
            if (b.metadata or {}).get(METADATA_KEY) == job_id:
                return b
        return None

    # ------------------------------------------------------------------ resume and poll
    def _advance(self, job: dict, report: StepReport) -> None:
        job_id = job["job_id"]
        if job["state"] == "prepared":
            # The upload may or may not have happened: a second upload is only a
            # second file (not billed); a batch can only exist if a file id was
            # committed, but look it up anyway before creating one.
            found = self._find(job_id)
            if found is not None:
                self._set(job_id, state="created", file_id=found.input_file_id, batch_id=found.id,
                          server_state=found.status)
            else:
                self._upload(job_id, self._input(job_id))
            return
        if job["state"] == "uploaded":
            self._create_batch(job_id, job["file_id"])
            return
        if time.time() < self._next_poll(job_id):
            return
        failpoint("batch_polling")
        batch = self.api.batches.retrieve(job["batch_id"])
        if batch.status not in FINAL_BATCH_STATES:
            polls = job["polls"] + 1
            wait = min(self.settings.llm.batch_poll_interval, 0.5 * 2 ** min(polls, 10))
            self._set(job_id, server_state=batch.status, polls=polls, next_poll_at=time.time() + wait,
                      request_counts=_counts(batch))
            return
        self._collect(job, batch, report)

    def _collect(self, job: dict, batch: Any, report: StepReport) -> None:
        """Journal every line of the output and error files, then end the job."""
        job_id = job["job_id"]
        pending = {c for (c,) in self.journal.query(
            "SELECT bc.call_id FROM batch_calls bc JOIN calls c ON c.call_id = bc.call_id"
            " WHERE bc.job_id = ? AND c.state = 'sent'", [job_id])}
        answered = failed = 0
        for file_id, is_error in ((batch.output_file_id, False), (batch.error_file_id, True)):
            if not file_id:
                continue
            content = self.api.files.content(file_id).read()
            for n, raw in enumerate(content.splitlines()):
                if n == 1:
                    failpoint("batch_mid_download")
                line = _json_or_none(raw)
                call_id = line.get("custom_id") if isinstance(line, dict) else None
                if call_id not in pending:
                    if raw.strip():
                        log.warning("user %s: batch %s: a line for an unknown call (ignored)",
                                    self.user_id, batch.id)
                    continue
                pending.discard(call_id)
                response = line.get("response") or {}
                if is_error or line.get("error") or response.get("status_code") != 200:
                    err = (line.get("error") or {}).get("code") or f"HTTP {response.get('status_code')}"
                    self.journal.record_failure(call_id, f"batch line failed: {err}", [])
                    failed += 1
                    continue
                report.answered_sms += self._record(call_id, response)
                answered += 1
        failpoint("batch_after_download")
        # Calls the batch never answered (expired, cancelled, failed) go back to the queue.
        for call_id in sorted(pending):
            self.journal.record_failure(call_id, f"batch {batch.status}: not answered", [])
            report.requeued_sms += len(self._call_items(call_id))
            failed += 1
        state = "done" if batch.status == "completed" else batch.status
        self._set(job_id, state=state, server_state=batch.status, answered=answered, failed=failed,
                  request_counts=_counts(batch))
        report.finished += 1
        log.info("user %s: batch job %s %s: %d calls answered, %d failed", self.user_id, job_id,
                 batch.status, answered, failed)

    def _record(self, call_id: str, response: dict) -> int:
        """Validate one answered line like an online answer and commit it; returns SMS answered."""
        sms = self._call_items(call_id)
        keys = [key for key, _ in sms]
        body = response.get("body") or {}
        choices = body.get("choices") or []
        content = ((choices[0] or {}).get("message") or {}).get("content") if choices else None
        results, failed, unknown = validate_answer(content, keys) if isinstance(content, str) else \
            ({}, {k: "answer has no content" for k in keys}, [])
        if unknown:
            log.warning("user %s: batch answer %s named %d unknown ids (ignored)",
                        self.user_id, call_id, len(unknown))
        u = body.get("usage") or {}
        usage = Usage(prompt_tokens=int(u.get("prompt_tokens") or 0),
                      completion_tokens=int(u.get("completion_tokens") or 0),
                      cached_tokens=int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
        items = [(raw_id, results[key]) for key, raw_id in sms if key in results]
        answered_by = body.get("model") or self.client.model
        price = price_for(answered_by, self.settings.llm.price_table)
        # The Batch API bills the same tokens at the model's batch discount.
        cost = cost_usd(usage, price) * price.batch_discount if price else None
        self.journal.record_answer(call_id, items, failed=failed, request_id=response.get("request_id"),
                                   usage=usage, model=answered_by, cost_usd=cost)
        return len(items)

    # ------------------------------------------------------------------ journal helpers
    def _call_items(self, call_id: str) -> list[tuple[str, Any]]:
        """``[(sms_key, raw_id)]`` of a journaled call, in the order it was asked."""
        rows = self.journal.query("SELECT sms_key, raw_id FROM call_sms WHERE call_id = ?"
                                  " ORDER BY sms_key", [call_id])
        return [(key, raw_id_from_bytes(raw)) for key, raw in rows]

    def _call_sms(self, call_id: str) -> list[Sms]:
        """The SMS of a journaled call, rebuilt for the request (text read back from MongoDB:
        the journal keeps no SMS text)."""
        items = self._call_items(call_id)
        found = {s.key: s for s in self.store.fetch_by_ids(self.user_id, [r for _, r in items])}
        return [found[key] for key, _ in items if key in found]

    def _next_poll(self, job_id: str) -> float:
        rows = self.journal.query("SELECT next_poll_at FROM batch_jobs WHERE job_id = ?", [job_id])
        return rows[0][0] if rows else 0.0

    def _set(self, job_id: str, **values: Any) -> None:
        values["updated_at"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in values)
        with self.journal.transaction() as db:
            db.execute(f"UPDATE batch_jobs SET {cols} WHERE job_id = ?", [*values.values(), job_id])


def run_phase(pipeline: Any, *, wait: bool) -> StepReport | None:
    """The batch part of a user's turn, before the online pipeline runs.

    ``llm.mode`` decides: ``online`` does nothing; ``batch`` sends the user's
    backlog to the Batch API; ``auto`` does so only for a backlog of at least
    ``llm.batch_threshold`` SMS (fresh SMS stay online).  ``wait`` polls until
    the jobs end (``smsd once``); otherwise one step (a daemon worker's turn).
    Returns None when batch mode does not apply (online, or the offline rules).
    """
    settings: Settings = pipeline.settings
    mode = settings.llm.mode
    if mode == "online" or not isinstance(pipeline.extractor, LlmClient):
        return None
    runner = BatchRunner(settings=settings, journal=pipeline.journal, store=pipeline.store,
                         client=pipeline.extractor, user_id=pipeline.user_id, owner=pipeline.owner,
                         epoch=pipeline.epoch, stop=pipeline.stop)
    try:
        create = mode == "batch" or pipeline.store.count_pending(pipeline.user_id) >= settings.llm.batch_threshold
    except StoreUnavailable:
        create = False
    return runner.run(create=create) if wait else runner.step(create=create)


def cancel(client: LlmClient, batch_id: str) -> str:
    """Ask the server to cancel a batch; the owning worker collects what it answered."""
    try:
        return client.sdk.batches.cancel(batch_id).status
    except openai.NotFoundError:
        raise ValueError(f"no batch {batch_id} on the server") from None


def _counts(batch: Any) -> str | None:
    counts = getattr(batch, "request_counts", None)
    if counts is None:
        return None
    return json.dumps({k: getattr(counts, k, None) for k in ("total", "completed", "failed")})


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None
