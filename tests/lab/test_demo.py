"""``smsd demo`` end to end, and the embedded MongoDB as ``smsd run`` supervises it.

The demo is run the way ``make demo`` runs it (a subprocess, no API key, no
MongoDB), in a temporary work directory.  Its summary is parsed: nothing lost
or duplicated, transactions stored, exactly the malformed SMS quarantined.
Afterwards no process of it may remain, and no SMS text may have been printed.
"""
from __future__ import annotations

import pytest

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from smsd.lab import demo, demo_seed

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMSD_") and k != "OPENAI_API_KEY"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line mentions ``text`` (a test's own work directory)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if any(text in part for part in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _sms_texts() -> list[str]:
    """Distinctive pieces of every text the demo seeds (fixtures and synthetic templates)."""
    texts = [line["text"] for line in demo_seed.fixture_lines()]
    pieces = [t[:40] for t in texts if len(t) >= 40]
    for _kind, template in demo_seed.SYNTHETIC:
        pieces += [part for part in re.split(r"\{\w+\}", template) if len(part) >= 25]
    return pieces


def _number(pattern: str, output: str) -> int:
    match = re.search(pattern, output, re.MULTILINE)
    assert match, f"summary line {pattern!r} missing from:\n{output}"
    return int(match.group(1))


def test_demo_processes_everything_survives_a_kill_and_leaves_nothing_running(tmp_path: Path) -> None:
    workdir = tmp_path / "demo"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "smsd.cli", "demo", "--workdir", str(workdir)],
                          env=_clean_env(), cwd=str(REPO), capture_output=True, text=True, timeout=150)
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert took < 90, f"the demo took {took:.0f} s"

    # The summary, parsed.
    assert _number(r"invariants\s+(\d+) lost", output) == 0
    assert _number(r"invariants\s+\d+ lost, (\d+) duplicated", output) == 0
    assert _number(r"transactions stored\s+(\d+)", output) > 0
    assert _number(r"SMS quarantined\s+(\d+)", output) == 2          # the 2 malformed documents (default)
    assert _number(r"SMS\s+(\d+) \(", output) == 5 * 60 + 2
    assert _number(r"users\s+(\d+)", output) == 5
    assert re.search(r"repeated calls\s+(0 \(no call was in flight|\d+ \(\d+ calls were in flight)", output), output
    assert "demo passed" in output
    bill = re.search(r"LLM bill\s+USD ([0-9.]+) \(repeated by the kill USD ([0-9.]+)", output)
    assert bill and float(bill.group(1)) > 0, output          # a figure to read, not money arithmetic
    # The crash happened, its children died with the supervisor, the second run finished.
    assert re.search(r"kill -9 \d+ \(the supervisor", output), output
    assert "are gone too" in output
    assert "USERS (5)" in output            # the real `smsctl status` table

    # Nothing of the demo runs any more: no smsd run, worker, embedded server or LLM server.
    assert not _processes_mentioning(str(workdir)), [p.info for p in _processes_mentioning(str(workdir))]
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, [(p.pid, p.cmdline()) for p in leftovers]

    # No SMS text reached the terminal, nor smsd's own log.
    log = (workdir / "smsd.log").read_text(errors="replace")
    for piece in _sms_texts():
        assert piece not in output, "SMS text printed by the demo"
        assert piece not in log, "SMS text in smsd's log"


def test_embedded_uri_without_the_executable_says_how_to_install(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'[mongo]\nuri = "embedded"\n[journal]\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[supervisor]\nruntime_dir = "{tmp_path / "run"}"\n')
    env = _clean_env(SMSD_SECANTUSD="/nonexistent")
    hint = "pip install 'smsd[embedded]'"
    for args in (["run"], ["once", "--user-id", "u1", "--quiet"]):
        done = subprocess.run([sys.executable, "-m", "smsd.cli", "--config", str(config), *args],
                              env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
        assert done.returncode != 0, (args, done.stdout, done.stderr)
        assert hint in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)
    done = subprocess.run([sys.executable, "-m", "smsd.cli", "demo", "--workdir", str(tmp_path / "demo")],
                          env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert done.returncode == demo.EXIT_CANNOT_RUN, done.stdout + done.stderr
    assert hint in done.stderr
    assert not (tmp_path / "demo").exists()   # nothing was started or written


def test_demo_refuses_to_wipe_a_directory_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    done = subprocess.run([sys.executable, "-m", "smsd.cli", "demo", "--workdir", str(tmp_path)],
                          env=_clean_env(), cwd=str(REPO), capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "not wiping it" in done.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_supervisor_restarts_its_embedded_server_after_a_kill(tmp_path: Path) -> None:
    """``mongo.uri = "embedded"``: SIGKILL the server mid-run; the supervisor starts it again
    on the same port and storage, the workers carry on, and nothing is lost."""
    from smsd.embedded import free_port
    from smsd.lab.llmserver import LlmServer, rules_extractor

    plan = demo.Plan(workdir=tmp_path / "w", users=2, sms_per_user=40, malformed=1, latency_ms=200,
                     kill_at=0.5, timeout=90, real_llm=False, model="smsd-local")
    demo.prepare_workdir(plan.workdir)
    port = free_port()
    with LlmServer(rules_extractor(), latency_ms=plan.latency_ms) as server:
        plan.base_url = server.url
        demo.write_config(plan, port)
        docs, seeded = demo.build_documents(plan)
        demo.seed_database(plan, port, docs)
        run = demo.SmsdRun(plan, 1)
        progress = None
        try:
            run.wait_ready(60)
            progress = demo.Progress(f"mongodb://127.0.0.1:{port}/", seeded.users)
            deadline = time.monotonic() + 60
            while sum(progress.counts() or (0, 0)) < seeded.total // 3:
                assert time.monotonic() < deadline, "no progress"
                time.sleep(0.05)
            [old] = [p for p in demo._descendants(run.pid) if demo._is_embedded(p)]
            old.send_signal(signal.SIGKILL)
            deadline = time.monotonic() + 30
            new: list = []
            while not new:
                assert time.monotonic() < deadline, "the embedded server was not restarted"
                new = [p for p in demo._descendants(run.pid) if demo._is_embedded(p) and p.pid != old.pid]
                time.sleep(0.1)
            assert f"--port {port}" in " ".join(new[0].cmdline())
            deadline = time.monotonic() + 60
            while sum(progress.counts() or (0, 0)) < seeded.total:
                assert run.running(), "smsd run died"
                assert time.monotonic() < deadline, f"stuck at {progress.counts()}"
                time.sleep(0.1)
            demo.wait_settled(run, seeded.users, time.monotonic() + 30)
            progress.close()
            progress = None
            assert run.terminate(30) == 0
        finally:
            if progress:
                progress.close()
            run.terminate(10)
        billed = server.stats()["billed"]
    outcome = demo.check(plan, port, seeded, billed)
    assert outcome.ok, (outcome.report.violations, outcome.checks)
    assert outcome.report.sms_lost == 0 and outcome.report.tx_duplicated == 0
    log = plan.log.read_text(errors="replace")
    assert "embedded MongoDB-wire server died: restarting it" in log
    assert not _processes_mentioning(str(plan.workdir))
