#!/usr/bin/env bash
# Install what the report's browser test needs, then run it.
#
#   bash scripts/ci_browser.sh                 # install if missing, run tests/test_report_browser.py
#   bash scripts/ci_browser.sh --install-only  # only install (e.g. before 'make test')
#
# Needs: Debian's chromium (apt) and the playwright Python package in the venv. Playwright
# drives the system browser through executable_path; no browser build is downloaded.
# DISTILL_DETECT_REQUIRE_BROWSER=1 makes the test fail, not skip, if either is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"

if [ ! -x "$PY" ]; then
  echo "ci_browser.sh: $PY not found; run 'make setup' first" >&2
  exit 2
fi

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "ci_browser.sh: installing Debian's chromium" >&2
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
chromium --version

if ! "$PY" -c "import playwright" >/dev/null 2>&1; then
  echo "ci_browser.sh: installing playwright (Python package only)" >&2
  "$PY" -m pip install -q "playwright>=1.45"
fi
"$PY" -c "import importlib.metadata as m; print('playwright', m.version('playwright'))"

if [ "${1:-}" = "--install-only" ]; then
  exit 0
fi
export DISTILL_DETECT_REQUIRE_BROWSER=1
exec "$PY" -m pytest -q -p no:cacheprovider tests/test_report_browser.py
