"""Log formats: text (no own timestamp under journald) and JSON lines with the event's figures."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from smsd.config import ConfigError, load_settings

from ..harness import REPO

SNIPPET = """
import logging, sys
from smsd.logsetup import setup_logging, bind_context
setup_logging("INFO", log_format=sys.argv[1])
log = logging.getLogger("smsd.pipeline")
log.info("plain line")
bind_context(user_id="u-7")
log.warning("user %s: LLM call failed; retrying %d SMS", "u-7", 5,
            extra={"call_id": "c-42", "n_sms": 5, "retry_in_s": 2.0})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("boom")
"""


def _run(log_format: str, env: dict | None = None, stderr_path=None) -> str:
    full = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    full.update(env or {})
    with open(stderr_path, "w+b") as err:
        if "JOURNAL_STREAM" in full and full["JOURNAL_STREAM"] == "from-file":
            st = os.fstat(err.fileno())
            full["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SNIPPET, log_format], env=full, stderr=err, check=True,
                       cwd=str(REPO))
        err.seek(0)
        return err.read().decode()


def test_json_lines_carry_the_fixed_keys_the_bound_user_and_the_figures(tmp_path):
    lines = _run("json", stderr_path=tmp_path / "err").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    for r in records:
        assert {"ts", "level", "logger", "pid", "user_id", "call_id", "event"} <= set(r)
        assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$", r["ts"])
        assert r["logger"] == "smsd.pipeline" and isinstance(r["pid"], int)
    plain, failed, boom = records
    assert plain["user_id"] is None and plain["call_id"] is None and plain["event"] == "plain line"
    assert failed["level"] == "WARNING" and failed["user_id"] == "u-7" and failed["call_id"] == "c-42"
    assert failed["n_sms"] == 5 and failed["retry_in_s"] == 2.0
    assert failed["event"] == "user u-7: LLM call failed; retrying 5 SMS"
    assert "ZeroDivisionError" in boom["exc"] and boom["user_id"] == "u-7"


def test_text_has_its_own_time_except_when_stderr_is_the_journal(tmp_path):
    stamped = _run("text", stderr_path=tmp_path / "a").splitlines()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \d+ smsd.pipeline INFO plain line$", stamped[0])
    journald = _run("text", {"JOURNAL_STREAM": "from-file"}, stderr_path=tmp_path / "b").splitlines()
    assert re.match(r"\d+ smsd.pipeline INFO plain line$", journald[0]), journald[0]
    # JOURNAL_STREAM naming another stream (a child's redirected stderr) does not count.
    other = _run("text", {"JOURNAL_STREAM": "1:2"}, stderr_path=tmp_path / "c").splitlines()
    assert re.match(r"\d{4}-", other[0])


def test_log_format_and_metrics_listen_settings_are_checked():
    env = {"SMSD_CONFIG": "/dev/null"}
    assert load_settings(env=env).supervisor.log_format == "text"
    assert load_settings(env=env).supervisor.metrics_listen == ""
    assert load_settings(env={**env, "SMSD_LOG_FORMAT": "JSON"}).supervisor.log_format == "json"
    assert load_settings(env={**env, "SMSD_METRICS_LISTEN": "[::1]:9108"}).supervisor.metrics_listen == "[::1]:9108"
    for var, value, words in (("SMSD_LOG_FORMAT", "xml", "supervisor.log_format"),
                              ("SMSD_METRICS_LISTEN", "9108", "supervisor.metrics_listen"),
                              ("SMSD_METRICS_LISTEN", "host:99999", "port out of range")):
        try:
            load_settings(env={**env, var: value})
        except ConfigError as exc:
            assert words in str(exc)
        else:
            raise AssertionError(f"{var}={value} accepted")
