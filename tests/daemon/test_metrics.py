"""``/metrics``: a real Prometheus scrapes smsd; garbage and a scrape storm never hold up the loop."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..harness import REPO, Daemon, free_port, seed, wait_for, write_config

RULES = REPO / "docs" / "prometheus" / "smsd-rules.yml"
DASHBOARD = REPO / "docs" / "grafana" / "smsd.json"

#: The contract's metrics ("Metrics" in the contract README) and their types.
CONTRACT = {"smsd_up": "gauge", "smsd_sms_processed": "counter", "smsd_sms_quarantined": "counter",
            "smsd_sms_pending": "gauge", "smsd_llm_calls": "counter", "smsd_llm_repeated_calls": "counter",
            "smsd_llm_tokens": "counter", "smsd_llm_latency_seconds": "histogram",
            "smsd_journal_unflushed": "gauge", "smsd_flush_latency_seconds": "histogram",
            "smsd_mongo_up": "gauge", "smsd_workers": "gauge", "smsd_worker_restarts": "counter"}


def _config(tmp_path, mongo_server, db_name, llm_server, port, **llm):
    return write_config(tmp_path, mongo_uri=mongo_server.uri, db=db_name, llm_url=llm_server.url,
                        supervisor={"metrics_listen": f"127.0.0.1:{port}"}, llm=llm)


def scrape(port: int) -> dict:
    """``GET /metrics``: {family name: family}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, **labels: str) -> float:
    fam = families[name]
    for s in fam.samples:
        if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, labels))


class Prometheus:
    """A real ``prometheus`` on loopback scraping smsd every second, with smsd's alert rules loaded."""

    def __init__(self, tmp_path: Path, target_port: int) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus is not installed (Debian package `prometheus`; "
                        "`make test` installs it via scripts/install-test-deps.sh)")
        self.port = free_port()
        conf = tmp_path / "prometheus.yml"
        conf.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "smsd",
                                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}]}]}))
        self.log = open(tmp_path / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._get("/-/ready") is not None, timeout=30, what="prometheus ready")

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as resp:
                return resp.read()
        except OSError:
            return None

    def api(self, path: str) -> dict:
        body = self._get("/api/v1/" + path)
        assert body is not None, f"prometheus API {path} did not answer"
        return json.loads(body)

    def query(self, expr: str) -> list[dict]:
        answer = self.api("query?query=" + urllib.request.quote(expr))
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def test_prometheus_scrapes_smsd_and_its_processed_total_matches_mongodb(tmp_path, db, mongo_server,
                                                                         mongo_db_name, llm_server):
    for user in ("ann", "ben", "cat"):
        seed(db, user, 20)
    port = free_port()
    # The three users share their texts: without the answer cache every SMS is a paid call,
    # so calls, tokens and latency observations all count the same 12 calls.
    prices = {"price_prompt_per_mtok": "0.15", "price_completion_per_mtok": "0.60", "answer_cache": False}
    d = Daemon(_config(tmp_path, mongo_server, mongo_db_name, llm_server, port, **prices), tmp_path)
    prom = Prometheus(tmp_path, port)
    try:
        wait_for(lambda: any(t["health"] == "up" for t in prom.api("targets")["data"]["activeTargets"]),
                 timeout=30, what="smsd target up in prometheus")
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 60, what="all processed")
        in_mongo = db.sms_fin_rawdata.count_documents({"isprocessed": True})

        def prometheus_has_it():
            result = prom.query("smsd_sms_processed_total")
            return result and float(result[0]["value"][1]) == in_mongo
        wait_for(prometheus_has_it, timeout=30, what="smsd_sms_processed_total == MongoDB's count")
        assert float(prom.query("smsd_up")[0]["value"][1]) == 1
        assert float(prom.query("smsd_mongo_up")[0]["value"][1]) == 1
        # The rules loaded and evaluate (none firing on a healthy run).
        groups = prom.api("rules")["data"]["groups"]
        assert [g["name"] for g in groups] == ["smsd"]
        assert all(r["health"] == "ok" for g in groups for r in g["rules"]), groups
        assert not [a for a in prom.api("alerts")["data"]["alerts"] if a["state"] == "firing"]

        fams = wait_for(lambda: (lambda f: f if value(f, "smsd_sms_pending") == 0
                                 and value(f, "smsd_workers") == 0 else None)(scrape(port)),
                        what="idle figures")
        for name, kind in CONTRACT.items():
            assert fams[name].type == kind, name
        st = d.status()
        assert value(fams, "smsd_llm_calls", outcome="answered") == st["llm"]["calls"] == 12
        assert value(fams, "smsd_llm_calls", outcome="failed") == 0
        assert value(fams, "smsd_llm_tokens", type="prompt") == st["llm"]["prompt_tokens"] > 0
        assert value(fams, "smsd_llm_tokens", type="completion") == st["llm"]["completion_tokens"] > 0
        assert value(fams, "smsd_llm_repeated_calls") == 0
        usd = (Decimal(st["llm"]["prompt_tokens"]) * Decimal("0.15")
               + Decimal(st["llm"]["completion_tokens"]) * Decimal("0.60")) / 1_000_000
        assert value(fams, "smsd_llm_cost_usd") == pytest.approx(float(usd), rel=1e-12) and usd > 0
        assert value(fams, "smsd_journal_unflushed") == 0
        assert value(fams, "smsd_sms_processed") == st["totals"]["processed_sms"] == 60
        llm_count = [s for s in fams["smsd_llm_latency_seconds"].samples if s.name.endswith("_count")]
        flush_count = [s for s in fams["smsd_flush_latency_seconds"].samples if s.name.endswith("_count")]
        assert llm_count[0].value == 12 and flush_count[0].value >= 3
        assert st["metrics_url"] == f"http://127.0.0.1:{port}/metrics"
        # No per-user labels anywhere.
        assert not any("user" in k for f in fams.values() for s in f.samples for k in s.labels)
        # Every query of the dashboard is valid PromQL and finds data (rate() needs a few samples).
        wait_for(lambda: (lambda r: r and float(r[0]["value"][1]) >= 6)(prom.query("count_over_time(smsd_up[1m])")),
                 timeout=30, what="six scrapes")
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                expr = target["expr"].replace("$instance", ".*")
                assert prom.api("query?query=" + urllib.request.quote(expr))["status"] == "success", expr
                if "smsd_users" not in expr and "histogram_quantile" not in expr:
                    assert prom.query(expr), f"panel {panel['title']!r}: no data for {expr}"
        # Every smsd_ name the dashboard and the alert rules use is served.
        used = set(re.findall(r"smsd_[a-z_]+", RULES.read_text() + DASHBOARD.read_text()))
        served = {s.name for f in fams.values() for s in f.samples}
        assert used - served - {"smsd_"} == set()
    finally:
        prom.stop()
        code, out = d.stop()
    assert code == 0, out[-3000:]
    # A new supervisor rebuilds the counters from MongoDB and the journals; restarts start from zero.
    d = Daemon(_config(tmp_path, mongo_server, mongo_db_name, llm_server, port), tmp_path)
    try:
        again = wait_for(lambda: (lambda f: f if value(f, "smsd_sms_processed") == 60 else None)(scrape(port)),
                         timeout=30, what="processed total rebuilt")
        assert value(again, "smsd_llm_calls", outcome="answered") == 12
        assert value(again, "smsd_llm_tokens", type="prompt") == st["llm"]["prompt_tokens"]
        assert value(again, "smsd_worker_restarts", reason="killed") == 0
        assert "smsd_llm_cost_usd" not in again   # no prices in this config: no USD figure
        assert [s.value for s in again["smsd_llm_latency_seconds"].samples if s.name.endswith("_count")] == [0]
    finally:
        code, out = d.stop()
    assert code == 0, out[-3000:]


def test_promtool_accepts_the_alert_rules_their_unit_tests_pass_and_a_broken_copy_is_refused(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    ok = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "SUCCESS: 7 rules found" in ok.stdout
    # The alerts fire when they should and not before (docs/prometheus/smsd-rules.test.yml).
    unit = subprocess.run([promtool, "test", "rules", "smsd-rules.test.yml"], capture_output=True, text=True,
                          cwd=str(RULES.parent))
    assert unit.returncode == 0 and "SUCCESS" in unit.stdout, unit.stdout + unit.stderr
    broken = tmp_path / "broken.yml"
    broken.write_text(RULES.read_text().replace("smsd_mongo_up == 0", "smsd_mongo_up == == 0"))
    bad = subprocess.run([promtool, "check", "rules", str(broken)], capture_output=True, text=True)
    assert bad.returncode != 0


def _raw(port: int, data: bytes, *, read: bool = True, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if not read:
            return b""
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_garbage_and_100_concurrent_scrapes_never_hold_up_the_loop(tmp_path, db, mongo_server,
                                                                   mongo_db_name, make_llm_server):
    llm_server = make_llm_server(latency_ms=800)   # workers busy for several seconds: a storm meets them
    for user in ("dan", "eve"):
        seed(db, user, 80)
    port = free_port()
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.settimeout(0.2)
    pings: list[float] = []
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            try:
                data = sock.recv(4096)
            except socket.timeout:
                continue
            if b"WATCHDOG=1" in data:
                pings.append(time.monotonic())

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    # Watchdog every 0.5 s (WatchdogSec=1s): a loop held up for 1 s would be killed by systemd.
    d = Daemon(_config(tmp_path, mongo_server, mongo_db_name, llm_server, port), tmp_path,
               NOTIFY_SOCKET=str(notify), WATCHDOG_USEC="1000000")
    hogs: list[socket.socket] = []
    try:
        wait_for(lambda: len(pings) >= 2, timeout=20, what="watchdog pings")
        storm_start = time.monotonic()
        # Clients that connect and never finish a request (slowloris) hold slots, not the loop.
        for _ in range(20):
            hogs.append(socket.create_connection(("127.0.0.1", port)))
            hogs[-1].sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        for _ in range(10):
            hogs.append(socket.create_connection(("127.0.0.1", port)))
        assert _raw(port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert _raw(port, b"GET\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert _raw(port, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405 ")
        assert _raw(port, b"GET /secret HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert _raw(port, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n").startswith(
            b"HTTP/1.1 431 ")
        head = _raw(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and head.endswith(b"\r\n\r\n")

        results: list[bytes] = []
        storm_over = threading.Event()

        def scraper():
            # 100 of these at once, each scraping again as soon as it has its answer.
            while not storm_over.is_set():
                results.append(_raw(port, b"GET /metrics HTTP/1.1\r\nHost: smsd\r\n\r\n", timeout=30))

        threads = [threading.Thread(target=scraper) for _ in range(100)]
        for t in threads:
            t.start()
        # Meanwhile smsctl status answers, and a worker killed mid-storm is replaced.
        victim = wait_for(lambda: d.worker_pids(), what="a worker")
        os.kill(next(iter(victim)), signal.SIGKILL)
        for _ in range(3):
            ctl = subprocess.run([sys.executable, "-m", "smsd.ctl", "--socket", str(d.sock), "status", "--json"],
                                 capture_output=True, text=True, timeout=30, cwd=str(REPO))
            assert ctl.returncode == 0 and json.loads(ctl.stdout)["ok"], ctl.stderr
        storm_over.set()
        for t in threads:
            t.join()
        assert len(results) >= 200
        assert all(r.startswith(b"HTTP/1.1 200 ") and b"\nsmsd_up 1.0\n" in r for r in results)
        # A slowloris client is dropped after the client timeout (5 s): the server closes on it.
        hogs[0].settimeout(10)
        assert hogs[0].recv(100) == b""
        wait_for(lambda: db.sms_fin_rawdata.count_documents({"isprocessed": True}) == 160, what="all processed")
        storm_end = time.monotonic()
        fams = wait_for(lambda: (lambda f: f if value(f, "smsd_workers") == 0 else None)(scrape(port)),
                        what="workers done")
        assert value(fams, "smsd_worker_restarts", reason="killed") == 1
        assert value(fams, "smsd_sms_processed") == 160
    finally:
        for h in hogs:
            h.close()
        stop.set()
        code, out = d.stop()
        listener.join()
        sock.close()
    assert code == 0, out[-3000:]
    during = [t for t in pings if storm_start - 1 <= t <= storm_end + 1]
    gaps = [b - a for a, b in zip(during, during[1:])]
    # systemd would kill a service silent for WatchdogSec (1 s here): no gap may reach it.
    assert max(gaps) < 1.0, f"watchdog ping gaps {sorted(gaps)[-5:]}"
    assert during[0] <= storm_start + 1.0 and during[-1] >= storm_end - 1.0
    print(f"storm: {len(results)} scrapes by 100 concurrent clients, 30 idle/slow clients, "
          f"{len(during)} watchdog pings over {storm_end - storm_start:.1f} s, largest gap {max(gaps):.3f} s")


def test_a_bad_or_busy_metrics_address_stops_start_up_with_a_clear_error(tmp_path, mongo_server, mongo_db_name,
                                                                   llm_server):
    from ..harness import run_smsd
    bad = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                       supervisor={"metrics_listen": "localhost"})
    proc = run_smsd(bad, "run", timeout=30)
    assert proc.returncode == 78 and "supervisor.metrics_listen" in proc.stderr
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        taken = write_config(tmp_path, mongo_uri=mongo_server.uri, db=mongo_db_name, llm_url=llm_server.url,
                             supervisor={"metrics_listen": f"127.0.0.1:{busy.getsockname()[1]}"})
        proc = run_smsd(taken, "run", timeout=30)
        assert proc.returncode == 3 and "metrics_listen" in proc.stderr, proc.stderr[-2000:]
    finally:
        busy.close()


def test_figures_never_go_down_never_count_a_line_twice_and_add_up_worker_histograms():
    from smsd.children import WorkerProc
    from smsd.figures import Figures
    from smsd.histogram import LLM_BUCKETS, Histogram

    f = Figures()
    f.discovered({"u": {"processed_sms": 10, "quarantined_sms": 1, "journal": {"calls": 3, "prompt_tokens": 90}}})
    w = WorkerProc(pid=101, user_id="u", fd=-1)
    f.worker_started(w.pid, "u")
    worker_hist = Histogram(LLM_BUCKETS)
    for seconds in (0.03, 0.3, 7.0):
        worker_hist.observe(seconds)
    w.status = {"newly_processed": 5, "quarantined": 1, "journal": {"calls": 5, "prompt_tokens": 150},
                "latency": {"llm": worker_hist.to_wire()}}
    f.worker_status(w)
    f.worker_status(w)                       # the same line read again adds nothing
    assert f.user_total("processed") == 15 and f.user_total("quarantined") == 2
    assert f.journal_total("calls") == 5 and f.journal_total("prompt_tokens") == 150
    assert f.latency["llm"].count == 3 and dict(f.latency["llm"].cumulative())["+Inf"] == 3
    # A discovery that looked before the worker's flushes reports less: no step back.
    f.discovered({"u": {"processed_sms": 12, "journal": {"calls": 4}}})
    assert f.user_total("processed") == 15 and f.journal_total("calls") == 5
    worker_hist.observe(0.6)
    w.status = dict(w.status, newly_processed=8, latency={"llm": worker_hist.to_wire()})
    f.worker_exited(w, "killed")
    assert f.user_total("processed") == 18 and f.latency["llm"].count == 4
    assert f.restarts == {"killed": 1}
    f.discovered({"u": {"processed_sms": 25}})   # another process worked on it since: MongoDB knows best
    assert f.user_total("processed") == 25
    # A status line of another smsd version (other buckets) is ignored, not mis-added.
    w2 = WorkerProc(pid=102, user_id="v", fd=-1, status={"latency": {"llm": {"counts": [1, 2], "sum": 1.0}}})
    f.worker_status(w2)
    assert f.latency["llm"].count == 4
