"""systemd/smsd.service is clean for `systemd-analyze verify`, well sandboxed
for `systemd-analyze security`, and says what smsd's supervisor relies on.

How the lint judges only the directives: `systemd-analyze verify` exits 0 on
warnings and complains that /opt/smsd/venv/bin/smsd (the ExecStart of a real
install) does not exist on a test host. So the test copies the unit
verbatim into a temporary directory next to a drop-in
`smsd.service.d/00-verify.conf` that resets ExecStart= to an executable that
exists, and points `SYSTEMD_UNIT_PATH=TMP:` at it (the trailing colon keeps
the system unit directories, so network-online.target etc. resolve). The
drop-in is honoured by verify (a drop-in with a missing binary is reported),
and any output at all fails the test. A second test runs verify on the bare
copy and checks that the only complaint is that very ExecStart path.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "smsd.service"
ENV_EXAMPLE = ROOT / "systemd" / "smsd.env.example"
CONTRACT = ROOT.parent / "shared" / "contract" / "README.md"
INSTALLED_EXEC = "/opt/smsd/venv/bin/smsd"
# The supervisor's default drain_timeout (config.toml [supervisor]).
DEFAULT_DRAIN_TIMEOUT = 30.0
MAX_EXPOSURE = 2.0


def _say(config: pytest.Config, msg: str) -> None:
    """A line on the terminal even while pytest captures output."""
    capman = config.pluginmanager.get_plugin("capturemanager")
    ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
    with ctx:
        sys.stderr.write(msg + "\n")
        sys.stderr.flush()


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")  # -rs shows it
    return exe


def _unit_dir(tmp_path: Path, unit_text: str | None = None, dropin: bool = True) -> Path:
    d = tmp_path / "units"
    d.mkdir()
    (d / "smsd.service").write_text(unit_text if unit_text is not None else UNIT.read_text())
    if dropin:
        (d / "smsd.service.d").mkdir()
        (d / "smsd.service.d" / "00-verify.conf").write_text(
            f"[Service]\nExecStart=\nExecStart={shutil.which('true') or '/bin/true'} run\n"
        )
    return d


def _run_analyze(unit_dir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}
    return subprocess.run(
        [_analyze(), *args, str(unit_dir / "smsd.service")],
        capture_output=True, text=True, env=env, timeout=60,
    )


def _directives(text: str) -> dict[str, list[str]]:
    """key -> values in order (keys may repeat; an empty value resets)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def _seconds(span: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", span)
    assert m, span
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def test_unit_passes_systemd_analyze_verify_without_any_output(tmp_path):
    r = _run_analyze(_unit_dir(tmp_path), "verify", "--man=no")
    output = (r.stdout + r.stderr).strip()
    assert output == "", f"systemd-analyze verify printed:\n{output}"
    assert r.returncode == 0


def test_verify_only_objects_to_the_not_installed_binary(tmp_path):
    """Without the drop-in the one complaint is the ExecStart of a real
    install, so the drop-in hides nothing else."""
    if os.path.exists(INSTALLED_EXEC):
        pytest.skip(f"{INSTALLED_EXEC} exists here: nothing to hide")
    r = _run_analyze(_unit_dir(tmp_path, dropin=False), "verify", "--man=no")
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    assert lines, "expected the missing ExecStart binary to be reported"
    assert all(INSTALLED_EXEC in ln for ln in lines), lines


def test_verify_would_catch_a_bad_directive(tmp_path):
    """The lint is not vacuous: a typo in the unit produces output."""
    broken = UNIT.read_text().replace("ProtectClock=yes", "ProtectClok=yes")
    r = _run_analyze(_unit_dir(tmp_path, broken), "verify", "--man=no")
    assert "ProtectClok" in r.stdout + r.stderr


def test_security_exposure_is_low(tmp_path, pytestconfig, record_property):
    help_text = subprocess.run([_analyze(), "--help"], capture_output=True, text=True).stdout
    if "--offline" not in help_text:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    r = _run_analyze(_unit_dir(tmp_path), "security", "--offline=yes", "--no-pager")
    m = re.search(r"Overall exposure level for smsd\.service: (\d+\.\d+) (\w+)", r.stdout)
    assert m, r.stdout + r.stderr
    score, verdict = float(m.group(1)), m.group(2)
    _say(pytestconfig, f"\nsystemd-analyze security smsd.service: exposure {score} {verdict}")
    record_property("security_exposure", score)
    print(r.stdout)
    assert score <= MAX_EXPOSURE, r.stdout
    assert verdict == "OK"


def test_unit_has_the_process_model_the_supervisor_expects():
    d = _directives(UNIT.read_text())

    def one(key: str) -> str:
        assert key in d, f"{key}= missing"
        return d[key][-1]

    assert one("Type") == "notify"
    assert one("NotifyAccess") == "main"
    assert one("KillMode") == "mixed"  # SIGTERM to the supervisor only
    assert one("Restart") == "on-failure"
    assert _seconds(one("WatchdogSec")) == 30
    assert _seconds(one("TimeoutStopSec")) > DEFAULT_DRAIN_TIMEOUT
    assert one("ExecStart") == f"{INSTALLED_EXEC} run"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("User") == one("Group") == "smsd"
    assert one("RuntimeDirectory") == one("StateDirectory") == "smsd"
    assert one("RuntimeDirectoryMode") == "0750"
    assert one("StateDirectoryMode") == "0700"
    assert one("UMask") == "0077"
    assert one("EnvironmentFile") == "-/etc/smsd/smsd.env"
    assert "openai_api_key:/etc/smsd/openai_api_key" in d["LoadCredential"]
    # the API key never travels in the unit or its environment
    assert not any("OPENAI_API_KEY" in v for v in d.get("Environment", []))


def test_env_example_documents_every_contract_variable():
    text = ENV_EXAMPLE.read_text()
    if CONTRACT.exists():
        names = set(re.findall(r"^\| `((?:SMSD|OPENAI)_[A-Z_]+)` \|", CONTRACT.read_text(), re.M))
        assert names, "no variables found in the contract table"
    else:
        names = {"SMSD_CONFIG", "SMSD_MONGO_URI", "SMSD_MONGO_DB", "SMSD_LLM_BASE_URL",
                 "SMSD_LLM_MODEL", "OPENAI_API_KEY", "SMSD_STATE_DIR", "SMSD_RUNTIME_DIR"}
    missing = sorted(n for n in names if n not in text)
    assert not missing, f"not documented in {ENV_EXAMPLE.name}: {missing}"
    # an EnvironmentFile= line is KEY=VALUE; no line sets a real-looking key
    assert not re.search(r"^\s*OPENAI_API_KEY\s*=\s*\S", text, re.M)
    assert not re.search(r"sk-[A-Za-z0-9]{16,}", text)
