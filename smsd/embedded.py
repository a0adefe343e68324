"""Start and stop an embedded MongoDB-wire server (``secantusd-py``) as a subprocess.

SecantusDB is GPL-2.0-only, so smsd never imports it: this module only runs
its ``secantusd-py`` executable as a separate process, the same way one would
run ``mongod``.  It is used by the tests (a real wire-protocol server, killed
with SIGKILL in crash tests and restarted on the same port and storage), by
``smsd demo`` and by the drills.

The server advertises itself as the primary of a one-node replica set named
``secantus`` (so ``w: "majority"`` is the write concern the store picks).
"""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO

log = logging.getLogger("smsd.embedded")

EXECUTABLE = "secantusd-py"
INSTALL_HINT = "install the extra: `pip install 'smsd[embedded]'`"

_PR_SET_PDEATHSIG = 1


class EmbeddedUnavailable(RuntimeError):
    """The ``secantusd-py`` executable is not installed."""


class EmbeddedError(RuntimeError):
    """The embedded server did not start (exited early, port taken, timeout)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def find_executable() -> str:
    """Path of ``secantusd-py``: next to ``sys.executable`` first, then on ``PATH``.

    ``SMSD_SECANTUSD`` (an explicit path) wins over both.

    Raises:
        EmbeddedUnavailable: the executable is not installed.
    """
    explicit = os.environ.get("SMSD_SECANTUSD")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise EmbeddedUnavailable(f"SMSD_SECANTUSD={explicit!r} is not an executable; {INSTALL_HINT}")
    beside = Path(sys.executable).parent / EXECUTABLE
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(EXECUTABLE)
    if found:
        return found
    raise EmbeddedUnavailable(f"{EXECUTABLE} not found; {INSTALL_HINT}")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except Exception:  # pragma: no cover - non-Linux
        pass


class EmbeddedMongo:
    """One ``secantusd-py`` server process on a loopback port.

    ``start()`` may be called again after ``stop()`` or ``kill()``: the new
    process reuses the same port and storage directory, so the data written
    before (with a journaled write concern) is still there.
    """

    def __init__(
        self,
        storage_path: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        *,
        log_level: str = "WARNING",
        sync_on_commit: bool = False,
        die_with_parent: bool = True,
        extra_args: list[str] | None = None,
    ) -> None:
        """Describe the server; nothing runs until :meth:`start`.

        Args:
            storage_path: WiredTiger home directory (created if missing).
            host: interface to listen on (loopback by default).
            port: TCP port; ``None`` picks a free one now and keeps it for restarts.
            log_path: file for the server's stdout/stderr (appended to); ``None``
                discards them.
            log_level: the server's ``--log-level``.
            sync_on_commit: pass ``--sync-on-commit`` (fsync the WiredTiger log
                on every commit: survives power loss, not only a process kill).
            die_with_parent: the server gets SIGTERM when this process dies
                (Linux ``PR_SET_PDEATHSIG``), so a killed test run leaves no
                orphan server behind.
            extra_args: more command-line flags for ``secantusd-py``.
        """
        self.storage_path = Path(storage_path)
        self.host = host
        self.port = int(port) if port else free_port(host if host not in ("0.0.0.0", "") else "127.0.0.1")
        self.log_path = Path(log_path) if log_path is not None else None
        self.log_level = log_level
        self.sync_on_commit = sync_on_commit
        self.die_with_parent = die_with_parent
        self.extra_args = list(extra_args or [])
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._config_path: str | None = None

    # -- properties ---------------------------------------------------------
    @property
    def uri(self) -> str:
        """``mongodb://host:port/`` of this server (valid whether or not it runs)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"mongodb://{host}:{self.port}/"

    @property
    def pid(self) -> int | None:
        """PID of the current server process, or ``None`` if never started."""
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        """True while the server process runs."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------
    def start(self, timeout: float = 30) -> str:
        """Start the server and wait until it answers a ``ping``; return :attr:`uri`.

        Raises:
            EmbeddedUnavailable: ``secantusd-py`` is not installed.
            EmbeddedError: the process exited, the port stayed taken, or no
                ping answered within ``timeout`` seconds.
        """
        if self.alive():
            return self.uri
        exe = find_executable()
        deadline = time.monotonic() + timeout
        # After a kill the old listener is gone at once; wait briefly anyway,
        # and never ping a server that is not ours.
        while not _port_is_free(self._bind_host(), self.port):
            if time.monotonic() >= deadline:
                raise EmbeddedError(f"port {self.port} on {self.host} is in use by another process")
            time.sleep(0.05)
        self.storage_path.mkdir(parents=True, exist_ok=True)
        if self._config_path is None:
            # An explicit empty config: no auto-discovered ./secantusd.toml or
            # ~/.secantus/secantusd.toml can change how the test server runs.
            fd, self._config_path = tempfile.mkstemp(prefix="smsd-secantusd-", suffix=".toml")
            os.close(fd)
        cmd = [exe, "--config", self._config_path, "--host", self.host, "--port", str(self.port),
               "--storage-path", str(self.storage_path), "--log-level", self.log_level]
        if self.sync_on_commit:
            cmd.append("--sync-on-commit")
        cmd.extend(self.extra_args)
        self._close_log()
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")
            out: IO[bytes] | int = self._log_file
        else:
            out = subprocess.DEVNULL
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
            preexec_fn=_die_with_parent if self.die_with_parent else None,
        )
        log.info("started %s pid=%s port=%s storage=%s", EXECUTABLE, self._proc.pid, self.port, self.storage_path)
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.kill()
            raise
        finally:
            # Free the ping clients (pymongo objects live in reference cycles) now:
            # a caller that forks next (the supervisor) must not hand them to its
            # children as garbage, which pymongo's at-fork hook trips over.
            gc.collect()
        return self.uri

    def _bind_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def _wait_ready(self, deadline: float) -> None:
        # Imported here: the supervisor imports smsd modules before forking
        # and must not have touched pymongo's machinery by then.
        import pymongo
        from pymongo.errors import PyMongoError

        assert self._proc is not None
        last_error: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                raise EmbeddedError(f"{EXECUTABLE} exited with code {code} before answering"
                                    + (f" (see {self.log_path})" if self.log_path else ""))
            client = pymongo.MongoClient(self.uri, directConnection=True, serverSelectionTimeoutMS=250,
                                         connectTimeoutMS=250, socketTimeoutMS=2000)
            try:
                client.admin.command("ping")
                status_pid = client.admin.command("serverStatus").get("pid")
                if status_pid is not None and int(status_pid) != self._proc.pid:
                    raise EmbeddedError(f"port {self.port} answered from pid {status_pid}, not ours")
                return
            except PyMongoError as exc:
                last_error = exc
            finally:
                client.close()
            if time.monotonic() >= deadline:
                raise EmbeddedError(f"{EXECUTABLE} did not answer on {self.uri}: {last_error}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s pid=%s ignored SIGTERM for %ss; killing", EXECUTABLE, proc.pid, timeout)
                proc.kill()
                proc.wait()
            except ProcessLookupError:
                pass
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL the server at once (crash tests) and reap it."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                # Its own session (start_new_session): the group is the server
                # and anything it may have spawned.
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                try:
                    proc.kill()
                except ProcessLookupError:
                    pass
            proc.wait()
        self._close_log()

    def restart(self, timeout: float = 30) -> str:
        """Stop (gracefully) if running, then start on the same port and storage."""
        self.stop()
        return self.start(timeout)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup(self) -> None:
        self._close_log()
        if self._config_path is not None:
            try:
                os.unlink(self._config_path)
            except FileNotFoundError:
                pass
            self._config_path = None

    def __enter__(self) -> "EmbeddedMongo":
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedMongo(uri={self.uri!r}, pid={self.pid}, storage={str(self.storage_path)!r})"
