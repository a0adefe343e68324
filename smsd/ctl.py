"""``smsctl``: the operator's command line, a client of smsd's control socket.

Every subcommand sends the same-named command (``status``, ``resume``,
``pause``, ``drain``, ``reload``, ``quarantine``, ``retry``, ``batches``) with
``{"user_id": U}`` where ``--user-id`` is given, and prints the answer.

Exit codes (also for scripts and systemd ``ExecStartPost=`` checks):
:data:`EXIT_OK` 0, :data:`EXIT_FAILED` 1 (the daemon said ``ok: false``),
:data:`EXIT_USAGE` 2 (bad command line), :data:`EXIT_NOT_RUNNING` 3,
:data:`EXIT_PERMISSION` 4, :data:`EXIT_TIMEOUT` 5.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import control_protocol as control  # the client side of the control socket
from .ctl_watch import watch

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NOT_RUNNING = 3
EXIT_PERMISSION = 4
EXIT_TIMEOUT = 5

SOCKET_NAME = "control.sock"
#: Users per page of ``smsctl status``.
DEFAULT_PAGE = 50
DEFAULT_RUNTIME_DIR = "/run/smsd"
#: Fields of a quarantine entry that may carry SMS text: never printed.
_PII_FIELDS = ("text", "body", "sms", "message_text")


def default_socket_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the control socket is: ``$SMSD_RUNTIME_DIR``, the config's ``runtime_dir``,
    ``$RUNTIME_DIRECTORY`` (systemd), else ``/run/smsd``; plus ``control.sock``."""
    environ = os.environ if env is None else env
    if environ.get("SMSD_RUNTIME_DIR"):
        return Path(environ["SMSD_RUNTIME_DIR"]) / SOCKET_NAME
    runtime_dir = _config_runtime_dir()
    if runtime_dir:
        return Path(runtime_dir) / SOCKET_NAME
    if environ.get("RUNTIME_DIRECTORY"):
        # systemd may pass several, colon-separated; ours is the first.
        return Path(environ["RUNTIME_DIRECTORY"].split(":")[0]) / SOCKET_NAME
    return Path(DEFAULT_RUNTIME_DIR) / SOCKET_NAME


def _config_runtime_dir() -> str | None:
    # Lazy and forgiving: smsctl must work even when config.toml is absent,
    # unreadable or incomplete (e.g. no Mongo URI), and when smsd.config is
    # not there at all.
    try:
        from .config import load_settings  # type: ignore[attr-defined]

        settings = load_settings()
    except Exception:
        return None
    value = getattr(settings, "runtime_dir", None)
    if not value:
        return None
    # Only a runtime_dir someone chose (config file or environment) counts: the
    # built-in default is for development, while an operator's shell outside
    # systemd must still find the packaged daemon in /run/smsd.
    try:
        if value == type(settings)().runtime_dir:
            return None
    except Exception:
        pass
    return str(value)


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``smsctl`` argument parser."""
    parser = argparse.ArgumentParser(prog="smsctl", description="Control a running smsd supervisor.")
    parser.add_argument("-t", "--timeout", type=float, default=10.0, help="seconds to wait for smsd (default 10)")
    parser.add_argument("--socket", type=Path, default=None,
                        help="control socket (default $SMSD_RUNTIME_DIR/control.sock, else "
                             "$RUNTIME_DIRECTORY/control.sock, else /run/smsd/control.sock)")
    sub = parser.add_subparsers(dest="cmd", metavar="COMMAND", required=True)

    p = sub.add_parser("status", help="supervisor, workers, users, journal and LLM counters")
    p.add_argument("--json", action="store_true", help="print the daemon's JSON object")
    p.add_argument("--user-id", help="only this user, with its checkpoint")
    p.add_argument("--limit", type=_whole, default=DEFAULT_PAGE,
                   help=f"users per page, busiest first (default {DEFAULT_PAGE}; 0: none, totals only)")
    p.add_argument("--offset", type=_whole, default=0, help="skip this many users (default 0)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) with SMS/s and an ETA; Ctrl-C stops")

    p = sub.add_parser("resume", help="resume all users, or one")
    p.add_argument("--user-id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("pause", help="pause one user (its worker stops after the current batch)")
    p.add_argument("--user-id", required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("drain", help="finish in-flight work, start nothing new")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("reload", help="re-read the configuration")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("quarantine", help="list quarantined SMS (ids and reasons, never text)")
    p.add_argument("--user-id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("retry", help="release a user's quarantined SMS for another try")
    p.add_argument("--user-id", required=True)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("batches", help="open Batch API jobs; `batches cancel ID` cancels one")
    p.add_argument("action", nargs="?", choices=("list", "cancel"), default="list")
    p.add_argument("batch_id", nargs="?", help="the batch to cancel (batch_...)")
    p.add_argument("--user-id")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("release", help="give a user's lease back (its worker drains first); "
                                       "another host may take the user")
    p.add_argument("--user-id", required=True)
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``smsctl``; returns the exit code."""
    parser = build_parser()
    opts = parser.parse_args(argv)  # exits 2 on usage errors
    if getattr(opts, "watch", None) is not None and opts.watch <= 0:
        _err("smsctl: --watch needs a positive number of seconds")
        return EXIT_USAGE
    path = opts.socket if opts.socket is not None else default_socket_path()
    args: dict[str, Any] = {}
    if getattr(opts, "user_id", None) is not None:
        args["user_id"] = opts.user_id
    if opts.cmd == "batches" and opts.action == "cancel":
        if not opts.batch_id:
            parser.error("batches cancel needs a batch id")
        args["cancel"] = opts.batch_id
    if opts.cmd == "status":
        args.update(limit=opts.limit, offset=opts.offset)
    try:
        reply = control.request(path, opts.cmd, args, timeout=opts.timeout)
    except control.DaemonNotRunning:
        _err(f"smsd is not running (no control socket at {path})")
        return EXIT_NOT_RUNNING
    except control.PermissionDenied as exc:
        _err(f"smsctl: {exc}; run as root or as a member of the control socket's group")
        return EXIT_PERMISSION
    except control.ControlTimeout as exc:
        _err(f"smsctl: timed out: {exc}")
        return EXIT_TIMEOUT
    except control.ControlError as exc:
        _err(f"smsctl: {opts.cmd} failed: {exc.message}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except OSError as exc:  # e.g. a socket path too long for AF_UNIX
        _err(f"smsctl: cannot reach smsd at {path}: {exc}")
        return EXIT_FAILED

    out = sys.stdout
    if opts.cmd == "status" and opts.watch is not None:
        render = (lambda r: json.dumps(r, default=str)) if opts.json else format_status
        return watch(lambda: control.request(path, "status", args, timeout=opts.timeout),
                     render, _duration, opts.watch, out)
    try:
        if opts.cmd == "quarantine":
            reply = _scrub_quarantine(reply)
        if getattr(opts, "json", False):
            json.dump(reply, out, indent=2, sort_keys=False, default=str)
            out.write("\n")
        elif opts.cmd == "status":
            out.write(format_status(reply))
        elif opts.cmd == "quarantine":
            out.write(format_quarantine(reply))
        elif opts.cmd == "batches" and "batches" in reply:
            out.write(format_batches(reply.get("batches") or []))
        else:
            out.write(format_ack(opts.cmd, reply))
        out.flush()
    except BrokenPipeError:  # `smsctl status | head`
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        except OSError:
            pass
    return EXIT_OK


def _err(message: str, stream: TextIO | None = None) -> None:
    print(message, file=stream or sys.stderr)


# ---------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------

def _duration(seconds: Any) -> str:
    try:
        s = int(float(seconds))
    except (TypeError, ValueError):
        return "-"
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _mib(value: Any) -> str:
    try:
        return f"{int(value) / (1024 * 1024):.1f}"
    except (TypeError, ValueError):
        return "-"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> list[str]:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        parts = [v.rjust(widths[i]) if i in right else v.ljust(widths[i]) for i, v in enumerate(row)]
        return "  ".join(parts).rstrip()

    return [fmt(headers)] + [fmt(r) for r in cells]


def format_status(reply: Mapping[str, Any]) -> str:
    """The human-readable ``smsctl status``: header, USERS, WORKERS and (with --user-id) the checkpoint."""
    lines: list[str] = []
    mongo = reply.get("mongo") or {}
    if mongo.get("ok") is True:
        mongo_s = "ok"
    elif mongo:
        mongo_s = "DOWN" + (f" for {_duration(mongo['down_for_s'])}" if mongo.get("down_for_s") is not None else "") \
            + (f" ({mongo.get('error')})" if mongo.get("error") else "")
    else:
        mongo_s = "?"
    journal = reply.get("journal") or {}
    llm = reply.get("llm") or {}
    version = f" {reply['version']}" if reply.get("version") else ""
    lines.append(f"smsd{version}  pid {_cell(reply.get('pid'))}  state {_cell(reply.get('state'))}  "
                 f"uptime {_duration(reply.get('uptime_s'))}")
    lines.append(f"mongo {mongo_s}  journal backlog {_cell(journal.get('unflushed'))}  "
                 f"LLM calls {_cell(llm.get('calls'))} (repeated {_cell(llm.get('repeated_calls'))})  "
                 f"tokens {_cell(llm.get('prompt_tokens'))} prompt / {_cell(llm.get('completion_tokens'))} completion  "
                 f"ungrounded {_cell(reply.get('ungrounded_sms', 0))}")
    if "cost_usd" in llm:
        lines.append(f"LLM cost USD {llm.get('cost_usd')}  repeated USD {llm.get('repeated_usd')}  "
                     f"saved USD {llm.get('saved_usd')}  cache hits {_cell(llm.get('cache_hits'))}  "
                     f"cached tokens {_cell(llm.get('cached_tokens'))}"
                     + (f"  ({llm['unpriced_calls']} calls of a model without a price)"
                        if llm.get("unpriced_calls") else ""))
    if llm.get("response_format"):
        lines.append(f"llm {llm.get('state', 'ok')}  response_format {llm['response_format']}")
    if llm.get("state") == "misconfigured":
        lines.append(f"llm: misconfigured: {llm.get('error')}")
        lines.append(f"  fix: {llm.get('hint')}; then `smsctl reload`")

    users = reply.get("users") or []
    totals = reply.get("totals")
    paging = reply.get("paging") or {}
    if totals:
        lines.append(f"users {_cell(totals.get('users'))}  SMS pending {_cell(totals.get('pending_sms'))}  "
                     f"processed {_cell(totals.get('processed_sms'))}  "
                     f"quarantined {_cell(totals.get('quarantined_sms'))}")
    lines.append("")
    first = int(paging.get("offset") or 0)
    if totals and len(users) < int(totals.get("users") or 0):
        shown = f"{first + 1}-{first + len(users)} of {totals['users']}" if users else f"0 of {totals['users']}"
        lines.append(f"USERS ({shown}, busiest first)")
    else:
        lines.append(f"USERS ({len(users)})")
    if users:
        lines += _table(
            ["USER", "TOTAL", "PROCESSED", "PENDING", "QUARANTINED", "UNGROUNDED", "STATUS", "RESTARTS",
             "COST USD"],
            [[u.get("user_id"), u.get("total_sms"), u.get("processed_sms"), u.get("pending_sms"),
              u.get("quarantined_sms"), u.get("ungrounded_sms", 0), u.get("status"), u.get("restarts"),
              u.get("cost_usd")]
             for u in users],
            right=(1, 2, 3, 4, 5, 7, 8),
        )
    else:
        lines.append("(none)")
    if paging.get("next_offset") is not None:
        lines.append(f"... more: smsctl status --offset {paging['next_offset']} --limit {paging.get('limit')}")

    workers = reply.get("workers") or []
    lines.append("")
    lines.append(f"WORKERS ({len(workers)})")
    if workers:
        lines += _table(
            ["USER", "PID", "STATE", "UPTIME", "RSS MiB", "RESTARTS"],
            [[w.get("user_id"), w.get("pid"), w.get("state"), _duration(w.get("uptime_s")),
              _mib(w.get("rss_bytes")), w.get("restarts")] for w in workers],
            right=(1, 3, 4, 5),
        )
    else:
        lines.append("(none)")

    if reply.get("batches"):
        lines.append("")
        lines.append(format_batches(reply["batches"]).rstrip("\n"))
    leases = reply.get("leases")
    if leases is not None:
        lines.append("")
        lines.append(f"LEASES of host {_cell(reply.get('host'))} ({len(leases)})")
        if leases:
            lines += _table(["USER", "EPOCH", "EXPIRES"],
                            [[row.get("user_id"), row.get("epoch"), row.get("expires_at")] for row in leases],
                            right=(1,))
        else:
            lines.append("(none)")

    if "checkpoint" in reply:
        lines.append("")
        lines.append(format_checkpoint(reply.get("checkpoint")))
    return "\n".join(lines) + "\n"


def format_batches(batches: Sequence[Mapping[str, Any]]) -> str:
    """Open Batch API jobs: user, batch id, state, requests done/total, SMS, age."""
    lines = [f"BATCHES ({len(batches)})"]
    if not batches:
        return "\n".join(lines + ["(none)"]) + "\n"

    def done(b: Mapping[str, Any]) -> str:
        r = b.get("requests") or {}
        return f"{_cell(r.get('completed'))}/{_cell(r.get('total'))}" + (f" ({r['failed']} failed)" if r.get("failed") else "")

    lines += _table(["USER", "BATCH", "STATE", "REQUESTS", "SMS", "AGE"],
                    [[b.get("user_id"), b.get("batch_id"), b.get("state"), done(b), b.get("sms"),
                      _duration(b.get("age_s"))] for b in batches], right=(4, 5))
    return "\n".join(lines) + "\n"


def format_checkpoint(cp: Mapping[str, Any] | None) -> str:
    """A checkpoint in the seed guide's words: ``Resume point: batch B, 649/1443 processed, ...``."""
    if not cp:
        return "Resume point: none (no checkpoint yet)"
    user = f" ({cp['user_id']})" if cp.get("user_id") else ""
    return (f"Resume point{user}: batch {_cell(cp.get('batch_id'))}, "
            f"{_cell(cp.get('processed_sms'))}/{_cell(cp.get('total_sms'))} processed, "
            f"last id {_cell(cp.get('last_processed_id'))}, at {_cell(cp.get('checkpoint_timestamp'))}, "
            f"status {_cell(cp.get('status'))}")


def _quarantine_items(reply: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    for key in ("quarantine", "quarantined", "items"):
        items = reply.get(key)
        if isinstance(items, list):
            return [i for i in items if isinstance(i, Mapping)]
    return []


def _scrub_quarantine(reply: dict) -> dict:
    """Drop any SMS text a daemon might have included: smsctl never shows it."""
    out = dict(reply)
    for key in ("quarantine", "quarantined", "items"):
        items = out.get(key)
        if isinstance(items, list):
            out[key] = [{k: v for k, v in i.items() if k not in _PII_FIELDS} if isinstance(i, Mapping) else i
                        for i in items]
    return out


def format_quarantine(reply: Mapping[str, Any]) -> str:
    """Quarantined SMS as a table of user, sms id, reason, attempts."""
    items = _quarantine_items(reply)
    if not items:
        return "no quarantined SMS\n"
    rows = [[i.get("user_id"), i.get("sms_id", i.get("id")), i.get("reason"), i.get("attempts")] for i in items]
    lines = _table(["USER", "SMS ID", "REASON", "ATTEMPTS"], rows, right=(3,))
    return "\n".join(lines) + f"\n{len(items)} quarantined\n"


def format_ack(cmd: str, reply: Mapping[str, Any]) -> str:
    """One line for a command that changes state: the daemon's message, or ``ok``."""
    message = reply.get("message")
    if message:
        return f"{message}\n"
    return f"{cmd}: ok\n"


if __name__ == "__main__":
    sys.exit(main())
