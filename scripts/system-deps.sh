#!/usr/bin/env bash
# The Debian packages tierq needs beyond Python and Rust, installed only when
# missing (apt-get; sudo when not root). One place for the list, used by the
# README's first command and by .ci/run.
#   build  SQLite's headers and pkg-config: core/ledger.rs links the system
#          libsqlite3, the same copy Python's sqlite3 module loads, so one
#          process never runs two SQLites on one file (their POSIX locks would
#          not see each other).
#   postgres  Debian's PostgreSQL server binaries (/usr/lib/postgresql/*/bin) for
#          the PostgreSQL ledger and key store tests and bench/cluster; each test
#          starts its own cluster on a loopback port (tests/pg_server.py).
#   redis  Debian's redis-server and redis-sentinel for the cluster tests and
#          bench/cluster; each test starts its own on a loopback port
#          (tests/redis_server.py), sentinels too (tests/test_cluster_faults.py).
#   prometheus  Debian's prometheus and promtool for the dashboard and alert
#          tests (tests/test_dashboards.py starts its own on a loopback port).
set -euo pipefail
missing=()
for group in "${@:-build}"; do
    case "$group" in
        build)
            pkg-config --exists sqlite3 2>/dev/null || missing+=(libsqlite3-dev pkg-config) ;;
        postgres)
            compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || missing+=(postgresql) ;;
        redis)
            command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
            command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel) ;;
        prometheus)
            command -v promtool >/dev/null 2>&1 || missing+=(prometheus) ;;
        *)
            echo "system-deps: unknown group '$group' (known: build, postgres, redis, prometheus)" >&2; exit 2 ;;
    esac
done
[ "${#missing[@]}" -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "system-deps: installing ${missing[*]}" >&2
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
