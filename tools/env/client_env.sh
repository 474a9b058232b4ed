#!/usr/bin/env bash
# Create (once) the pinned virtual environment of one real client, for the integration tests.
#   bash tools/env/client_env.sh monailabel|deploy
# Each client gets its own venv (their pins conflict with the project's and with each other), made from
# tests/clients/requirements-<name>.txt in $CLIENT_ENV_DIR/<name> (default: .venv-clients/<name> at the
# repository root, git-ignored). A venv whose stamp matches the requirements file is reused as it is.
# Prints the venv's python on the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
name="${1:?usage: tools/env/client_env.sh monailabel|deploy}"
reqs="tests/clients/requirements-${name}.txt"
[ -f "$reqs" ] || { echo "no requirements file for client '$name': $reqs" >&2; exit 2; }
env_dir="${CLIENT_ENV_DIR:-.venv-clients}/${name}"
stamp="$env_dir/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"
mkdir -p "$(dirname "$env_dir")"
# one creator at a time: a second caller waits, then finds the venv up to date
exec 9>"$env_dir.lock"
flock 9
if [ -x "$env_dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "client env '$name' is up to date: $env_dir" >&2
else
    echo "creating client env '$name' in $env_dir from $reqs" >&2
    rm -rf "$env_dir"
    python3 -m venv "$env_dir"
    "$env_dir/bin/pip" install --disable-pip-version-check -q -r "$reqs"
    echo "$want" > "$stamp"
fi
echo "$(cd "$env_dir" && pwd)/bin/python"
