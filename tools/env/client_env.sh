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
source tools/env/pinned_venv.sh
pinned_venv "client env '$name'" "$env_dir" "$reqs"
