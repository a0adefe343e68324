"""Several ``smsd run`` hosts against one MongoDB: start, freeze, kill, cut them off.

Used by the multi-host tests and by ``smsd bench`` (``hosts``).  Each
:class:`HostProcess` is a separate supervisor with its own state and runtime
directories and config file, in its own session (so a whole host -- the
supervisor and its workers -- is frozen or killed through its process group),
optionally inside a network namespace (:class:`NetnsLink`) whose link to the
servers can be cut.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import control_protocol as control


def write_toml(path: Path, conf: dict[str, dict[str, Any]]) -> Path:
    """A config.toml of plain sections (values JSON-encoded, which TOML reads the same)."""
    lines = []
    for section, values in conf.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class HostProcess:
    """One ``smsd run`` host: its directories, config, process group and control socket."""

    def __init__(self, name: str, root: Path, *, mongo_uri: str, db: str, llm_url: str,
                 netns: str | None = None, env: dict[str, str] | None = None,
                 **sections: dict[str, Any]) -> None:
        self.name = name
        self.env = dict(env or {})   # extra environment, e.g. SMSD_FAILPOINT
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.netns = netns
        conf: dict[str, dict[str, Any]] = {
            "mongo": {"uri": mongo_uri, "db": db, "timeout_ms": 2000},
            "llm": {"base_url": llm_url, "model": "smsd-test", "batch_size": 5, "concurrency": 2,
                    "timeout": 10.0, "max_retries": 3, "backoff_base": 0.05, "backoff_max": 0.5,
                    # the local server's per-SMS counters (billed, asked) name SMS keys, not
                    # the ids "1".."N" local to a call (token diet)
                    "key_header": True},
            "journal": {"state_dir": str(self.state_dir)},
            "pipeline": {"page_size": 50},
            "supervisor": {"runtime_dir": str(self.root / "run"), "discovery_interval": 1.0,
                           "restart_backoff": 0.2, "drain_timeout": 5.0},
            "lease": {"ttl": 3.0},
        }
        for section, values in sections.items():
            conf.setdefault(section, {}).update(values)
        self.config = write_toml(self.root / "config.toml", conf)
        self.log_path = self.root / "smsd.log"
        self.proc: subprocess.Popen | None = None

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "control.sock"

    def start(self, timeout: float = 30.0) -> "HostProcess":
        """Start the supervisor in its own session; wait for its control socket."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SMSD_") and k != "OPENAI_API_KEY"}
        env.update(SMSD_CONFIG=str(self.config), PYTHONUNBUFFERED="1", OPENAI_API_KEY="sk-test", **self.env)
        argv = [sys.executable, "-m", "smsd.cli", "run"]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns] + argv
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         cwd=str(Path(__file__).resolve().parents[2]))
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while self.status() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {self.name} did not start: {self.log_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def status(self) -> dict | None:
        """``smsctl status --json`` of this host, or None when it does not answer."""
        try:
            return control.request(str(self.socket), "status", {}, timeout=3)
        except (control.ControlClientError, OSError):
            return None

    def cmd(self, name: str, **args: Any) -> dict:
        return control.request(str(self.socket), name, args, timeout=10)

    @property
    def host_id(self) -> str:
        return (self.state_dir / "host_id").read_text().strip()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _group(self, sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def freeze(self, wait: float = 5.0) -> None:
        """SIGSTOP the whole host: supervisor and workers (a VM stall).

        Returns once every process of the host is stopped (or after ``wait`` s):
        ``killpg`` returns before the signal has stopped them, and a journal commit in
        that moment would be missed by a reading of what was in flight at the freeze.
        """
        self._group(signal.SIGSTOP)
        if self.proc is None:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(state != "T" for state in _group_states(self.proc.pid)):
            time.sleep(0.01)

    def thaw(self) -> None:
        self._group(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole host."""
        self._group(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """Drain (SIGTERM) and wait; SIGKILL the group if it does not stop."""
        if self.proc is None:
            return None
        self._group(signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._group(signal.SIGKILL)
            self.proc.wait(30)
        self._group(signal.SIGKILL)   # any straggler of the group
        return self.proc.returncode


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no ``ip``, no kernel support)."""


class NetnsLink:
    """A network namespace joined to the host by a veth pair; :meth:`cut` / :meth:`restore` the link.

    ``host_addr`` is the host side's address (servers listen there), ``ns_addr``
    the namespace side's.  Only these two addresses of a private /24 are used.
    """

    def __init__(self, name: str, *, host_addr: str = "10.201.0.1", ns_addr: str = "10.201.0.2",
                 prefix: int = 24) -> None:
        self.name = name
        self.host_if = f"{name[:9]}-h"
        self.ns_if = f"{name[:9]}-n"
        self.host_addr, self.ns_addr, self.prefix = host_addr, ns_addr, prefix

    @staticmethod
    def _ip(*args: str, netns: str | None = None) -> None:
        argv = ["ip"] + (["netns", "exec", netns, "ip"] if netns else []) + list(args)
        res = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        if res.returncode != 0:
            raise NetnsUnavailable(f"`{' '.join(argv)}` failed: {res.stderr.strip()}")

    def create(self) -> "NetnsLink":
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root")
        self.delete()
        self._ip("netns", "add", self.name)
        try:
            self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
            self._ip("link", "set", self.ns_if, "netns", self.name)
            self._ip("addr", "add", f"{self.host_addr}/{self.prefix}", "dev", self.host_if)
            self._ip("link", "set", self.host_if, "up")
            self._ip("addr", "add", f"{self.ns_addr}/{self.prefix}", "dev", self.ns_if, netns=self.name)
            self._ip("link", "set", self.ns_if, "up", netns=self.name)
            self._ip("link", "set", "lo", "up", netns=self.name)
        except NetnsUnavailable:
            self.delete()
            raise
        return self

    def cut(self) -> None:
        """Take the host side of the link down: the namespace reaches nothing."""
        self._ip("link", "set", self.host_if, "down")

    def restore(self) -> None:
        self._ip("link", "set", self.host_if, "up")

    def delete(self) -> None:
        """Remove the namespace (and with it the veth pair); quiet when it is not there."""
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=20)



def tx_writes_after_takeover(client: Any, db_name: str, user_id: str, old_epoch: int) -> list[dict]:
    """Transaction documents of ``old_epoch`` that MongoDB applied after ``user_id`` moved.

    Read from the server's own record of what it applied (``local.oplog.rs``,
    which SecantusDB keeps as a replica-set primary): the take-over is the
    oplog entry that raised the user's lease epoch above ``old_epoch``; after
    it, an insert or replacement of one of the user's transaction documents
    stamped ``smsd_epoch == old_epoch`` came from the host that lost the user.
    Since transaction writes are gated on the lease by the server
    (:mod:`smsd.fencing`) there should be none.  Each item: ``{id, op, wall}``.
    """
    oplog = client["local"]["oplog.rs"]
    taken = None
    for e in oplog.find({"ns": f"{db_name}.smsd_leases", "o2._id": user_id}).sort("ts", 1):
        o = e.get("o") or {}
        fields = o.get("diff", {}).get("updatedFields", {}) if "diff" in o else o
        if int(fields.get("epoch", -1)) > old_epoch:
            taken = e["ts"]
            break
    if taken is None:
        return []
    return [{"id": (e.get("o") or {}).get("_id"), "op": e["op"], "wall": e.get("wall")}
            for e in oplog.find({"ts": {"$gt": taken}, "ns": f"{db_name}.financial_transactions",
                                 "o.user_id": user_id, "o.smsd_epoch": old_epoch})]


def _group_states(pgid: int) -> list[str]:
    """The state letter (``/proc/PID/stat``) of every live process in process group ``pgid``."""
    states = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            states.append(fields[0])
    return states


def _sum_sms(state_dir: Path, where: str, params: tuple = ()) -> int:
    """Sum of ``calls.n_sms`` over ``where``, across a host's journals (read-only)."""
    n = 0
    for path in (Path(state_dir) / "journal").glob("*.sqlite"):
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            n += conn.execute(f"SELECT coalesce(sum(n_sms), 0) FROM calls WHERE {where}",
                              params).fetchone()[0]
        finally:
            conn.close()
    return n


def asked_since(state_dir: Path, since: float) -> int:
    """SMS of the calls a host sent at or after ``since`` (epoch seconds)."""
    return _sum_sms(state_dir, "sent_at >= ?", (since,))


def in_flight(state_dir: Path) -> int:
    """SMS a host could still be paid for twice: its calls sent and not answered, plus
    answered and not flushed."""
    return _sum_sms(state_dir, "state = 'sent' OR (state = 'answered' AND flushed = 0)")
