"""What ``smsd demo`` does and how it speaks: its plan, the seeded set, its errors and output.

:class:`Plan` (size, LLM, files), :class:`Seeded` (what was put into
``sms_fin_rawdata``), :class:`DemoFailed` and the step printer :class:`Out`
are apart from :mod:`smsd.lab.demo` because every part of the demo (seeding,
the ``smsd run`` processes, the check and summary) uses them, and none of
those parts may import the demo's run loop back.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DB_NAME = "smsd_demo"


class DemoFailed(Exception):
    """The demo could not go on (a process did not start, a timeout)."""


@dataclass
class Plan:
    """What the demo does: its size, its LLM and where it keeps its files."""

    workdir: Path
    users: int
    sms_per_user: int
    malformed: int
    latency_ms: float
    kill_at: float
    timeout: float
    real_llm: bool
    base_url: str = ""
    model: str = ""
    batch_size: int = 5
    concurrency: int = 2
    metrics_port: int = 0        # supervisor.metrics_listen on 127.0.0.1 (a free port)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def config(self) -> Path:
        return self.workdir / "config.toml"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    @property
    def runtime_dir(self) -> Path:
        return self.workdir / "run"

    @property
    def mongo_path(self) -> Path:
        return self.workdir / "mongo"

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "smsd.log"


@dataclass
class Seeded:
    """What was put into ``sms_fin_rawdata``."""

    expected: dict[Any, dict] = field(default_factory=dict)   # raw _id -> expected answer
    malformed: list[Any] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    fixtures: int = 0
    synthetic: int = 0

    @property
    def total(self) -> int:
        return len(self.expected)


# --------------------------------------------------------------------------- output

class Out:
    """Prints one line per step, prefixed with the seconds since the start."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def __call__(self, message: str = "") -> None:
        prefix = f"[{self.elapsed():5.1f}s] " if message else ""
        print(prefix + message, flush=True)

    def block(self, text: str, indent: str = "    ") -> None:
        for line in text.rstrip("\n").splitlines():
            print(indent + line if line.strip() else "", flush=True)


def _show(path: Path) -> str:
    """``path`` relative to the working directory when it is below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
