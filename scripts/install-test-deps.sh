#!/usr/bin/env bash
# Install the system packages the test suite needs beyond the venv:
#   systemd-nspawn (Debian: systemd-container) for tests/test_nspawn_harness.py
#   and the smsd-under-systemd test; systemd-analyze (systemd) for
#   tests/test_systemd_unit.py; nsenter (util-linux); prometheus and promtool
#   (prometheus) for tests/daemon/test_metrics.py; ip (iproute2) for the
#   network-partition test (tests/daemon/test_partition.py).
# Idempotent and silent when everything is present. Without root or apt-get
# it only says what is missing and exits 0: those tests then skip with the
# reason (pytest -rs).
set -euo pipefail

missing=()
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-deps: missing ${missing[*]} (needs root and apt-get); the tests that need them will be skipped" >&2
  exit 0
fi

echo "install-test-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  cat "$log" >&2
  echo "install-test-deps: apt-get failed" >&2
  exit 1
fi
