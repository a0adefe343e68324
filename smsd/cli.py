"""The ``smsd`` command line.

``smsd run`` starts the supervisor; ``smsd once --user-id U`` is the seed
guide's one-shot job for one user.  Exit codes are named constants below.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .config import ConfigError, Settings, load_settings
from .logsetup import setup_logging

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INCOMPLETE = 4      # stopped (signal, MongoDB down at the end) with work left; rerun with --resume
EXIT_UNAVAILABLE = 69    # EX_UNAVAILABLE: MongoDB or the LLM did not answer within --wait
EXIT_CANTCREAT = 73      # EX_CANTCREAT: the state directory cannot be written
EXIT_LOCKED = 75         # EX_TEMPFAIL: another process holds this user's journal, or another host its lease
EXIT_CONFIG = 78         # EX_CONFIG: bad config file or value, or an LLM that refuses the setup

log = logging.getLogger("smsd.cli")


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(args.config)


# ------------------------------------------------------------------ once
def cmd_once(args: argparse.Namespace) -> int:
    """One user, one shot: replay the journal, then process pending SMS."""
    from .batch import run_phase
    from .embedded import EmbeddedError, EmbeddedMongo, EmbeddedUnavailable
    from .journal import Journal, JournalLocked
    from .pipeline import StaleEpoch
    from .waiting import Patience
    from .worker import make_pipeline, make_store

    settings = _settings(args)
    setup_logging(settings.supervisor.log_level, log_format=settings.supervisor.log_format)
    if args.limit is not None and args.limit <= 0:
        print("smsd once: --limit must be a positive number", file=sys.stderr)
        return EXIT_USAGE
    try:
        journal = Journal.open(settings.state_dir, args.user_id, wait=args.lock_wait,
                               synchronous=settings.journal.synchronous,
                               background_sync=settings.journal.background_sync)
    except JournalLocked as exc:
        print(f"smsd once: another smsd process is working on user {args.user_id} ({exc})",
              file=sys.stderr)
        return EXIT_LOCKED
    except OSError as exc:
        print(f"smsd once: cannot write the journal in the state directory {settings.state_dir} "
              f"({exc.strerror or exc}).\n  check: journal.state_dir / $SMSD_STATE_DIR, that the directory "
              "is writable by this user and its file system is not read-only", file=sys.stderr)
        return EXIT_CANTCREAT
    embedded = None
    uri = settings.mongo.uri
    if uri == "embedded":
        embedded = EmbeddedMongo(_embedded_path(settings), port=settings.mongo.embedded_port)
        try:
            uri = embedded.start()
        except (EmbeddedUnavailable, EmbeddedError) as exc:   # e.g. the embedded extra is missing
            journal.close()
            print(f"smsd once: cannot start the embedded MongoDB: {exc}", file=sys.stderr)
            return EXIT_ERROR
    store = make_store(settings, uri, fenced=True)   # fenced with the user's lease, like a worker
    stop, abort = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        # First signal drains (finish in-flight calls, flush); the second aborts waits.
        (abort if stop.is_set() else stop).set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        store.ensure_indexes()
    except Exception as exc:  # StoreUnavailable: the pipeline waits for MongoDB itself
        log.warning("could not ensure indexes now: %s", type(exc).__name__)
    if args.resume:
        _print_resume_point(store, args.user_id)
    tty = sys.stderr.isatty() and not args.quiet
    progress = _Progress(sys.stderr) if tty else None
    patience = Patience(settings, uri, args.wait, stop, abort, stream=sys.stderr if tty else None,
                        then=progress.update if progress else None)
    if args.mode:
        settings.llm.mode = args.mode
    lease, code = _take_lease(settings, store, args.user_id, journal, stop, patience)
    if lease is None:
        if progress:
            progress.done()
        journal.close()
        store.close()
        if embedded:
            embedded.stop()
        return code
    pipeline = make_pipeline(settings, args.user_id, journal, store, stop=stop, abort=abort,
                             on_tick=patience, owner=lease.host, epoch=lease.lease.epoch,
                             handover=lease.handover())
    pipeline.may_pay = lease.may_pay
    stale: StaleEpoch | None = None
    try:
        batched = run_phase(pipeline, wait=True)
        if batched is not None:
            print(f"user {args.user_id}: batch mode: {batched.created} "
                  f"batch{'es' if batched.created != 1 else ''} created, "
                  f"{batched.answered_sms} SMS answered by the Batch API, {batched.requeued_sms} requeued"
                  + (f", {batched.open} batch still open (rerun to resume it)" if batched.open else "")
                  + (f"; the Batch API stopped answering ({batched.error})" if batched.error else ""))
        # Batch mode asks nothing online: the pipeline only flushes what the batch answered.
        online_budget = 0 if settings.llm.mode == "batch" else None
        summary = pipeline.run(limit=args.limit, resume=args.resume, max_sms=online_budget)
    except StaleEpoch as exc:
        stale = exc
    finally:
        lease.stop()
        if stale is not None or lease.lost:
            lease.hand_over(journal)   # the new owner uses these answers instead of paying again
        else:
            lease.release()
        if progress:
            progress.done()
        journal.close()
        store.close()
        if embedded:
            embedded.stop()
    if stale is not None or lease.lost:
        print(f"smsd once: user {args.user_id} moved to another host during this run "
              f"({stale or 'lease lost: ' + str(lease.lost)}).\n  Nothing is lost: the answers this run "
              "could not store were handed over to the new owner.", file=sys.stderr)
        return EXIT_LOCKED
    if summary.batch_id:   # a run began (a MongoDB that never answered leaves nothing to sum up)
        print(f"user {summary.user_id}: {summary.status}, {summary.processed_sms}/{summary.total_sms} processed "
              f"(batch {summary.batch_id}), {summary.newly_processed} now, {summary.quarantined} quarantined, "
              f"{summary.llm_calls} LLM calls ({summary.failed_calls} failed), "
              f"{_usd_summary(summary)}, "
              f"{summary.elapsed_s:.1f} s"
              + (f", {summary.pending_left} pending" if summary.pending_left else ""))
    if summary.config_error is not None:
        err = summary.config_error
        print(f"smsd once: {err}\n  check: {err.hint}\n  Nothing is lost: answers already journaled are "
              "kept; fix the setting and rerun with --resume.", file=sys.stderr)
        return EXIT_CONFIG
    if patience.gave_up is not None:
        print(f"smsd once: {patience.gave_up.message}\n  check: {patience.gave_up.hint}\n  Nothing is lost: "
              "answers already journaled are kept; rerun with --resume (or a longer --wait).", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if summary.status == "completed":
        return EXIT_OK
    return EXIT_INCOMPLETE if summary.stopped or summary.pending_left is None else EXIT_OK


def _take_lease(settings: Settings, store, user_id: str, journal, stop: threading.Event, patience):
    """Take the user's lease before any paid call: ``(WorkerLease, None)`` or ``(None, exit code)``.

    Waits for MongoDB as long as ``--wait`` allows (``patience``).  Another host
    holding the user is refused with EXIT_LOCKED; this run's journaled answers
    are handed over to it.  The epoch is stamped and renewed as a worker does.
    """
    from .lease_worker import MONGO_ERRORS, WorkerLease
    lease = WorkerLease(settings, store, user_id)

    def waiting(_state: str) -> None:
        if lease.down_since is not None:
            patience.mongo_down(lease.down_since, lease.down_error)

    if not lease.acquire(stop, waiting):
        if patience.gave_up is not None:
            print(f"smsd once: {patience.gave_up.message}\n  check: {patience.gave_up.hint}\n  Nothing is "
                  "lost: answers already journaled are kept; rerun with --resume (or a longer --wait).",
                  file=sys.stderr)
            return None, EXIT_UNAVAILABLE
        if stop.is_set():
            return None, EXIT_INCOMPLETE
        try:
            holder = lease.holder()
        except MONGO_ERRORS:
            holder = None
        handed = lease.hand_over(journal)
        who = (f"host {holder.owner} (epoch {holder.epoch}, lease until {holder.expires_at:%Y-%m-%d %H:%M:%S} "
               "UTC)") if holder and holder.expires_at else "another host"
        print(f"smsd once: user {user_id} is leased by {who}; nothing was asked."
              + (f" {handed} journaled answers handed over to it." if handed else "")
              + "\n  check: `smsctl status` on that host; `smsctl release --user-id "
              f"{user_id}` there gives the user back, or wait for its lease to expire.", file=sys.stderr)
        return None, EXIT_LOCKED
    try:
        lease.prepare()
    except MONGO_ERRORS as exc:
        lease.release()
        print(f"smsd once: MongoDB stopped answering while the lease of user {user_id} was taken "
              f"({type(exc).__name__}); nothing was asked. Rerun with --resume.", file=sys.stderr)
        return None, EXIT_UNAVAILABLE
    lease.keep(on_lost=lambda why: stop.set())   # drain; MongoDB refuses what is stale
    return lease, None


def _usd_summary(summary) -> str:
    """The run's bill for the summary line: cost, repeated and saved USD, cache hits."""
    from .ledger import usd_text
    text = (f"USD {usd_text(summary.cost_usd)} (repeated {usd_text(summary.repeated_usd)}, "
            f"saved {usd_text(summary.saved_usd)}, {summary.cache_hits} cache hits)")
    return text + (f" [{summary.unpriced_calls} calls of a model without a price]"
                   if summary.unpriced_calls else "")


def _print_resume_point(store, user_id: str) -> None:
    from .store import StoreUnavailable
    try:
        cp = store.latest_checkpoint(user_id)
    except StoreUnavailable:
        print(f"MongoDB is not answering; the resume point of user {user_id} will be read when it does.")
        return
    if not cp:
        print(f"No checkpoint for user {user_id}: starting a new run.")
        return
    if cp.get("status") != "in_progress":
        print(f"Last run of user {user_id} (batch {cp['batch_id']}) is {cp.get('status')}: starting a new run.")
        return
    total, done = int(cp.get("total_sms") or 0), int(cp.get("processed_sms") or 0)
    print(f"Resuming user {user_id}: batch {cp['batch_id']}, progress {done}/{total}, "
          f"last processed id {cp.get('last_processed_id')}, at {cp.get('checkpoint_timestamp')}, "
          f"{max(0, total - done)} remaining")


class _Progress:
    """A one-line progress bar on a terminal."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.last = ""

    def update(self, pipeline) -> None:
        s = pipeline.summary
        total = max(s.total_sms, 1)
        width = 30
        filled = min(width, int(width * s.processed_sms / total))
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {s.processed_sms}/{s.total_sms}"
        if not pipeline.mongo_ok:
            line += " (MongoDB down, journaling)"
        if line != self.last:
            self.stream.write(line)
            self.stream.flush()
            self.last = line

    def done(self) -> None:
        if self.last:
            self.stream.write("\n")


def _embedded_path(settings: Settings) -> Path:
    return Path(settings.mongo.embedded_path or settings.state_dir / "embedded-mongo")


# ------------------------------------------------------------------- run
def cmd_run(args: argparse.Namespace) -> int:
    """The supervisor in the foreground (what systemd starts), or as a classic daemon."""
    from .supervisor import Supervisor

    settings = _settings(args)
    if args.daemon:
        from .daemonize import daemonize, running_under_systemd
        if running_under_systemd():
            setup_logging(settings.supervisor.log_level, log_format=settings.supervisor.log_format)
            log.warning("--daemon ignored: running under systemd, which must not see a double fork")
            return Supervisor(settings).run()
        log_file = args.log_file or settings.supervisor.log_file or str(settings.state_dir / "smsd.log")
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handler = setup_logging(settings.supervisor.log_level, log_file,
                                log_format=settings.supervisor.log_format)
        with daemonize(Path(args.pidfile), Path(log_file), working_directory=os.getcwd(),
                       files_preserve=[handler.stream]):
            return Supervisor(settings).run()
    setup_logging(settings.supervisor.log_level, settings.supervisor.log_file or None,
                  log_format=settings.supervisor.log_format)
    return Supervisor(settings).run()


# ---------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the setup one line at a time; exit 0 only when everything passes."""
    from .doctor import main as doctor_main
    return doctor_main(["--json"] if args.json else [], config=args.config)


# ------------------------------------------------------------- others
def cmd_evaluate(args: argparse.Namespace) -> int:
    from .lab.evaluate import main as evaluate_main
    return evaluate_main(args.rest)


def cmd_llm_server(args: argparse.Namespace) -> int:
    from .lab.llmserver import main as server_main
    return server_main(args.rest)


def cmd_drill(args: argparse.Namespace) -> int:
    from .lab.drill import main as drill_main
    return drill_main(args.rest)


def cmd_demo(args: argparse.Namespace) -> int:
    from .lab.demo import main as demo_main
    return demo_main(args.rest)


def cmd_bench(args: argparse.Namespace) -> int:
    from .lab.bench import main as bench_main
    return bench_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smsd", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"smsd {__version__}")
    parser.add_argument("--config", help="config.toml (default: $SMSD_CONFIG, ./config.toml, /etc/smsd/config.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the supervisor, in the foreground (systemd) or --daemon")
    run.add_argument("--daemon", action="store_true", help="detach as a classic daemon (hosts without systemd)")
    run.add_argument("--pidfile", default="/run/smsd/smsd.pid")
    run.add_argument("--log-file", help="daemon mode: where to log (default: <state_dir>/smsd.log)")
    run.set_defaults(func=cmd_run)

    once = sub.add_parser("once", help="process one user's pending SMS, then exit")
    once.add_argument("--user-id", required=True)
    once.add_argument("--limit", type=int, help="at most N SMS in this run")
    once.add_argument("--resume", action="store_true", help="continue the user's in-progress checkpoint")
    once.add_argument("--mode", choices=("online", "batch", "auto"),
                      help="online calls, the Batch API (half price, within 24 h), or batch for a big "
                           "backlog only (default: llm.mode)")
    once.add_argument("--wait", type=float, default=30.0, metavar="SECONDS",
                      help="give up (exit 69) when MongoDB or the LLM does not answer for this long (default 30)")
    once.add_argument("--lock-wait", type=float, default=0.0, metavar="SECONDS",
                      help="seconds to wait for another process working on this user (default 0: exit 75)")
    once.add_argument("--quiet", action="store_true", help="no progress bar")
    once.set_defaults(func=cmd_once)

    doctor = sub.add_parser("doctor", help="check the config, MongoDB, the LLM, directories, journals, unit, socket")
    doctor.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    doctor.set_defaults(func=cmd_doctor)

    for name, func, text in (("evaluate", cmd_evaluate, "score an extractor (rules, llm, rules-then-llm) on labelled SMS"),
                             ("llm-server", cmd_llm_server, "the local OpenAI-compatible test server"),
                             ("drill", cmd_drill, "kill -9 recovery drill"),
                             ("demo", cmd_demo, "the whole job on an embedded default"),
                             ("bench", cmd_bench, "benchmarks")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    return parser


PASSTHROUGH = {"evaluate": cmd_evaluate, "llm-server": cmd_llm_server, "drill": cmd_drill,
               "demo": cmd_demo, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``smsd`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        # These commands own their flags: hand them the rest untouched.
        return PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"smsd: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
