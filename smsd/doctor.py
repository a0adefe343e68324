"""``smsd doctor``: what a new install needs, checked one line at a time.

Each check prints ``✔`` or ``✘``, what it found and, when it fails, the fix.
The exit code is 0 only when every check passes; ``--json`` prints the same
as one JSON object.  Checks: the config file (and which environment
variables override it), MongoDB (reachable, version, replica set or not and
so the write concern used, the indexes smsd needs), the LLM endpoint (``GET
/models``, then one tiny contract request: its latency, and whether
``json_schema`` is accepted or which format is), the state and runtime
directories (owner, mode, free space, writable), each journal's ``PRAGMA
quick_check``, the systemd unit if installed, and the control socket's peer
rules.  Nothing printed holds a password, a key or an SMS body.
"""
from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from .config import ENV_OVERRIDES, SYSTEMD_DIRS, ConfigError, Settings, load_settings
from .waiting import mask_uri

EXIT_OK = 0
EXIT_FAILED = 1          # at least one check failed
MIN_FREE_BYTES = 100 * 1024 * 1024
UNIT_PATHS = ("/etc/systemd/system/smsd.service", "/lib/systemd/system/smsd.service",
              "/usr/lib/systemd/system/smsd.service")
#: One SMS as a new user's bank would send it: the contract request of the LLM check.
PROBE_TEXT = ("INR 500.00 debited from A/c XX1234 on 01-02-26 to VPA shop@upi. "
              "UPI Ref 612345678901. Not you? Call 1800-000-0000")


@dataclass
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        mark = "✔" if self.ok else "✘"
        return f"{mark} {self.name:<14} {self.detail}" + ("" if self.ok or not self.fix else f"\n    fix: {self.fix}")


# ------------------------------------------------------------------ config
def check_config(path: str | None, env: dict) -> tuple[Check, Settings | None]:
    try:
        settings = load_settings(path, env)
    except ConfigError as exc:
        return Check("config", False, str(exc), "correct the value named; every setting is in config.toml"), None
    names = [f"${v}" for v in list(ENV_OVERRIDES) + list(SYSTEMD_DIRS) if env.get(v)]
    where = settings.source or "no config file (defaults; set $SMSD_CONFIG or ./config.toml)"
    return Check("config", True, where + (f"; overridden by {', '.join(names)}" if names else "")), settings


# ------------------------------------------------------------------ MongoDB
def check_mongo(settings: Settings) -> list[Check]:
    from pymongo import MongoClient
    from pymongo.errors import PyMongoError

    from . import store_docs as docs

    uri = settings.mongo.uri
    if uri == "embedded":
        found = shutil.which("secantusd-py")
        return [Check("mongodb", bool(found), "embedded: smsd starts its own server" +
                      (f" ({found})" if found else ", but secantusd-py is not installed"),
                      "pip install 'smsd[embedded]'")]
    shown = mask_uri(uri)
    timeout = min(settings.mongo.timeout_ms, 5000)
    client = MongoClient(uri, serverSelectionTimeoutMS=timeout, connectTimeoutMS=timeout, socketTimeoutMS=timeout)
    try:
        t0 = time.monotonic()
        hello = client.admin.command("hello")
        ms = (time.monotonic() - t0) * 1000
        version = client.admin.command("buildInfo").get("version", "?")
        db = client[settings.mongo.db]
        have = {(coll, ix["name"]) for coll in (docs.RAW_COLLECTION, docs.TRANSACTIONS_COLLECTION,
                                                docs.CHECKPOINTS_COLLECTION)
                for ix in db[coll].list_indexes()}
    except PyMongoError as exc:
        return [Check("mongodb", False, f"{shown} did not answer within {timeout / 1000:g} s ({type(exc).__name__})",
                      "start MongoDB, or correct mongo.uri / $SMSD_MONGO_URI")]
    finally:
        client.close()
    replica = bool(hello.get("setName")) or hello.get("msg") == "isdbgrid"
    wc = "w: majority, j: true" if replica else "w: 1, j: true"
    kind = f"replica set {hello['setName']}" if hello.get("setName") else \
        "mongos" if hello.get("msg") == "isdbgrid" else "standalone (no replica set)"
    checks = [Check("mongodb", True, f"{shown}: version {version}, {kind}, answered in {ms:.0f} ms; "
                    f"writes use {wc}")]
    wanted = [(docs.RAW_COLLECTION, docs.IDX_PENDING), (docs.RAW_COLLECTION, docs.IDX_DISCOVERY),
              (docs.TRANSACTIONS_COLLECTION, docs.IDX_TX_BY_SMS),
              (docs.CHECKPOINTS_COLLECTION, docs.IDX_LATEST_CHECKPOINT)]
    missing = [f"{c}.{n}" for c, n in wanted if (c, n) not in have]
    checks.append(Check("indexes", not missing,
                        f"all {len(wanted)} of smsd's indexes in database {settings.mongo.db}" if not missing
                        else f"missing in database {settings.mongo.db}: {', '.join(missing)}",
                        "`smsd once` and `smsd run` create them at start (they need write access)"))
    return checks


# ------------------------------------------------------------------ LLM
def check_llm(settings: Settings) -> list[Check]:
    import openai

    from . import model, wireformat
    from .llm import LlmClient, LlmError, PLACEHOLDER_API_KEY
    from .llm_errors import LlmConfigError, read_status_error

    llm = settings.llm
    if llm.extractor == "rules":
        return [Check("llm", True, "extractor = \"rules\": no LLM is asked")]
    where = f"{llm.base_url} (model {llm.model})"
    timeout = llm.timeout
    sdk = openai.OpenAI(base_url=llm.base_url, api_key=llm.api_key or PLACEHOLDER_API_KEY,
                        timeout=timeout, max_retries=0)
    checks: list[Check] = []
    try:
        t0 = time.monotonic()
        ids = [m.id for m in sdk.models.list()]
        ms = (time.monotonic() - t0) * 1000
        listed = llm.model in ids
        checks.append(Check("llm models", listed, f"GET {llm.base_url}/models: {len(ids)} model(s) in "
                            f"{ms:.0f} ms, {llm.model!r} {'listed' if listed else 'not listed'}",
                            f"set llm.model / $SMSD_LLM_MODEL to one of: {', '.join(ids[:8])}"))
    except openai.APIStatusError as exc:
        f = read_status_error(exc, llm.api_key)
        bad = exc.status_code in (401, 403)
        checks.append(Check("llm models", not bad, f"GET {llm.base_url}/models: {f.reason}: {f.message}",
                            "check OPENAI_API_KEY" if bad else ""))
        if bad:
            return checks
    except openai.APIConnectionError as exc:
        cause = exc.__cause__.__class__.__name__ if exc.__cause__ else type(exc).__name__
        return [Check("llm", False, f"{where}: no answer ({cause})",
                      "start the server, or correct llm.base_url / $SMSD_LLM_BASE_URL (usually ends in /v1)")]
    finally:
        sdk.close()
    sms = [model.Sms(raw_id="doctor", key="s1", user_id="doctor", text=PROBE_TEXT, sender="AX-HDFCBK")]
    common = dict(base_url=llm.base_url, api_key=llm.api_key, model=llm.model, timeout=timeout,
                  max_retries=0, strict_schema=llm.strict_schema, token_param=llm.token_param,
                  completion_tokens_per_sms=llm.completion_tokens_per_sms,
                  completion_tokens_margin=llm.completion_tokens_margin)
    memory = wireformat.EndpointMemory(settings.state_dir / wireformat.MEMORY_FILE
                                       if settings.state_dir.is_dir() else None)
    schema_ok, answer, error = None, None, None
    for setting in ("json_schema", "auto") if llm.response_format in ("auto", "json_schema") else \
            (llm.response_format,):
        client = LlmClient(response_format=setting, memory=memory if setting == "auto" else None, **common)
        try:
            answer = client.extract(sms)
            if setting == "json_schema":
                schema_ok = True
            break
        except LlmConfigError as exc:
            error = exc
            if setting == "json_schema":
                schema_ok = False
                if llm.response_format == "json_schema":
                    break
        except LlmError as exc:
            error = exc
            break
        finally:
            client.close()
    if answer is None:
        hint = getattr(error, "hint", "check that the server is up and llm.base_url")
        return checks + [Check("llm request", False, f"{where}: one contract request failed: {error}", hint)]
    schema_text = {True: "json_schema accepted", False: f"json_schema rejected, {answer.response_format} works",
                   None: f"response_format {answer.response_format}"}[schema_ok]
    fits = llm.response_format in ("auto", answer.response_format)
    checks.append(Check("llm request", fits, f"{where}: {schema_text}; 1 SMS in {answer.elapsed_ms:.0f} ms, "
                        f"{answer.usage.prompt_tokens}+{answer.usage.completion_tokens} tokens",
                        f"set llm.response_format = \"auto\" (or \"{answer.response_format}\")"))
    valid = "s1" in answer.results
    checks.append(Check("llm answer", valid, "the answer follows the contract" if valid else
                        f"the answer does not follow the contract ({answer.failed.get('s1', 'no result')})",
                        "a model this weak will quarantine most SMS: use a stronger model"))
    return checks


# ------------------------------------------------------------------ directories
def _owner(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def check_dir(name: str, path: Path, setting: str) -> Check:
    fix = f"create it writable by the smsd user, or point {setting} elsewhere"
    target = path
    while not target.exists() and target != target.parent:
        target = target.parent
    if target != path:
        if not target.is_dir() or not os.access(target, os.W_OK):
            return Check(name, False, f"{path} does not exist and cannot be created under {target}", fix)
        return Check(name, True, f"{path} does not exist yet; smsd creates it (under {target})")
    if not path.is_dir():
        return Check(name, False, f"{path} is not a directory", fix)
    st = path.stat()
    free = shutil.disk_usage(path).free
    desc = f"{path}: owner {_owner(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}, {free / 2**30:.1f} GiB free"
    probe = path / f".smsd-doctor-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        return Check(name, False, f"{desc}; not writable ({exc.strerror})", fix)
    if free < MIN_FREE_BYTES:
        return Check(name, False, f"{desc}; less than {MIN_FREE_BYTES >> 20} MiB free", "free some space")
    return Check(name, True, desc)


def check_journals(state_dir: Path) -> list[Check]:
    files = sorted((state_dir / "journal").glob("*.sqlite")) if (state_dir / "journal").is_dir() else []
    bad: list[Check] = []
    for path in files:
        try:
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            try:
                result = [r[0] for r in conn.execute("PRAGMA quick_check")]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            result = [str(exc)]
        if result != ["ok"]:
            bad.append(Check("journal", False, f"{path.name}: quick_check says {'; '.join(result)[:200]}",
                             "stop smsd, move the file aside and run `smsd once --user-id U` (its unflushed "
                             "answers are lost; MongoDB keeps everything flushed)"))
    if bad:
        return bad
    return [Check("journals", True, f"{len(files)} journal(s) in {state_dir / 'journal'}: quick_check ok"
                  if files else "no journal yet")]


# ------------------------------------------------------------------ systemd, socket
def check_systemd() -> Check:
    unit = next((p for p in UNIT_PATHS if Path(p).is_file()), None)
    if unit is None:
        return Check("systemd unit", True, "not installed (not needed for smsd once or smsd run --daemon)")
    detail = unit
    if Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        out = subprocess.run(["systemctl", "show", "smsd.service", "-p", "ActiveState,UnitFileState"],
                             capture_output=True, text=True, timeout=10).stdout
        detail += ": " + ", ".join(line.strip() for line in out.splitlines() if line.strip())
    if shutil.which("systemd-analyze"):
        res = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=30)
        msgs = (res.stdout + res.stderr).strip()
        if res.returncode != 0 or msgs:
            return Check("systemd unit", False, f"{detail}: systemd-analyze verify: {msgs[:300]}",
                         "reinstall systemd/smsd.service from the release")
    return Check("systemd unit", True, detail)


def check_socket(settings: Settings) -> Check:
    import grp

    from . import control_protocol

    sup = settings.supervisor
    rules = [f"root, uid {os.getuid()} ({_owner(os.getuid())})"]
    if sup.socket_group:
        try:
            gid = int(sup.socket_group) if sup.socket_group.isdigit() else grp.getgrnam(sup.socket_group).gr_gid
        except KeyError:
            return Check("control socket", False, f"socket_group {sup.socket_group!r} does not exist",
                         f"groupadd {sup.socket_group}, or change supervisor.socket_group")
        rules.append(f"group {sup.socket_group} ({gid})")
    rules += [f"uid {u}" for u in sup.allowed_uids] + [f"gid {g}" for g in sup.allowed_gids]
    sock = settings.control_socket
    try:
        reply = control_protocol.request(str(sock), "status", timeout=3)
        state = f"daemon pid {reply.get('pid')} answers"
    except control_protocol.DaemonNotRunning:
        state = "no daemon running"
    except Exception as exc:  # noqa: BLE001 - a refusal is worth showing, whatever its class
        state = f"daemon did not answer ({type(exc).__name__})"
    return Check("control socket", True, f"{sock}: {state}; served: {', '.join(rules)}")


# ------------------------------------------------------------------ run
def run_checks(config: str | None, env: dict | None = None,
               progress: Callable[[Check], None] | None = None) -> list[Check]:
    """Every check, in order; ``progress`` sees each as it is done."""
    env = dict(os.environ if env is None else env)
    out: list[Check] = []

    def add(items: Any) -> None:
        for item in items if isinstance(items, list) else [items]:
            out.append(item)
            if progress:
                progress(item)

    first, settings = check_config(config, env)
    add(first)
    if settings is None:
        return out
    add(check_mongo(settings))
    add(check_llm(settings))
    add(check_dir("state dir", settings.state_dir, "journal.state_dir / $SMSD_STATE_DIR"))
    add(check_dir("runtime dir", settings.runtime_dir, "supervisor.runtime_dir / $SMSD_RUNTIME_DIR"))
    add(check_journals(settings.state_dir))
    add(check_systemd())
    add(check_socket(settings))
    return out


def main(argv: list[str] | None = None, config: str | None = None) -> int:
    """``smsd doctor [--json]``."""
    p = argparse.ArgumentParser(prog="smsd doctor", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    args = p.parse_args(argv)
    show = None if args.json else (lambda c: print(c.line(), flush=True))
    checks = run_checks(config, progress=show)
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=1))
    else:
        failed = sum(not c.ok for c in checks)
        print("all checks passed" if ok else f"{failed} check(s) failed")
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
