"""The processes of ``smsd demo``: ``smsd run`` and ``smsctl``, and watching them work.

:class:`SmsdRun` starts, kills (``-9``) and drains one ``smsd run`` in its own
session; the helpers find its workers and embedded server and wait until they
are gone; :class:`Progress` and :func:`watch` count processed SMS straight from
MongoDB, :func:`wait_settled` waits for the supervisor to go idle.  Apart from
:mod:`smsd.lab.demo` because driving processes is a job of its own, shared by
the demo's run loop and its tests.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any, Callable

from .demo_plan import DB_NAME, DemoFailed, Out, Plan, _show


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Wait until none of ``pids`` runs; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if _alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if _alive(p)]
    return left


def _descendants(pid: int) -> list[Any]:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _is_embedded(proc: Any) -> bool:
    try:
        return any("secantusd" in part for part in proc.cmdline()[:2])
    except Exception:  # noqa: BLE001 - gone or unreadable
        return False


def child_env(plan: Plan) -> dict[str, str]:
    """The environment of ``smsd run`` and ``smsctl``: the demo's config, no stray overrides.

    Every ``SMSD_*`` variable of the caller's shell is dropped (a
    ``SMSD_MONGO_URI`` there must not send the demo to a real database); the
    API key and the LLM settings pass only in real-LLM mode.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SMSD_") and k not in ("OPENAI_API_KEY", "NOTIFY_SOCKET",
                                                      "STATE_DIRECTORY", "RUNTIME_DIRECTORY",
                                                      "CREDENTIALS_DIRECTORY")}
    if os.environ.get("SMSD_SECANTUSD"):
        env["SMSD_SECANTUSD"] = os.environ["SMSD_SECANTUSD"]
    if plan.real_llm:
        env["OPENAI_API_KEY"] = os.environ["OPENAI_API_KEY"]
    env["SMSD_CONFIG"] = str(plan.config)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class SmsdRun:
    """One ``smsd run`` subprocess in its own session, logging to the demo's log file."""

    def __init__(self, plan: Plan, number: int) -> None:
        self.plan = plan
        self.number = number
        with open(plan.log, "ab") as log:
            log.write(f"\n===== smsd run #{number} =====\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smsd.cli", "--config", str(plan.config), "run"],
                cwd=str(plan.workdir), env=child_env(plan), stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc.poll() is None

    def status(self, timeout: float = 5.0) -> dict | None:
        """``smsctl status --json`` as a dict, or ``None`` while it does not answer."""
        from .. import control
        try:
            return control.request(self.plan.socket, "status", {}, timeout=timeout)
        except (control.ControlClientError, OSError):
            return None

    def wait_ready(self, timeout: float) -> dict:
        """Wait until the supervisor answers on its control socket with MongoDB up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise DemoFailed(f"smsd run exited with code {self.proc.returncode} at start-up; "
                                 f"see {_show(self.plan.log)}")
            reply = self.status(timeout=2.0)
            if reply and (reply.get("mongo") or {}).get("ok"):
                return reply
            time.sleep(0.1)
        raise DemoFailed(f"smsd run did not become ready within {timeout:.0f} s; "
                         f"see {_show(self.plan.log)}")

    def kill9(self) -> int:
        """SIGKILL the supervisor alone (not its group): its children must die by themselves."""
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait()

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM (drain), wait; SIGKILL the whole group after ``timeout``."""
        if self.running():
            try:
                self.proc.send_signal(signal.SIGTERM)
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        return self.proc.poll()

    def kill_group(self) -> None:
        """Last resort: SIGKILL the supervisor's whole session and reap it."""
        for pid in [self.proc.pid] + [p.pid for p in _descendants(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


# --------------------------------------------------------------------------- watching

class Progress:
    """Counts processed and quarantined SMS straight from MongoDB (the ground truth)."""

    def __init__(self, uri: str, users: list[str]) -> None:
        import pymongo
        self.client = pymongo.MongoClient(uri, directConnection=True, serverSelectionTimeoutMS=500,
                                          connectTimeoutMS=500, socketTimeoutMS=2000)
        self.raw = self.client[DB_NAME]["sms_fin_rawdata"]
        self.users = users

    def counts(self) -> tuple[int, int] | None:
        """``(processed, quarantined)``, or ``None`` while MongoDB does not answer."""
        from pymongo.errors import PyMongoError
        try:
            processed = self.raw.count_documents({"user_id": {"$in": self.users}, "isprocessed": True})
            quarantined = self.raw.count_documents({"user_id": {"$in": self.users},
                                                    "isprocessed": {"$ne": True},
                                                    "smsd_quarantine": {"$exists": True}})
        except PyMongoError:
            return None
        return processed, quarantined

    def close(self) -> None:
        self.client.close()


def watch(run: SmsdRun, progress: Progress, total: int, out: Out, *, until: Callable[[int], bool],
          deadline: float, every: float = 1.0) -> int:
    """Print ``processed X/N`` about every ``every`` s until ``until(done)``; return ``done``."""
    last_print, last_done = 0.0, -1
    while True:
        if not run.running():
            raise DemoFailed(f"smsd run exited unexpectedly (code {run.proc.returncode}); "
                             f"see {_show(run.plan.log)}")
        counts = progress.counts()
        done = sum(counts) if counts else last_done
        now = time.monotonic()
        if counts and done != last_done and (now - last_print >= every or until(done)):
            processed, quarantined = counts
            out(f"processed {processed}/{total}" + (f", quarantined {quarantined}" if quarantined else ""))
            last_print, last_done = now, done
        if counts and until(done):
            return done
        if now > deadline:
            raise DemoFailed(f"timed out at {max(done, 0)}/{total} SMS; see {_show(run.plan.log)}")
        time.sleep(0.1)


def wait_settled(run: SmsdRun, users: list[str], deadline: float) -> dict:
    """Wait until the supervisor reports every user finished, no worker and no journal backlog."""
    reply: dict | None = None
    while time.monotonic() < deadline:
        reply = run.status()
        if reply:
            states = {u["user_id"]: u.get("status") for u in reply.get("users") or []}
            finished = all(states.get(u) in ("completed", "quarantined") for u in users)
            if finished and not reply.get("workers") and not (reply.get("journal") or {}).get("unflushed"):
                return reply
        time.sleep(0.2)
    raise DemoFailed("smsd did not settle (users finished, no workers, empty journal backlog) in time")


def smsctl_status(plan: Plan) -> str:
    """The real ``smsctl status`` table (a subprocess, as an operator would run it)."""
    done = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(plan.socket), "status"],
                          env=child_env(plan), capture_output=True, text=True, timeout=30)
    return done.stdout if done.returncode == 0 else f"(smsctl status exited {done.returncode}: {done.stderr.strip()})"
