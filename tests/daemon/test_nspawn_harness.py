"""The nspawn harness boots a real systemd, and smsd.service's directives
work there.

A tiny Type=notify service (stdlib socket code, written into the container)
proves what the real smsd test will rely on: `systemctl start` waits for
READY=1, a SIGKILLed main process is restarted (and its children die with
it: KillMode=mixed), a service that stops pinging is killed by the watchdog
and restarted, `systemctl stop` lets it drain.

Then the shipped systemd/smsd.service runs the same script as a stand-in
for `smsd run` through a drop-in (ExecStart, a bind for the base
interpreter, loopback URLs), as user smsd, and the script reports from
inside every sandbox setting that smsd depends on.
"""
from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import pytest

from tests.nspawn import (
    SCRATCH_IN,
    Container,
    booted_container,
    python_binds,
    service_dropin,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "smsd.service"
VENV_PYTHON = Path(sys.executable)  # the venv python (bound in at the same path)
SCRIPT_IN = f"{SCRATCH_IN}/notify_service.py"
TEST_UNIT = "notify-test.service"

# A Type=notify service in plain stdlib. With --probe it first records what
# the sandbox allows into $STATE_DIRECTORY/probe.json.
NOTIFY_SERVICE = r'''
import json, os, signal, socket, sys, time

def notify(msg):
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr[0] == "@":
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(msg.encode())

state = {"ping": True, "stop": False}
signal.signal(signal.SIGUSR1, lambda *_: state.update(ping=False))
signal.signal(signal.SIGTERM, lambda *_: state.update(stop=True))
signal.signal(signal.SIGHUP, lambda *_: print("SIGHUP: reload", flush=True))

child = os.fork()
if child == 0:  # a "worker": sleeps until told to stop
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        time.sleep(1)

def probe():
    import ctypes, errno, mmap, multiprocessing, pwd
    out = {}
    def check(name, fn):
        try:
            out[name] = fn()
        except Exception as exc:
            out[name] = "error: %s: %s" % (type(exc).__name__, exc)
    state_dir = os.environ.get("STATE_DIRECTORY", "")
    runtime_dir = os.environ.get("RUNTIME_DIRECTORY", "")
    check("user", lambda: pwd.getpwuid(os.getuid()).pw_name)
    check("state_dir", lambda: state_dir)
    check("runtime_dir", lambda: runtime_dir)
    check("state_dir_mode", lambda: oct(os.stat(state_dir).st_mode & 0o7777))
    check("runtime_dir_mode", lambda: oct(os.stat(runtime_dir).st_mode & 0o7777))
    def new_file_mode():
        p = os.path.join(state_dir, "umask-check")
        with open(p, "w") as f:
            f.write("x")
        return oct(os.stat(p).st_mode & 0o777)
    check("new_file_mode", new_file_mode)
    def control_socket():
        p = os.path.join(runtime_dir, "control.sock")
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(p)
        s.listen()
        before = oct(os.stat(p).st_mode & 0o777)
        os.chmod(p, 0o660)
        os.chown(p, -1, os.getgid())  # what config socket_group = "smsd" does
        state["ctl"] = s  # answered from the main loop below
        return [before, oct(os.stat(p).st_mode & 0o777)]
    check("control_socket_modes", control_socket)
    def cred():
        with open(os.path.join(os.environ["CREDENTIALS_DIRECTORY"], "openai_api_key")) as f:
            return f.read().strip()
    check("credential", cred)
    check("env", lambda: {k: v for k, v in os.environ.items() if k.startswith("SMSD_") or k == "OPENAI_API_KEY"})
    def writable(path):
        try:
            with open(path, "w"):
                pass
            os.unlink(path)
            return True
        except OSError as exc:
            return errno.errorcode[exc.errno]
    check("etc_writable", lambda: writable("/etc/smsd-probe"))
    check("var_tmp_writable", lambda: writable("/var/tmp/smsd-probe"))
    check("tmp_writable", lambda: writable("/tmp/smsd-probe"))
    check("dev", lambda: sorted(os.listdir("/dev")))
    check("uid_map", lambda: open("/proc/self/uid_map").read().split())
    check("proc_1_visible", lambda: os.path.exists("/proc/1/cmdline"))
    def netlink():
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
            return "allowed"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    check("netlink", netlink)
    check("getaddrinfo", lambda: sorted({a[4][0] for a in socket.getaddrinfo(
        "localhost", 27017, type=socket.SOCK_STREAM, flags=socket.AI_ADDRCONFIG)}))
    def tcp_loopback():
        srv = socket.create_server(("127.0.0.1", 0))
        c = socket.create_connection(srv.getsockname(), timeout=2)
        c.close(); srv.close()
        return True
    check("tcp_loopback", tcp_loopback)
    def host_server():
        port = int(os.environ["HOST_TEST_PORT"])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return c.makefile().readline().strip()
    check("host_server", host_server)
    def wx_memory():
        try:
            mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
            return "allowed"
        except OSError as exc:
            return errno.errorcode[exc.errno]
    check("wx_memory", wx_memory)
    def pdeathsig():
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    check("pdeathsig", pdeathsig)
    def mp_lock():
        lock = multiprocessing.get_context("fork").Lock()
        with lock:
            return True
    check("mp_lock", mp_lock)
    def psutil_view():
        import psutil
        me = psutil.Process()
        kids = me.children()
        kid = psutil.Process(child)
        return {
            "children": [k.pid for k in kids],
            "child": child,
            "child_status": kid.status(),
            "child_rss": kid.memory_info().rss > 0,
            "child_create_time": kid.create_time() > 0,
            "child_ppid": kid.ppid(),
            "pids_visible": len(psutil.pids()),
        }
    check("psutil", psutil_view)
    def imports():
        import sqlite3
        import pymongo, openai, daemon  # noqa: F401
        openai.OpenAI(api_key="x", base_url="http://127.0.0.1:9/v1")
        db = sqlite3.connect(os.path.join(state_dir, "probe.sqlite3"))
        mode = db.execute("pragma journal_mode=wal").fetchone()[0]
        db.execute("create table if not exists t(x)")
        db.commit()
        db.close()
        return mode
    check("imports_and_sqlite_wal", imports)
    with open(os.path.join(state_dir, "probe.json"), "w") as f:
        json.dump(out, f)

def serve(timeout):
    """Sleep, or answer one control.sock client with what the kernel tells
    about it (SO_PEERCRED, SO_PEERGROUPS) and whether its /proc is visible."""
    import select, struct
    ctl = state.get("ctl")
    if ctl is None:
        time.sleep(timeout)
        return
    if not select.select([ctl], [], [], timeout)[0]:
        return
    conn, _ = ctl.accept()
    pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    raw = conn.getsockopt(socket.SOL_SOCKET, 59, 256)  # SO_PEERGROUPS
    groups = sorted(struct.unpack("%dI" % (len(raw) // 4), raw))
    reply = {"uid": uid, "gid": gid, "groups": groups,
             "proc_visible": os.path.exists("/proc/%d/status" % pid)}
    conn.sendall((json.dumps(reply) + "\n").encode())
    conn.close()

delay = float(os.environ.get("READY_DELAY", "0"))
if "--probe" in sys.argv:
    probe()
time.sleep(delay)
notify("READY=1\nSTATUS=serving, worker %d" % child)
print("sent READY pid=%d child=%d" % (os.getpid(), child), flush=True)
wd = int(os.environ.get("WATCHDOG_USEC", "0")) / 1e6
while not state["stop"]:
    if state["ping"] and wd:
        notify("WATCHDOG=1")
    elif not state["ping"]:
        print("watchdog pings stopped", flush=True)
        state["ping"] = None
    serve(wd / 4 if wd else 0.2)
notify("STOPPING=1\nSTATUS=draining")
print("SIGTERM: draining", flush=True)
os.kill(child, signal.SIGTERM)
os.waitpid(child, 0)
print("stopped cleanly", flush=True)
'''

TEST_UNIT_TEXT = """\
[Unit]
Description=notify test service

[Service]
Type=notify
NotifyAccess=main
ExecStart=/bin/false
Restart=on-failure
RestartSec=1
KillMode=mixed
TimeoutStopSec=10
"""

# The shape of what the real smsd test needs: the unit's own ExecStart is
# replaced, everything else comes from the drop-in below.
TEST_UNIT_DROPIN = f"""\
[Service]
ExecStart=
ExecStart={VENV_PYTHON} {SCRIPT_IN}
Environment=READY_DELAY=1
WatchdogSec=3
"""


def smsd_dropin(host_port: int) -> str:
    """Adapt the shipped unit to this container: stand-in ExecStart, the
    base interpreter (under /root, hidden by ProtectHome=yes) bound back in,
    loopback URLs; User=smsd is kept (created with useradd)."""
    return service_dropin(
        exec_start=f"{VENV_PYTHON} {SCRIPT_IN} --probe",
        environment={
            "SMSD_MONGO_URI": "mongodb://127.0.0.1:27017",
            "SMSD_MONGO_DB": "smsd_test",
            "SMSD_LLM_BASE_URL": "http://127.0.0.1:8000/v1",
            "SMSD_LLM_MODEL": "test-model",
            "HOST_TEST_PORT": str(host_port),
        },
        readable_paths=python_binds(ROOT),
        extra=["WatchdogSec=5"],
    )


@pytest.fixture(scope="module")
def container(pytestconfig):
    c = booted_container(pytestconfig, python_binds(ROOT))
    try:
        c.write_file(SCRIPT_IN, NOTIFY_SERVICE)
        c.install_unit(TEST_UNIT, TEST_UNIT_TEXT, {"10-test.conf": TEST_UNIT_DROPIN})
        yield c
    finally:
        c.stop()


def _restarts(c: Container, unit: str) -> int:
    return int(c.show(unit, "NRestarts") or 0)


def test_systemctl_start_waits_for_ready_and_shows_status(container):
    c = container
    c.systemctl("start", TEST_UNIT)  # blocks until READY=1 (READY_DELAY=1)
    assert c.show(TEST_UNIT, "ActiveState") == "active"
    assert c.show(TEST_UNIT, "SubState") == "running"
    assert c.show(TEST_UNIT, "StatusText").startswith("serving, worker ")
    assert int(c.show(TEST_UNIT, "MainPID")) > 1
    assert _restarts(c, TEST_UNIT) == 0
    assert "sent READY" in c.journal(TEST_UNIT)


def test_sigkilled_main_process_is_restarted_and_its_worker_killed(container):
    c = container
    c.systemctl("start", TEST_UNIT)
    before = _restarts(c, TEST_UNIT)
    old_main = int(c.show(TEST_UNIT, "MainPID"))
    worker = int(c.show(TEST_UNIT, "StatusText").rsplit(" ", 1)[1])
    worker_host_pid = c.host_pid(worker)
    assert worker_host_pid, "worker not found from the host"
    c.run(["kill", "-KILL", str(old_main)])
    c.wait_for(lambda: _restarts(c, TEST_UNIT) == before + 1, timeout=15, what="a restart")
    c.wait_prop(TEST_UNIT, "ActiveState", "active", timeout=15)
    assert int(c.show(TEST_UNIT, "MainPID")) != old_main
    # KillMode=mixed: once the main process is gone, the rest of the cgroup
    # gets SIGKILL, so the old worker does not outlive its supervisor.
    c.wait_for(lambda: not Path(f"/proc/{worker_host_pid}").exists(), timeout=10,
               what="the old worker to be killed")
    assert "status=9/KILL" in c.journal(TEST_UNIT)


def test_service_that_stops_pinging_is_killed_by_watchdog_and_restarted(container):
    c = container
    c.systemctl("start", TEST_UNIT)
    before = _restarts(c, TEST_UNIT)
    main = c.show(TEST_UNIT, "MainPID")
    c.run(["kill", "-USR1", main])  # the script stops sending WATCHDOG=1
    c.wait_for(lambda: _restarts(c, TEST_UNIT) == before + 1, timeout=20, what="watchdog restart")
    c.wait_prop(TEST_UNIT, "ActiveState", "active", timeout=15)
    log = c.journal(TEST_UNIT)
    assert "watchdog pings stopped" in log
    assert "Watchdog timeout" in log


def test_systemctl_stop_lets_the_service_drain(container):
    c = container
    c.systemctl("start", TEST_UNIT)
    c.systemctl("stop", TEST_UNIT)
    assert c.show(TEST_UNIT, "ActiveState") == "inactive"
    assert c.show(TEST_UNIT, "Result") == "success"
    log = c.journal(TEST_UNIT)
    assert "SIGTERM: draining" in log and "stopped cleanly" in log


CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect("/run/smsd/control.sock")
except OSError as exc:
    print(json.dumps({"error": type(exc).__name__}))
    sys.exit(0)
print(s.makefile().readline().strip())
"""


def _check_operator_access(c: Container) -> None:
    """A member of the smsd group reaches control.sock (0660 in a 0750
    directory); the daemon sees the real uid and, through SO_PEERGROUPS,
    the smsd group, while the peer's /proc entry is hidden by
    ProtectProc=invisible. Anyone else gets EACCES from the kernel."""
    if c.run(["test", "-x", "/usr/bin/python3"], check=False).returncode != 0:
        print("no /usr/bin/python3 for the client: operator access not checked")
        return
    c.run(["useradd", "--create-home", "--groups", "smsd", "operator"])
    c.run(["useradd", "--create-home", "outsider"])
    smsd_gid = int(c.run(["getent", "group", "smsd"]).stdout.split(":")[2])

    def connect_as(user: str) -> dict:
        uid = c.run(["id", "-u", user]).stdout.strip()
        gid = c.run(["id", "-g", user]).stdout.strip()
        r = c.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                   "/usr/bin/python3", "-c", CLIENT])
        return {"uid_expected": int(uid), **json.loads(r.stdout)}

    op = connect_as("operator")
    assert op["uid"] == op["uid_expected"], op
    assert smsd_gid in op["groups"], op
    assert op["proc_visible"] is False, op
    outsider = connect_as("outsider")
    assert outsider.get("error") == "PermissionError", outsider


def test_shipped_unit_hardening_works_under_real_systemd(container):
    """systemd/smsd.service as shipped, only ExecStart and paths adapted."""
    c = container
    # A server on the host's loopback, as the Mongo and LLM fixtures will be.
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def answer() -> None:
        for _ in range(2):  # one connection per start
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"hello from the host\n")

    threading.Thread(target=answer, daemon=True).start()
    c.add_user("smsd", home="/var/lib/smsd")
    c.copy_in(UNIT, "/etc/systemd/system/smsd.service", mode=0o644)
    c.install_unit("smsd.service", dropins={"50-test.conf": smsd_dropin(server.getsockname()[1])})

    def start_and_probe() -> dict:
        try:
            c.systemctl("start", "smsd.service", timeout=60)
        except Exception:
            print(c.journal("smsd.service"))
            raise
        return json.loads(c.run(["cat", "/var/lib/smsd/probe.json"]).stdout)

    try:
        # No /etc/smsd/openai_api_key: SetCredential= supplies an empty key
        # instead of failing the start with 243/CREDENTIALS.
        assert start_and_probe()["credential"] == ""
        c.systemctl("stop", "smsd.service")
        c.write_file("/etc/smsd/openai_api_key", "sk-test-not-a-secret\n", mode=0o600)
        probe = start_and_probe()
        assert c.show("smsd.service", "ActiveState") == "active"
        print(json.dumps(probe, indent=1))
        assert probe["user"] == "smsd"
        assert probe["state_dir"] == "/var/lib/smsd"
        assert probe["runtime_dir"] == "/run/smsd"
        assert probe["state_dir_mode"] == "0o700"
        assert probe["runtime_dir_mode"] == "0o750"
        assert probe["new_file_mode"] == "0o600"  # UMask=0077
        # UMask=0077: bind() makes the socket 0700; smsd must chmod it 0660
        assert probe["control_socket_modes"] == ["0o700", "0o660"]
        assert probe["credential"] == "sk-test-not-a-secret"
        assert probe["env"]["SMSD_MONGO_URI"] == "mongodb://127.0.0.1:27017"
        assert "OPENAI_API_KEY" not in probe["env"]
        assert probe["etc_writable"] == "EROFS"  # ProtectSystem=strict
        assert probe["tmp_writable"] is True  # PrivateTmp
        assert "sda" not in probe["dev"] and "null" in probe["dev"]  # PrivateDevices
        assert probe["uid_map"] == ["0", "0", "4294967295"]  # no PrivateUsers=
        assert probe["proc_1_visible"] is False  # ProtectProc=invisible
        assert probe["netlink"] == "EAFNOSUPPORT"  # RestrictAddressFamilies
        assert "127.0.0.1" in probe["getaddrinfo"]  # works without AF_NETLINK
        assert probe["tcp_loopback"] is True
        assert probe["host_server"] == "hello from the host"  # shared network
        assert probe["wx_memory"] == "EPERM"  # MemoryDenyWriteExecute
        assert probe["pdeathsig"] == 0  # prctl allowed by @system-service
        assert probe["mp_lock"] is True
        ps = probe["psutil"]
        assert isinstance(ps, dict), ps
        assert ps["children"] == [ps["child"]] and ps["child_ppid"] > 0
        assert ps["child_rss"] and ps["child_create_time"]
        assert probe["imports_and_sqlite_wal"] == "wal"
        _check_operator_access(c)
        c.systemctl("reload", "smsd.service")  # ExecReload=kill -HUP $MAINPID
        c.wait_for(lambda: "SIGHUP: reload" in c.journal("smsd.service"), timeout=10,
                   what="SIGHUP to reach the main process")
        c.systemctl("stop", "smsd.service")
        assert c.show("smsd.service", "ActiveState") == "inactive"
        assert c.show("smsd.service", "Result") == "success"
        assert _restarts(c, "smsd.service") == 0
    finally:
        c.systemctl("stop", "smsd.service", check=False)
        server.close()
