"""``smsd bench``: how fast smsd is, measured against real servers on this host.

The bench starts its own MongoDB-wire server (:class:`smsd.embedded.EmbeddedMongo`
in a temporary directory) and the local OpenAI-compatible server
(``python -m smsd.lab.llmserver`` as a subprocess, so its CPU is not charged to
the process being measured), seeds synthetic bank SMS whose answers the LLM
server knows, and measures:

``overhead``
    smsd's SMS/s end to end (a :class:`~smsd.pipeline.Pipeline` for one user,
    built like ``smsd once`` does, zero-latency LLM) divided by the SMS/s of a
    minimal loop doing only the unavoidable MongoDB work on the same server:
    read a batch of pending SMS, upsert its transactions, mark the batch
    processed (same write concern, same batch size).  A/B/A/B, medians.
``ratelimit``
    ``smsd run`` with 4 workers and 4 users against a 200 ms LLM, limited to
    R requests/s host-wide: calls/s achieved over the steady window ÷ R, and
    the 429s of an LLM server whose own limit is slightly above R.
``journal``
    commit time of one 10-SMS answer (``Journal.record_answer``), median and
    p99, ``synchronous=FULL`` and ``NORMAL`` interleaved.
``recovery``
    a journal holding 10,000 answered-but-unflushed SMS (as if a worker was
    SIGKILLed after its commits) plus more pending SMS: ``smsd once`` is
    started and timed to all replayed rows flushed and to its first new LLM call.
``scaling``
    SMS/s of ``smsd run`` with 1, 2, 4 and 8 workers (one user each) against a
    100 ms LLM, start-up subtracted; a PNG line chart.
``memory``
    RSS of the supervisor and of its workers during ``smsd run`` (read from
    the control socket's ``status``, which the supervisor fills with psutil).
``bare``
    issue 12: ``smsd run`` with the shipped defaults ÷ the bare loop (4
    processes: read a page of pending SMS, upsert its transactions with
    ``j: true``, mark the page) for 300 users × 4 SMS and 4 users × 1000 SMS,
    smsd / bare / smsd / bare on one server.
``commit``
    issue 12: last byte of each LLM answer (LLM server) → its journal commit,
    joined by request id; MongoDB normal, every command delayed 200 ms, and down
    (through :mod:`smsd.lab.mongoproxy`).
``steady``
    issue 12: SMS keep arriving for 500 users; insert → stored latency, worker
    starts per minute, backlog.
``mongoops``
    issue 12: MongoDB commands per SMS of ``smsd run`` and of the bare loop,
    counted by the proxy (the server's side).
``discovery``
    at 10,000 users: the supervisor's discovery tick (steady, first, and as
    it was before issue 12) and a ``status`` call to a real ``smsd run``.
``hosts``
    1, 2 and 3 ``smsd run`` hosts against one MongoDB-wire server (SMS/s, the
    hosts' CPU per SMS), take-over time after a host is SIGKILLed or
    SIGSTOPped, and the SMS re-bought per freeze (:mod:`.hosts`).
``fence``
    one flush's transaction write: unfenced, with the epoch filter, and gated
    on the lease (``$merge`` from the lease document), interleaved (:mod:`.fence`).

Every figure is a median of ``--runs`` runs (3 by default), taken in the same
process run so that ratios compare like with like on a shared, noisy host.
``docs/BENCHMARKS.md`` and ``docs/scaling.png`` are written by a full run
(``make bench``); ``--quick`` / ``--only`` runs print their figures and write
files only when ``--out`` / ``--chart`` are given.  Nothing here is a test of
speed: the test suite only checks that the bench runs.

Every process the bench starts (MongoDB-wire server, LLM server, smsd
supervisors with their workers) is stopped before it returns, also on errors
and on SIGINT/SIGTERM.
"""
from __future__ import annotations

from .cli import main

__all__ = ["main"]
