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
stamp="$env_dir/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"
# one creator at a time: a second caller waits, then finds the venv up to date
exec 9>"$env_dir.lock"
flock 9
if [ -x "$env_dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "lint env is up to date: $env_dir" >&2
else
    echo "creating lint env in $env_dir from $reqs" >&2
    rm -rf "$env_dir"
    python3 -m venv "$env_dir"
    "$env_dir/bin/pip" install --disable-pip-version-check -q --no-deps -r "$reqs"
    "$env_dir/bin/pip" check >&2
    echo "$want" > "$stamp"
fi
echo "$(cd "$env_dir" && pwd)/bin/python"
