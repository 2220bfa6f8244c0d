#!/usr/bin/env bash
# Run the whole test suite (lint, then pytest) against real PostgreSQL and
# Redis on 127.0.0.1, starting them first if they do not answer.
set -euo pipefail
. "$(dirname "$0")/env.sh"
ensure_venv "[test]"
cd "$ROOT"

answers() {  # host port
    "$VENV/bin/python" - "$1" "$2" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

wait_for() {  # name host port
    for _ in $(seq 1 60); do
        answers "$2" "$3" && return 0
        sleep 0.5
    done
    echo "$1 does not answer on $2:$3" >&2
    exit 1
}

if ! answers 127.0.0.1 5432; then
    echo "starting PostgreSQL" >&2
    if command -v pg_ctlcluster >/dev/null; then
        for version in $(ls /etc/postgresql); do
            pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
        done
    else
        echo "PostgreSQL is not running and pg_ctlcluster is not available" >&2
    fi
    wait_for PostgreSQL 127.0.0.1 5432
fi
if ! answers 127.0.0.1 6379; then
    echo "starting Redis" >&2
    redis_dir="$(mktemp -d)"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" \
        --appendonly no --dir "$redis_dir" --logfile "$redis_dir/redis.log"
    wait_for Redis 127.0.0.1 6379
fi

"$VENV/bin/ruff" check .
exec "$VENV/bin/python" -m pytest "$@"
