"""What the lab's server subprocesses share: the ready line and the JSON admin call.

The LLM server and the MongoDB proxy both print one ready line on stdout
(``<prefix><address>``) and are driven through a small JSON-over-HTTP admin API;
their wrappers (:class:`smsd.lab.bench.harness.LlmProcess`,
:class:`smsd.lab.mongoproxy.ProxyProcess`) use these two helpers.
"""
from __future__ import annotations

import json
import subprocess
import threading
import urllib.request


def ready_line(proc: subprocess.Popen, prefix: str, timeout: float) -> str | None:
    """What follows ``prefix`` on ``proc``'s first stdout line, or None if the line
    did not come within ``timeout`` seconds or does not start with ``prefix``."""
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line or not line[0].startswith(prefix):
        return None
    return line[0][len(prefix):].strip()


def admin_json(url: str, method: str, body: dict | None = None, timeout: float = 30.0) -> dict:
    """One JSON request to an admin API; the decoded JSON answer (HTTP errors raise)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())
