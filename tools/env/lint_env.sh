#!/usr/bin/env bash
# Create (once) the pinned virtual environment of the model zoo's format tools (black, isort, flake8 with
# its plugins, pre-commit and pre-commit-hooks), for tools/release/zoo_format_check.py.
#   bash tools/env/lint_env.sh
# Made from tools/release/zoo_format/requirements.txt in $LINT_ENV_DIR (default: .venv-lint at the repository root,
# git-ignored). A venv whose stamp matches the requirements file is reused as it is. Prints the venv's
# python on the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
reqs="tools/release/zoo_format/requirements.txt"
env_dir="${LINT_ENV_DIR:-.venv-lint}"
source tools/env/pinned_venv.sh
PINNED_VENV_PIP_CHECK=1 pinned_venv "lint env" "$env_dir" "$reqs" --no-deps
