"""``smsd run`` as an outside harness drives it: the shipped defaults and the contract only.

The benchmarks of issue 12 compare smsd with the bare loop "as a new user would
run it": the repository's ``config.toml`` copied unchanged (its defaults), the
URIs and directories given through the contract's environment variables
(``SMSD_MONGO_URI``, ``SMSD_MONGO_DB``, ``SMSD_LLM_BASE_URL``, ``SMSD_STATE_DIR``,
``SMSD_RUNTIME_DIR``), progress read from the MongoDB documents and from the
control socket's ``status``.  Nothing of smsd is imported to drive it except the
control-socket client (the protocol ``smsctl`` speaks).
"""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from .harness import Bench

#: The configuration file shipped with smsd (its defaults are the product's defaults).
SHIPPED_CONFIG = Path(__file__).resolve().parents[3] / "config.toml"
#: The contract's pending filter: ``isprocessed`` false or missing, and not quarantined
#: (smsd's discovery index serves it; the server still reads every pending SMS).
PENDING = {"smsd_quarantine": None, "isprocessed": {"$in": [False, None]}}
#: :meth:`ContractRun.wait_done` reads the pending set at least every this many polls.
FULL_LOOK_EVERY = 5


def shipped_settings() -> Any:
    """The settings of the shipped ``config.toml`` alone (no environment): what a run uses,
    for a bench that sizes its data by them (SMS per LLM call, calls in flight)."""
    from ...config import load_settings
    return load_settings(SHIPPED_CONFIG, env={})


class ContractRun:
    """One ``smsd run`` with the shipped ``config.toml``, only URIs and directories set."""

    def __init__(self, bench: Bench, db_name: str, directory: Path, *, mongo_uri: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.bench = bench
        self.db_name = db_name
        self.directory = directory
        self.mongo_uri = mongo_uri or bench.mongo_uri
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None
        self.launched = 0.0
        self.socket = directory / "run" / "control.sock"

    def start(self) -> "ContractRun":
        """Copy the shipped config and start ``smsd run``; ``launched`` is its wall-clock start."""
        if not SHIPPED_CONFIG.is_file():
            raise RuntimeError(f"the shipped config.toml is not at {SHIPPED_CONFIG} (run from a checkout)")
        config = self.directory / "config.toml"
        shutil.copyfile(SHIPPED_CONFIG, config)
        env = {"SMSD_MONGO_URI": self.mongo_uri, "SMSD_MONGO_DB": self.db_name,
               "SMSD_LLM_BASE_URL": self.bench.llm.url,
               "SMSD_STATE_DIR": str(self.directory / "state"),
               "SMSD_RUNTIME_DIR": str(self.directory / "run"), **self.extra_env}
        self.launched = time.time()
        self.proc = self.bench.smsd(config, "run", env=env)
        return self

    def status(self, timeout: float = 5.0) -> dict | None:
        """The control socket's ``status`` reply, or None while it does not answer."""
        from ... import control
        try:
            return control.request(str(self.socket), "status", {}, timeout=timeout)
        except (control.ControlClientError, OSError):
            return None

    def alive(self) -> bool:
        """True while ``smsd run`` has not exited."""
        return self.proc is not None and self.proc.poll() is None

    def wait_done(self, total: int, timeout: float, poll: float = 1.0,
                  on_poll: Any = None) -> tuple[float, float]:
        """Wait until no SMS is pending and ``total`` are processed; returns the wall-clock
        ``(first, last)`` ``processed_at``.  Raises if smsd exits or the time runs out.

        The times come from the documents, so how often this looks changes only when
        it returns.  A look at the pending set reads all of it on the server smsd is
        measured on (the MongoDB-wire server does not stop at the first match: 90 ms
        at 4,000 pending, while the bare loop's trials are not polled at all), so it is
        made only when smsd's per-user counters (``smsd_user_stats``, one small
        document per user) add up to ``total``, or every :data:`FULL_LOOK_EVERY` polls
        in case they lag: they only say when to look, the pending set says whether
        it is done.
        """
        raw = self.bench.client[self.db_name]["sms_fin_rawdata"]
        stats = self.bench.client[self.db_name]["smsd_user_stats"]
        deadline = time.monotonic() + timeout
        polls = 0
        while True:
            polls += 1
            counted = sum(int(d.get("processed_sms") or 0) for d in stats.find({}, {"processed_sms": 1}))
            if (counted >= total or polls % FULL_LOOK_EVERY == 0) and raw.find_one(PENDING, {"_id": 1}) is None:
                break
            if on_poll is not None:
                on_poll()
            if not self.alive():
                raise RuntimeError(f"smsd run exited with {self.proc.returncode if self.proc else '?'}: "
                                   f"{self.log_tail()}")
            if time.monotonic() > deadline:
                left = raw.count_documents(PENDING)
                raise RuntimeError(f"timed out after {timeout:.0f} s; {left} SMS still pending")
            time.sleep(poll)
        done = raw.count_documents({"isprocessed": True})
        if done < total:
            raise RuntimeError(f"only {done} of {total} SMS processed")
        first = raw.find_one({"isprocessed": True}, {"processed_at": 1}, sort=[("processed_at", 1)])
        last = raw.find_one({"isprocessed": True}, {"processed_at": 1}, sort=[("processed_at", -1)])
        return first["processed_at"].timestamp(), last["processed_at"].timestamp()

    def log_tail(self, lines: int = 5) -> str:
        """The last lines of ``smsd run``'s output (for error messages)."""
        path = self.directory / "smsd.log"
        if not path.exists():
            return "(no log)"
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])

    def stop(self) -> int | None:
        """SIGTERM (drain), then the process group is killed; returns the exit code."""
        proc, self.proc = self.proc, None
        return self.bench.stop_smsd(proc) if proc is not None else None


def seed_users(bench: Bench, db_name: str, n_users: int, sms_each: int, prefix: str = "u") -> list[str]:
    """``n_users`` users with ``sms_each`` pending SMS each (one ``insert_many`` per 1000)."""
    users = [f"{prefix}{i:05d}" for i in range(n_users)]
    docs: list[dict] = []
    for k, user in enumerate(users):
        docs += bench.corpus.docs(user, sms_each, start=k * sms_each)
    coll = bench.client[db_name]["sms_fin_rawdata"]
    for i in range(0, len(docs), 1000):
        coll.insert_many(docs[i:i + 1000], ordered=False)
    return users
