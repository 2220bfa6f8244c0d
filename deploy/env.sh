# Sourced by the run and test scripts: a project-local virtualenv that is
# (re)installed whenever pyproject.toml changes.
# shellcheck shell=bash
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HEBBRIX_VENV:-$ROOT/.venv}"

ensure_venv() {
    local extras="$1" stamp want
    if [ ! -x "$VENV/bin/python" ]; then
        echo "creating virtualenv in $VENV" >&2
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    stamp="$VENV/.hebbrix-installed"
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) $extras"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        echo "installing hebbrix-jobs$extras into $VENV" >&2
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
        "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$ROOT$extras"
        echo "$want" > "$stamp"
    fi
}
