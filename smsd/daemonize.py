"""Classic daemon mode for hosts without systemd (``smsd run --daemon``).

Under systemd none of this is used: the unit runs ``smsd run`` in the
foreground as a ``Type=notify`` service, and a double fork would make
systemd lose the main process. :func:`daemonize` notices systemd and
returns a no-op context (with a warning) instead.

Elsewhere :func:`daemonize` is a ``python-daemon`` ``DaemonContext``
(double fork, new session, umask, working directory, closed descriptors,
stdout/stderr to the log file) with :class:`PidFile`:

* the daemon holds an exclusive ``flock`` on the pidfile for its whole
  life, so "is smsd running?" never depends on a PID that may have been
  reused: a held lock means running;
* a second start refuses *before* detaching, in the foreground, with
  ``smsd already running with pid N`` (exit status 1) -- also when the
  recorded process is alive but (an old version) holds no lock;
* a pidfile left by a dead process is stale: it is taken over, with a
  warning in the log;
* the pidfile is removed when the daemon exits (normally or on SIGTERM).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from pathlib import Path
from typing import IO, Any, ContextManager, Iterable

log = logging.getLogger("smsd.daemonize")

__all__ = ["PidFile", "PidfileLocked", "daemonize", "pid_alive", "running_under_systemd"]


class PidfileLocked(SystemExit):
    """Another smsd already runs with this pidfile (exit status 1)."""

    def __init__(self, pidfile: Path, pid: int | None):
        self.pidfile = pidfile
        self.pid = pid
        who = f"pid {pid}" if pid else "an unknown pid"
        super().__init__(f"smsd already running with {who} (pidfile {pidfile})")


def running_under_systemd(env: dict[str, str] | None = None) -> bool:
    """True when systemd started this process as (part of) a service.

    ``$INVOCATION_ID`` (set for every unit since systemd 232) or
    ``$NOTIFY_SOCKET`` (Type=notify) is set, or the parent is PID 1 on a
    host booted with systemd (``/run/systemd/system`` exists).
    """
    env = os.environ if env is None else env
    if env.get("INVOCATION_ID") or env.get("NOTIFY_SOCKET"):
        return True
    return os.getppid() == 1 and os.path.isdir("/run/systemd/system")


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID exists (zombies count as dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except UnicodeDecodeError:
        return None
    try:
        return int(text.split()[0]) if text else None
    except ValueError:
        return None


class PidFile:
    """A pidfile guarded by an exclusive ``flock``; a ``DaemonContext``
    ``pidfile`` (a context manager entered in the daemon after the fork)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(os.path.abspath(path))
        self._fd: int | None = None

    # -- checks (any process) ----------------------------------------------
    def read_pid(self) -> int | None:
        return _read_pid(self.path)

    def is_locked(self) -> bool:
        """Some process holds the lock (a running smsd)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # also drops our shared lock
        return False

    def check(self) -> None:
        """Refuse (:class:`PidfileLocked`) if a live smsd owns the pidfile;
        remove it if it is stale. Run in the foreground, before detaching."""
        if not self.path.exists():
            return
        pid = self.read_pid()
        if self.is_locked():
            raise PidfileLocked(self.path, pid)
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            # No lock, but the recorded process lives: an older smsd, or a
            # reused PID. Refuse; the operator can tell which and remove it.
            raise PidfileLocked(self.path, pid)
        log.warning("removing stale pidfile %s (pid %s is not running)", self.path, pid)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    # -- ownership (the daemon) --------------------------------------------
    def acquire(self) -> None:
        """Lock the pidfile and write our PID; :class:`PidfileLocked` if
        another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PidfileLocked(self.path, self.read_pid()) from None
            # The file may have been unlinked/replaced between open and
            # flock (its owner exiting): then our lock guards nothing.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read_pid(self.path)
        if old is not None and old != os.getpid() and pid_alive(old):
            os.close(fd)
            raise PidfileLocked(self.path, old)
        os.fchmod(fd, 0o644)  # readable by anyone, whatever the umask
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the pidfile (still locked, so no one can be mid-takeover)."""
        if self._fd is None:
            return
        try:
            if _read_pid(self.path) == os.getpid():
                self.path.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove pidfile %s: %s", self.path, exc)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "PidFile":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class _Daemon:
    """``daemonize()``'s context: check in the foreground, then detach."""

    def __init__(self, pidfile: PidFile, log_file: Path, working_directory: str,
                 files_preserve: Iterable[Any], umask: int):
        self.pidfile = pidfile
        self.log_file = log_file
        self.working_directory = working_directory
        self.files_preserve = list(files_preserve)
        self.umask = umask
        self._ctx = None
        self._log_stream: IO[str] | None = None

    def __enter__(self) -> "_Daemon":
        import daemon  # python-daemon

        self.pidfile.check()  # refuse here, while the terminal still sees us
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_stream = open(self.log_file, "a", buffering=1, encoding="utf-8")
        self._ctx = daemon.DaemonContext(
            working_directory=self.working_directory,
            umask=self.umask,
            pidfile=self.pidfile,
            detach_process=True,  # even when started by init: --daemon was asked for
            stdin=None,           # /dev/null
            stdout=self._log_stream,
            stderr=self._log_stream,
            files_preserve=[*self.files_preserve, self._log_stream],
        )
        try:
            self._ctx.open()
        except PidfileLocked as exc:
            # Lost a race after check(): the message goes to the log file.
            log.error("%s", exc)
            raise
        log.info("daemonized: pid %d, pidfile %s, log %s", os.getpid(), self.pidfile.path, self.log_file)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._ctx is not None:
            self._ctx.close()  # releases the pidfile
        if self._log_stream is not None:
            with contextlib.suppress(OSError):
                self._log_stream.flush()


def daemonize(
    pidfile: str | os.PathLike[str],
    log_file: str | os.PathLike[str],
    *,
    working_directory: str = "/",
    files_preserve: Iterable[Any] = (),
    umask: int = 0o027,
) -> ContextManager[Any]:
    """Become a classic daemon for the duration of the ``with`` block.

    ``with daemonize(Path("/run/smsd/smsd.pid"), Path("/var/log/smsd.log"),
    files_preserve=[handler.stream]): Supervisor(settings).run()``

    * refuses with :class:`PidfileLocked` (a ``SystemExit``: message on the
      terminal, exit status 1) when smsd already runs with this pidfile;
    * takes over a stale pidfile (its process is dead);
    * detaches (double fork, setsid), chdirs to ``working_directory``,
      closes every descriptor except ``files_preserve`` (pass the logging
      handlers' streams) and sends stdout/stderr to ``log_file``;
    * removes the pidfile on exit, including SIGTERM (python-daemon turns it
      into ``SystemExit`` unless the program installs its own handler).

    Under systemd it does nothing (no fork, no pidfile) and logs a warning:
    systemd supervises the foreground process itself.
    """
    if running_under_systemd():
        log.warning("--daemon ignored: running under systemd, which supervises the "
                    "foreground process (no double fork, no pidfile)")
        return contextlib.nullcontext()
    return _Daemon(PidFile(pidfile), Path(os.path.abspath(log_file)), working_directory,
                   files_preserve, umask)
