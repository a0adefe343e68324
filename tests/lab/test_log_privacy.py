"""No SMS text, API key, phone number or account mask in smsd's logs, text or JSON, over a whole drill.

A drill (kills of every kind, LLM faults) makes smsd log the most it ever
does: crashes, restarts, quarantines, MongoDB down.  Every log it leaves is
read afterwards and searched for the fixtures' texts, the API key the LLM
server demanded, and the phone numbers and account masks found in the texts.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ..harness import REPO, fixture_lines

pytestmark = pytest.mark.slow

API_KEY = "sk-test-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
#: Account masks ("XX1234", "A/c *5678", "xxxx9012") and phone numbers (10+ digits) in SMS texts.
SECRETS_IN_TEXT = re.compile(r"[Xx*]{2,}\d{3,6}|\*\d{4,6}|\+?\d{10,}|\b\d{3,4}-\d{3,4}-\d{4}\b")


def _needles(texts: list[str]) -> list[str]:
    needles = {API_KEY}
    for text in texts:
        needles.add(text[:40])                    # the SMS body itself
        for m in SECRETS_IN_TEXT.finditer(text):
            needles.add(m.group(0))
    return sorted(n for n in needles if len(n) >= 5)


def _drill(tmp_path: Path, log_format: str) -> tuple[Path, subprocess.CompletedProcess]:
    work = tmp_path / log_format
    proc = subprocess.run(
        [sys.executable, "-m", "smsd.cli", "drill", "--users", "2", "--sms", "30", "--kills", "4",
         "--duration", "20", "--seed", "5", "--log-format", log_format, "--api-key", API_KEY,
         "--dir", str(work), "--json"],
        capture_output=True, text=True, timeout=240, cwd=str(REPO))
    return work, proc


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_drill_leaves_no_sms_text_key_phone_or_account_in_the_logs(tmp_path, log_format):
    work, proc = _drill(tmp_path, log_format)
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    assert report is not None and proc.returncode == 0 and report["ok"], proc.stderr[-3000:]
    logs = sorted(work.glob("smsd*.log"))
    assert logs, list(work.iterdir())
    text = "\n".join(p.read_text(errors="replace") for p in logs) + proc.stderr
    lines = [line for p in logs for line in p.read_text(errors="replace").splitlines() if line.strip()]
    assert len(lines) > 50   # it did log: workers, calls, kills, restarts
    if log_format == "json":
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue   # a dying process's half line, or a traceback's tail printed by Python itself
        assert len(records) >= 0.9 * len(lines)
        for r in records:
            assert {"ts", "level", "logger", "pid", "user_id", "call_id", "event"} <= set(r)
        assert any(r["user_id"] for r in records if r["logger"] == "smsd.llm")   # a worker binds its user
        assert any(isinstance(r.get("prompt_tokens"), int) for r in records)  # the figures of the event
    texts = [line["text"] for line in fixture_lines()]
    needles = _needles(texts)
    assert len(needles) > len(texts)   # the bodies, the key, and masks/numbers from the texts
    found = [n for n in needles if n in text]
    assert found == [], found[:10]
