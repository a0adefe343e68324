"""Boot a real systemd in a throw-away container, for tests of smsd.service.

The container is the host's own ``/usr`` on a tmpfs root::

    systemd-nspawn --directory=/ --volatile=yes --boot --register=no
                   --keep-unit --machine=NAME --console=read-only
                   --link-journal=no
                   --bind-ro=PRESET:/etc/systemd/system-preset/00-smsd-nspawn.preset
                   --bind=SCRATCH:/run/nspawn-scratch  [--bind-ro=P ...] [--bind=P ...]
                   systemd.firstboot=off systemd.show_status=false

* ``--volatile=yes`` with ``-D /``: the root is a fresh tmpfs, only ``/usr``
  comes from the host (read-only). ``/etc``, ``/var``, ``/root``, ``/home``
  start empty; systemd populates ``/etc`` on this "first boot".
* the preset file ("disable *") keeps systemd from enabling every unit that
  happens to be installed in the host's ``/usr`` (a host ``mongod.service``
  or ``ssh.socket`` would otherwise start and grab ports on the shared
  network). Static units (journald, sysusers, tmpfiles...) still run.
* no ``--private-network``: the container shares the host's network
  namespace, so a service inside reaches servers on the host's 127.0.0.1.
* ``--register=no --keep-unit``: no machined / no transient scope on the
  host, which works on hosts whose PID 1 is not systemd. On such hosts
  nspawn would create ``payload``/``supervisor`` cgroups next to itself, in
  the root cgroup; the harness first moves nspawn into its own cgroup
  (``nspawn-NAME``) in the ``name=systemd`` and cgroup2 hierarchies so
  that two containers never share a tree, and removes it afterwards.

Commands run inside through ``nsenter -t INIT_PID -a`` with a clean
environment (``machinectl`` and ``systemctl -M`` need machined: not used).
After boot the harness writes a minimal ``/etc/hosts`` (the volatile /etc
has none, so "localhost" would not resolve).

Public API (for tests)::

    reason = nspawn_unavailable_reason()        # None, or why not: pytest.skip(reason)
    with Container().start(binds=python_binds(ROOT), rw_binds=[], timeout=60) as c:
        c.run(["id"]) -> CompletedProcess        # as root; check=True raises ContainerCommandError
        c.run("echo $HOSTNAME", check=False)     # a string goes through sh -c
        c.systemctl("start", "x.service")        # Type=notify: returns after READY=1
        c.show("x.service", "MainPID") -> "123"
        c.wait_prop("x.service", "ActiveState", "active", timeout=15)
        c.wait_for(lambda: ..., timeout=10, what="...")
        c.journal("x.service") -> str
        c.write_file("/etc/x", "text", mode=0o644)
        c.copy_in(host_path, container_path)
        c.install_unit("x.service", text, dropins={"10-test.conf": "..."})  # + daemon-reload
        c.add_user("smsd")                        # useradd --system --user-group
        c.host_pid(container_pid) -> host pid     # e.g. to check a process is gone
        c.scratch / c.scratch_in                  # a rw dir: host path / path inside
        c.log_tail()                              # nspawn's console output (boot errors)
    service_dropin(exec_start=..., environment={...},
                   readable_paths=python_binds(ROOT), extra=["WatchdogSec=5"]) -> str
    # stop() (also on __exit__, atexit, and SIGTERM to nspawn if the test
    # process dies) powers off, kills after a timeout, and always removes
    # the work dir and cgroups; SMSD_NSPAWN_KEEP=1 keeps the work dir.
"""
from __future__ import annotations

import atexit
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

__all__ = [
    "Container",
    "ContainerCommandError",
    "NspawnError",
    "nspawn_unavailable_reason",
    "python_binds",
    "service_dropin",
]

NSPAWN = "systemd-nspawn"
SCRATCH_IN = "/run/nspawn-scratch"
PRESET_IN = "/etc/systemd/system-preset/00-smsd-nspawn.preset"
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_LOG_COLOR": "0",
}
_PR_SET_PDEATHSIG = 1


class NspawnError(RuntimeError):
    """The container could not be booted or stopped."""


class ContainerCommandError(subprocess.CalledProcessError):
    """A command inside the container exited non-zero (output included)."""

    def __str__(self) -> str:  # pragma: no cover - message only
        cmd = self.cmd if isinstance(self.cmd, str) else shlex.join(self.cmd)
        return (
            f"in container: {cmd!r} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


# ---------------------------------------------------------------- helpers


def python_binds(*extra: str | os.PathLike) -> list[str]:
    """Read-only binds that make this interpreter usable inside the container.

    The venv (``sys.prefix``) and its base interpreter (``sys.base_prefix``,
    e.g. a pyenv build under /root/.pyenv) at the same paths, minus anything
    under /usr (already there). ``extra`` paths (the project dir) are added.
    """
    paths = []
    for p in (sys.prefix, sys.base_prefix, *extra):
        rp = os.path.realpath(p)
        if rp == "/usr" or rp.startswith("/usr/"):
            continue
        paths.append(rp)
    out: list[str] = []
    for p in sorted(set(paths), key=len):  # drop paths covered by a parent
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def _host_runs_systemd() -> bool:
    return os.path.isdir("/run/systemd/system")


def _cgroup_roots() -> list[str]:
    """Our cgroup directory in the cgroup2 and name=systemd hierarchies."""
    current: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _hid, ctrls, path = line.rstrip("\n").split(":", 2)
            current[ctrls] = path
    roots: list[str] = []
    seen: set[str] = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            fstype, opts = parts[sep + 1], parts[sep + 3].split(",")
            mnt_root, mnt = parts[3], parts[4]
            if fstype == "cgroup2":
                key = ""
            elif fstype == "cgroup" and "name=systemd" in opts:
                key = "name=systemd"
            else:
                continue
            if key in seen or key not in current or mnt_root != "/":
                continue
            seen.add(key)
            roots.append(os.path.join(mnt, current[key].lstrip("/")))
    return roots


def _rmdir_tree(path: str) -> bool:
    """rmdir a cgroup tree bottom-up; True when it is gone."""
    if not os.path.isdir(path):
        return True
    for dirpath, _dirs, _files in sorted(os.walk(path), key=lambda t: -len(t[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
    return not os.path.isdir(path)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid:
            out.append(int(entry))
    return out


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def _same_pidns(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return True


_live: "set[Container]" = set()


@atexit.register
def _stop_all() -> None:  # pragma: no cover - safety net
    for c in list(_live):
        try:
            c.stop()
        except Exception:
            pass


# ---------------------------------------------------------------- container


class Container:
    """A booted systemd (host /usr, tmpfs root) driven through nsenter."""

    def __init__(self, name: str | None = None, *, kernel_args: Sequence[str] = ()):
        self.name = name or f"smsd-t{os.getpid()}-{secrets.token_hex(3)}"
        self.kernel_args = list(kernel_args)
        self.workdir: Path | None = None
        self.scratch: Path | None = None  # host side of SCRATCH_IN
        self.scratch_in = SCRATCH_IN
        self.log_path: Path | None = None
        self.proc: subprocess.Popen | None = None
        self.init_pid: int | None = None  # host PID of the container's systemd
        self._cgroups: list[str] = []
        self._log = None

    # -- lifecycle --------------------------------------------------------

    def command(self, binds: Iterable[str] = (), rw_binds: Iterable[str] = ()) -> list[str]:
        """The systemd-nspawn command line (workdir must exist)."""
        assert self.workdir and self.scratch
        cmd = [
            NSPAWN,
            "--directory=/",
            "--volatile=yes",
            "--boot",
            "--register=no",
            "--keep-unit",
            f"--machine={self.name}",
            "--console=read-only",
            "--link-journal=no",
            f"--bind-ro={self.workdir / 'preset'}:{PRESET_IN}",
            f"--bind={self.scratch}:{SCRATCH_IN}",
        ]
        for b in binds:
            cmd.append(f"--bind-ro={_bind_spec(b)}")
        for b in rw_binds:
            cmd.append(f"--bind={_bind_spec(b)}")
        cmd += ["systemd.firstboot=off", "systemd.show_status=false", *self.kernel_args]
        return cmd

    def start(
        self,
        binds: Iterable[str] = (),
        rw_binds: Iterable[str] = (),
        timeout: float = 60,
    ) -> "Container":
        """Boot and wait until ``systemctl is-system-running`` is running/degraded.

        ``binds`` are bound read-only, ``rw_binds`` read-write; each is a host
        path (same path inside) or ``"HOST:CONTAINER"``.
        """
        if self.proc is not None:
            raise NspawnError("container already started")
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        self.scratch = self.workdir / "scratch"
        self.scratch.mkdir()
        (self.workdir / "preset").write_text(
            "# smsd test container: start only what the tests start\ndisable *\n"
        )
        self.log_path = self.workdir / "nspawn.log"
        self._log = open(self.log_path, "wb")
        self._cgroups = self._make_cgroups()
        cmd = self.command(binds, rw_binds)
        cgroups = list(self._cgroups)

        def preexec() -> None:  # runs in the child, before exec
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # nspawn powers off
            for cg in cgroups:
                fd = os.open(os.path.join(cg, "cgroup.procs"), os.O_WRONLY)
                try:
                    os.write(fd, b"0")
                finally:
                    os.close(fd)

        _live.add(self)
        deadline = time.monotonic() + timeout
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec,
                close_fds=True,
            )
            self.init_pid = self._find_init(deadline)
            self._wait_running(deadline)
            # The volatile /etc has no hosts file: without it "localhost"
            # does not resolve (glibc falls back to DNS only).
            self.run(["sh", "-c", '[ -e /etc/hosts ] || printf "%s\\n" '
                      '"127.0.0.1 localhost" "::1 localhost ip6-localhost ip6-loopback" '
                      '"127.0.1.1 $(hostname)" > /etc/hosts'])
        except BaseException:
            self.stop()
            raise
        return self

    def _make_cgroups(self) -> list[str]:
        if _host_runs_systemd():
            return []
        made = []
        for root in _cgroup_roots():
            path = os.path.join(root, f"nspawn-{self.name}")
            try:
                os.mkdir(path)
            except OSError:
                continue
            made.append(path)
        return made

    def _find_init(self, deadline: float) -> int:
        assert self.proc
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NspawnError(f"systemd-nspawn exited {self.proc.returncode}\n{self.log_tail()}")
            for pid in _children(self.proc.pid):
                if not _same_pidns(pid) and _comm(pid) == "systemd":
                    return pid
            time.sleep(0.05)
        raise NspawnError(f"no container init after timeout\n{self.log_tail()}")

    def _wait_running(self, deadline: float) -> None:
        state = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NspawnError(f"systemd-nspawn exited {self.proc.returncode}\n{self.log_tail()}")
            r = self.run(["systemctl", "is-system-running"], check=False, timeout=10)
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return
            if state in ("maintenance", "stopping"):
                break
            time.sleep(0.2)
        raise NspawnError(f"container not running (state {state!r})\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        """Power off (SIGRTMIN+3 to the container's systemd), kill after
        ``timeout``; always remove the cgroups and the work directory."""
        _live.discard(self)
        try:
            if self.proc is not None and self.proc.poll() is None:
                if self.init_pid and _comm(self.init_pid):
                    try:
                        os.kill(self.init_pid, signal.SIGRTMIN + 3)
                    except ProcessLookupError:
                        pass
                else:
                    self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    if self.init_pid:  # PID 1 gone: the kernel kills the namespace
                        try:
                            os.kill(self.init_pid, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait(10)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None
            for cg in self._cgroups:
                for _ in range(50):
                    if _rmdir_tree(cg):
                        break
                    time.sleep(0.1)
            self._cgroups = []
            propagate = f"/run/systemd/nspawn/propagate/{self.name}"
            if os.path.isdir(propagate):
                try:
                    os.rmdir(propagate)
                except OSError:
                    pass
            if self.workdir is not None and not os.environ.get("SMSD_NSPAWN_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)
            self.init_pid = None

    def __enter__(self) -> "Container":
        if self.proc is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The end of systemd-nspawn's own output (boot messages, errors)."""
        if not self.log_path or not self.log_path.exists():
            return ""
        text = self.log_path.read_bytes().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    # -- commands inside --------------------------------------------------

    def run(
        self,
        cmd: Sequence[str] | str,
        check: bool = True,
        timeout: float = 60,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` (list, or a string for ``sh -c``) in the container as
        root with a clean environment; stdout/stderr captured as text."""
        if self.init_pid is None:
            raise NspawnError("container not started")
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = ["nsenter", "-t", str(self.init_pid), "-a", *argv]
        binary = isinstance(input, bytes)
        r = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=not binary,
            timeout=timeout,
            env={**CLEAN_ENV, **(env or {})},
        )
        if binary:
            r = subprocess.CompletedProcess(
                r.args, r.returncode,
                r.stdout.decode("utf-8", "replace"), r.stderr.decode("utf-8", "replace"),
            )
        r.args = argv
        if check and r.returncode != 0:
            raise ContainerCommandError(r.returncode, argv, r.stdout, r.stderr)
        return r

    def systemctl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", "--no-ask-password", *args], check=check, timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        """One property value, e.g. ``show("smsd.service", "MainPID") -> "42"``."""
        return self.systemctl("show", "-P", prop, unit).stdout.strip()

    def journal(self, unit: str | None = None, lines: int | None = None) -> str:
        args = ["journalctl", "--no-pager", "-o", "short-monotonic"]
        if unit:
            args += ["-u", unit]
        if lines:
            args += ["-n", str(lines)]
        return self.run(args, check=False).stdout

    def write_file(self, path: str, data: str | bytes, mode: int = 0o644, owner: str | None = None) -> None:
        """Create/replace ``path`` in the container (parents created)."""
        script = 'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"'
        if owner:
            script += ' && chown "$3" "$1"'
        payload = data.encode() if isinstance(data, str) else data
        self.run(["sh", "-c", script, "sh", path, format(mode, "o"), owner or ""], input=payload)

    def copy_in(self, host_path: str | os.PathLike, container_path: str, mode: int | None = None) -> None:
        """Copy one host file into the container (via nsenter + cat)."""
        host_path = Path(host_path)
        self.write_file(
            container_path,
            host_path.read_bytes(),
            mode if mode is not None else host_path.stat().st_mode & 0o7777,
        )

    def install_unit(self, name: str, text: str | None = None, dropins: dict[str, str] | None = None,
                     reload: bool = True) -> None:
        """Write /etc/systemd/system/NAME (if ``text``) and NAME.d/*.conf
        drop-ins, then ``daemon-reload``."""
        if text is not None:
            self.write_file(f"/etc/systemd/system/{name}", text)
        for fname, body in (dropins or {}).items():
            self.write_file(f"/etc/systemd/system/{name}.d/{fname}", body)
        if reload:
            self.systemctl("daemon-reload")

    def add_user(self, name: str, home: str | None = None) -> None:
        """``useradd --system`` (with a group of the same name) inside; works
        on the volatile root because systemd-sysusers created /etc/passwd."""
        r = self.run(["id", "-u", name], check=False)
        if r.returncode == 0:
            return
        self.run(["useradd", "--system", "--user-group", "--no-create-home",
                  "--home-dir", home or "/nonexistent", "--shell", "/usr/sbin/nologin", name])

    def wait_for(self, predicate: Callable[[], object], timeout: float = 30, interval: float = 0.2,
                 what: str = "condition") -> object:
        """Poll ``predicate`` until it returns a truthy value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = predicate()
            if last:
                return last
            time.sleep(interval)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")

    def wait_prop(self, unit: str, prop: str, value: str, timeout: float = 30) -> None:
        """Wait until ``show(unit, prop) == value``."""
        self.wait_for(lambda: self.show(unit, prop) == value, timeout,
                      what=f"{unit} {prop}={value} (now {self.show(unit, prop)!r})")

    def host_pid(self, container_pid: int) -> int | None:
        """The host PID of a process known inside as ``container_pid``."""
        if self.init_pid is None:
            return None
        ns = os.readlink(f"/proc/{self.init_pid}/ns/pid")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") != ns:
                    continue
                with open(f"/proc/{entry}/status") as f:
                    for line in f:
                        if line.startswith("NSpid:"):
                            ids = line.split()[1:]
                            if ids and int(ids[-1]) == container_pid:
                                return int(entry)
            except OSError:
                continue
        return None


def service_dropin(
    exec_start: str | None = None,
    environment: dict[str, str] | None = None,
    readable_paths: Iterable[str] = (),
    extra: Iterable[str] = (),
) -> str:
    """A ``[Service]`` drop-in that adapts a hardened unit to the container.

    ``exec_start`` replaces ExecStart (the list is reset first).
    ``environment`` becomes Environment= lines (values must not hold
    spaces or quotes). ``readable_paths`` are the binds the service must
    read (e.g. ``python_binds()``): those under /root or /home are hidden by
    ProtectHome=yes, so they get ``ProtectHome=tmpfs`` plus
    ``BindReadOnlyPaths=`` (the unit's other settings stay as shipped).
    ``extra`` lines are appended verbatim (``WatchdogSec=5``...).
    """
    lines = ["[Service]"]
    if exec_start is not None:
        lines += ["ExecStart=", f"ExecStart={exec_start}"]
    for k, v in (environment or {}).items():
        if any(ch in v for ch in " \t\"'\\"):
            raise ValueError(f"environment value for {k} needs quoting: {v!r}")
        lines.append(f"Environment={k}={v}")
    dests = [os.fspath(p).split(":", 1)[-1] for p in readable_paths]
    home = [d for d in dests if d in ("/root", "/home") or d.startswith(("/root/", "/home/"))]
    # A checkout under /tmp (CI clones anywhere) is hidden by PrivateTmp=yes the same way.
    tmp = [d for d in dests if d.startswith(("/tmp/", "/var/tmp/"))]
    if home:
        lines.append("ProtectHome=tmpfs")
    if home or tmp:
        lines.append("BindReadOnlyPaths=" + " ".join(home + tmp))
    lines += list(extra)
    return "\n".join(lines) + "\n"


def _bind_spec(b: str | os.PathLike) -> str:
    s = os.fspath(b)
    return s if ":" in s else f"{s}:{s}"


# ---------------------------------------------------------------- availability

_reason_cache: dict[bool, str | None] = {}


def nspawn_unavailable_reason(boot: bool = True) -> str | None:
    """Why a container cannot be booted here, or None when it can.

    Cheap checks first (root, binaries, systemd in /usr); with ``boot`` a
    real container is booted once per process (cached) and the failure,
    with nspawn's output, is the reason.
    """
    if boot in _reason_cache:
        return _reason_cache[boot]
    reason = _static_reason()
    if reason is None and boot:
        c = Container()
        try:
            c.start(timeout=60)
        except Exception as exc:  # noqa: BLE001 - the message is the point
            reason = f"booting systemd in systemd-nspawn failed: {exc}"
        finally:
            c.stop()
    _reason_cache[boot] = reason
    return reason


def _static_reason() -> str | None:
    if sys.platform != "linux":
        return f"systemd-nspawn needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"systemd-nspawn needs root (running as uid {os.geteuid()})"
    if shutil.which(NSPAWN) is None:
        return ("systemd-nspawn is not installed (Debian package systemd-container; "
                "run scripts/install-test-deps.sh)")
    if shutil.which("nsenter") is None:
        return "nsenter is not installed (Debian package util-linux)"
    if not os.access("/usr/lib/systemd/systemd", os.X_OK):
        return "no /usr/lib/systemd/systemd on this host: nothing to boot"
    return None


def booted_container(pytestconfig, binds: Iterable[str], timeout: float = 60) -> "Container":
    """A started Container, or ``pytest.skip`` with the reason printed (never silently)."""
    import contextlib
    import sys

    import pytest

    reason = nspawn_unavailable_reason()
    if reason:
        capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
        ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with ctx:
            sys.stderr.write(f"\nSKIP nspawn tests: {reason}\n")
        pytest.skip(reason)
    return Container().start(binds=binds, timeout=timeout)
