"""`smsd doctor`: every check on one line, against real servers and real failures."""
from __future__ import annotations

import json

import pytest

from smsd.store import Store

from ..harness import run_smsd, write_config
from .test_first_contact import free_port, read_only_dir

NAMES = ["config", "mongodb", "indexes", "llm models", "llm request", "llm answer", "state dir",
         "runtime dir", "journals", "systemd unit", "control socket"]


def doctor(config, *args, **env):
    out = run_smsd(config, "doctor", "--json", *args, timeout=120, **env)
    report = json.loads(out.stdout)
    return out, report, {c["name"]: c for c in report["checks"]}


@pytest.fixture
def indexed_db(mongo_server, mongo_db_name):
    store = Store(mongo_server.uri, mongo_db_name)
    store.ensure_indexes()
    store.close()
    return mongo_db_name


@pytest.mark.parametrize("llm_server", [{"model": "smsd-test"}], indirect=True)
def test_a_good_setup_passes_every_check_and_exits_0(tmp_path, mongo_server, indexed_db, llm_server):
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=indexed_db, llm_url=llm_server.url)
    out, report, checks = doctor(config, SMSD_MAX_WORKERS="2")
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert report["ok"] and list(checks) == NAMES
    assert all(c["ok"] for c in checks.values())
    assert "$SMSD_MAX_WORKERS" in checks["config"]["detail"] and str(config) in checks["config"]["detail"]
    assert "standalone" in checks["mongodb"]["detail"] or "replica set" in checks["mongodb"]["detail"]
    assert "j: true" in checks["mongodb"]["detail"]
    assert "json_schema accepted" in checks["llm request"]["detail"]
    assert "'smsd-test' listed" in checks["llm models"]["detail"]
    lines = run_smsd(config, "doctor").stdout.splitlines()
    assert [line[0] for line in lines if line[:1] in "✔✘"] == ["✔"] * len(NAMES)
    assert lines[-1] == "all checks passed"


@pytest.mark.parametrize("llm_server", [{"api_key": "sk-right-key-000", "model": "smsd-test"}], indirect=True)
def test_nothing_on_the_mongodb_port_and_a_wrong_key_fail_with_their_fixes(tmp_path, llm_server):
    config = write_config(tmp_path, mongo_uri=f"mongodb://127.0.0.1:{free_port()}", db="x",
                          llm_url=llm_server.url, mongo={"timeout_ms": 500})
    out, report, checks = doctor(config, OPENAI_API_KEY="sk-wrong-key-123456")
    assert out.returncode == 1 and not report["ok"]
    assert not checks["mongodb"]["ok"] and "SMSD_MONGO_URI" in checks["mongodb"]["fix"]
    assert "indexes" not in checks                  # nothing to look at without a server
    assert checks["llm models"]["ok"]               # the local server lists its models to anyone
    assert not checks["llm request"]["ok"] and "OPENAI_API_KEY" in checks["llm request"]["fix"]
    assert "Incorrect API key provided" in checks["llm request"]["detail"]
    assert "sk-wrong-key-123456" not in out.stdout + out.stderr
    assert checks["state dir"]["ok"]


@pytest.mark.parametrize("llm_server", [{"reject_json_schema": True, "reject_pattern": True,
                                         "model": "smsd-test"}], indirect=True)
def test_a_server_that_rejects_json_schema_is_reported_with_the_format_that_works(
        tmp_path, mongo_server, indexed_db, llm_server):
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=indexed_db, llm_url=llm_server.url)
    out, report, checks = doctor(config)
    assert checks["llm request"]["ok"], checks["llm request"]
    assert "json_schema rejected, json_object works" in checks["llm request"]["detail"]
    pinned = write_config(tmp_path, mongo_uri=mongo_server.uri, db=indexed_db, llm_url=llm_server.url,
                          llm={"response_format": "json_schema"})
    out, report, checks = doctor(pinned)
    assert out.returncode == 1 and not checks["llm request"]["ok"]
    assert "response_format" in checks["llm request"]["fix"]


def test_missing_indexes_a_corrupt_journal_and_a_read_only_state_dir_fail(tmp_path, mongo_server,
                                                                          mongo_db_name, llm_server):
    state = tmp_path / "state"
    (state / "journal").mkdir(parents=True)
    (state / "journal" / "u1.sqlite").write_bytes(b"this is not a SQLite file" * 100)
    config = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url)
    with read_only_dir(state):
        out, report, checks = doctor(config)
    assert out.returncode == 1
    assert not checks["indexes"]["ok"] and "smsd_pending_by_user" in checks["indexes"]["detail"]
    assert not checks["state dir"]["ok"] and "Read-only file system" in checks["state dir"]["detail"]
    assert not checks["journal"]["ok"] and "u1.sqlite" in checks["journal"]["detail"]
    assert not checks["llm models"]["ok"]            # the server lists smsd-local, the config says smsd-test


def test_a_bad_config_value_is_the_one_failing_line(tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text('[llm]\nresponse_format = "yaml"\n')
    out, report, checks = doctor(bad)
    assert out.returncode == 1 and list(checks) == ["config"]
    assert "llm.response_format" in checks["config"]["detail"]
