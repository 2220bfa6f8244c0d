#!/usr/bin/env bash
# Bring the whole stack up: API, a worker for every queue, beat and Flower.
# With nothing configured this is the embedded profile (SQLite + a filesystem
# broker under ./var); set DATABASE_URL and CELERY_BROKER_URL for production.
set -euo pipefail
. "$(dirname "$0")/env.sh"
ensure_venv ""
cd "$ROOT"
exec "$VENV/bin/hebbrix-jobs" run "$@"
