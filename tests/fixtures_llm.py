"""pytest plugin: the local OpenAI-compatible LLM server (``python -m smsd.lab.llmserver``) as a subprocess.

Fixtures:

- ``llm_server``: a server answering from the SMS fixtures file.  By default one
  process is shared by the session and reset (counters, script, faults) before
  each test; ``@pytest.mark.parametrize("llm_server", [{...opts}], indirect=True)``
  starts a dedicated one with those options.
- ``make_llm_server(**opts)``: a factory for custom servers, all stopped after the test.
- ``sms_fixtures``: the fixture lines (``{"id", "text", "sender", "expected", ...}``).

Options are the server's CLI flags with underscores: ``answers``, ``extractor``,
``fallback``, ``api_key``, ``model``, ``latency_ms``, ``latency_jitter_ms``,
``p_429``, ``p_500``, ``p_timeout``, ``p_malformed``, ``p_partial``, ``p_bad_item``,
``timeout_sleep_s``, ``retry_after_s``, ``rpm_limit``, ``seed``, ``log_level``,
``obey_injections``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
READY_PREFIX = "smsd-llmserver listening on "


def fixtures_path() -> Path:
    """The labelled SMS fixtures (``SMSD_TEST_FIXTURES`` overrides)."""
    candidates = [os.environ.get("SMSD_TEST_FIXTURES"),
                  REPO / "smsd" / "data" / "sms_fixtures.jsonl",
                  REPO / "tests" / "data" / "sms_fixtures.jsonl",
                  "/work/shared/data/sms_fixtures.jsonl"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    raise FileNotFoundError("sms_fixtures.jsonl not found (set SMSD_TEST_FIXTURES)")


def load_fixtures(path: Path | None = None) -> list[dict]:
    with open(path or fixtures_path(), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class LlmServerProcess:
    """One ``python -m smsd.lab.llmserver`` subprocess and its admin API."""

    def __init__(self, **opts: Any):
        opts.setdefault("answers", str(fixtures_path()))
        self.opts = opts
        self.proc: subprocess.Popen | None = None
        self.url = ""       # http://127.0.0.1:PORT/v1
        self.base = ""      # http://127.0.0.1:PORT
        self._log = tempfile.NamedTemporaryFile(prefix="smsd-llmserver-", suffix=".log", delete=False)

    def argv(self) -> list[str]:
        args = [sys.executable, "-m", "smsd.lab.llmserver", "--host", "127.0.0.1", "--port", "0"]
        for key, value in self.opts.items():
            if value is None or value is False:
                continue
            flag = "--" + key.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        return args

    def start(self, timeout: float = 20.0) -> "LlmServerProcess":
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.DEVNULL, text=True, cwd=str(REPO))
        assert self.proc.stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()  # the server prints exactly one line when ready
        reader.join(timeout)
        line = got[0] if got else ""
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"llm server did not start: {line!r}; log: {self.log_text()[-2000:]}")
        self.url = line[len(READY_PREFIX):].strip()
        self.base = self.url[: -len("/v1")]
        return self

    def log_text(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._log.close()
        try:
            os.unlink(self._log.name)
        except OSError:
            pass
        return self.proc.returncode

    # -- admin API
    def admin(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None

    def stats(self) -> dict:
        return self.admin("GET", "/_admin/stats")

    def set_faults(self, **changes: Any) -> dict:
        return self.admin("POST", "/_admin/faults", changes)

    def faults(self) -> dict:
        return self.admin("GET", "/_admin/faults")

    def script(self, faults: list[str]) -> dict:
        return self.admin("POST", "/_admin/script", {"faults": list(faults)})

    def reset(self, faults: bool = False) -> None:
        self.admin("POST", "/_admin/reset", {"faults": faults})

    def last_request(self) -> dict:
        return self.admin("GET", "/_admin/last_request")


@pytest.fixture(scope="session")
def _llm_server_shared():
    server = LlmServerProcess().start()
    yield server
    server.stop()


@pytest.fixture
def llm_server(request):
    opts = getattr(request, "param", None)
    if opts:
        server = LlmServerProcess(**dict(opts)).start()
        yield server
        server.stop()
        return
    server = request.getfixturevalue("_llm_server_shared")
    if server.proc is None or server.proc.poll() is not None:
        server.start()  # a test killed it: bring it back
    server.reset(faults=True)
    yield server


@pytest.fixture
def make_llm_server():
    started: list[LlmServerProcess] = []

    def factory(**opts: Any) -> LlmServerProcess:
        server = LlmServerProcess(**opts).start()
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def sms_fixtures() -> list[dict]:
    return load_fixtures()
