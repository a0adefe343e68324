"""Helpers shared by the end-to-end tests: seed SMS, write a config, run smsd."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from bson import ObjectId

import signal
import time

from smsd import control_protocol as control

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "data" / "sms_fixtures.jsonl"


def fixture_lines() -> list[dict]:
    path = FIXTURES if FIXTURES.is_file() else Path("/work/shared/data/sms_fixtures.jsonl")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def seed(db: Any, user_id: str, n: int, *, start: int = 0, id_kind: str = "objectid") -> dict[Any, dict]:
    """Insert ``n`` fixture SMS for ``user_id``; returns raw ``_id`` → expected answer."""
    lines = fixture_lines()
    docs, expected = [], {}
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(start, start + n):
        line = lines[i % len(lines)]
        if id_kind == "objectid":
            raw_id: Any = ObjectId()
        elif id_kind == "int":
            raw_id = 10_000 + i
        else:
            raw_id = f"{user_id}-sms-{i:05d}"
        doc = {"_id": raw_id, "user_id": user_id, "body": line["text"],
               "received_at": base + timedelta(minutes=i), "isprocessed": False}
        if line.get("sender"):
            doc["sender"] = line["sender"]
        docs.append(doc)
        expected[raw_id] = line["expected"]
    if len({line["text"] for line in lines}) != len(lines):
        raise AssertionError("fixture texts are not unique: the known-answer server needs them to be")
    db["sms_fin_rawdata"].insert_many(docs)
    return expected


def write_config(tmp_path: Path, *, mongo_uri: str, db: str, llm_url: str, **sections: dict) -> Path:
    """A config.toml for a test: small batches, fast retries, state under tmp_path."""
    conf = {
        "mongo": {"uri": mongo_uri, "db": db, "timeout_ms": 2000},
        # key_header: the local server's per-SMS counters (billed, asked) name SMS keys
        # although the ids on the wire are "1".."N" (checked by invariants.verify).
        "llm": {"base_url": llm_url, "model": "smsd-test", "batch_size": 5, "concurrency": 2,
                "timeout": 10.0, "max_retries": 3, "backoff_base": 0.05, "backoff_max": 0.5,
                "key_header": True},
        "journal": {"state_dir": str(tmp_path / "state")},
        "pipeline": {"page_size": 50},
        "supervisor": {"runtime_dir": str(tmp_path / "run"), "discovery_interval": 1.0,
                       "restart_backoff": 0.2, "drain_timeout": 15.0},
    }
    for section, values in sections.items():
        conf.setdefault(section, {}).update(values)
    lines = []
    for section, values in conf.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path = tmp_path / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def smsd_env(config: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSD_") and k != "OPENAI_API_KEY"}
    env["SMSD_CONFIG"] = str(config)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_smsd(config: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """Run ``smsd ARGS`` to completion in a separate process."""
    return subprocess.run([sys.executable, "-m", "smsd.cli", *args], env=smsd_env(config, **env),
                          capture_output=True, text=True, timeout=timeout, cwd=str(REPO))


def start_smsd(config: Path, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "smsd.cli", *args], env=smsd_env(config, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(REPO))


class Daemon:
    """A running ``smsd run`` subprocess and its control socket."""

    def __init__(self, config, tmp_path, **env):
        self.config = config
        self.sock = tmp_path / "run" / "control.sock"
        self.proc = start_smsd(config, "run", **env)
        wait_for(lambda: self.status(quiet=True) is not None, timeout=30, what="control socket")

    def status(self, quiet: bool = False, **args):
        try:
            return control.request(str(self.sock), "status", args, timeout=5)
        except (control.DaemonNotRunning, control.ControlTimeout, OSError):
            if quiet:
                return None
            raise

    def cmd(self, name, **args):
        return control.request(str(self.sock), name, args, timeout=10)

    def worker_pids(self):
        st = self.status(quiet=True) or {"workers": []}
        return {w["pid"]: w["user_id"] for w in st["workers"]}

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except Exception:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return self.proc.returncode, out


def free_port() -> int:
    """A TCP port on loopback that nothing listens on (for servers a test starts)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond, timeout=60.0, what="condition", interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")
