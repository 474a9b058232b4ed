#!/usr/bin/env bash
# Run the test suite in the repository's .venv (created with the pinned requirements if missing).
# Arguments go to pytest; slow tests are skipped by default (pyproject.toml): add `-m slow` or `-m ""` for them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --disable-pip-version-check -q -r requirements.txt
exec .venv/bin/python -m pytest "$@"
