#!/usr/bin/env bash
# Create (once) the pinned virtual environment of an older MONAI, for the version tests (tests/compat).
#   bash tools/env/monai_env.sh 1.4|1.5
# The project's own .venv has monai 1.6.1 (requirements.txt); each older MONAI gets its own venv, made from
# tests/compat/requirements-monai<14|15>.txt in $MONAI_ENV_DIR/<version> (default: .venv-monai/<version> at the
# repository root, git-ignored). A venv whose stamp matches the requirements file is reused as it is.
# Prints the venv's python on the last line.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
version="${1:?usage: tools/env/monai_env.sh 1.4|1.5}"
reqs="tests/compat/requirements-monai${version//./}.txt"
[ -f "$reqs" ] || { echo "no requirements file for monai '$version': $reqs (tested: 1.4, 1.5; 1.6 is .venv)" >&2; exit 2; }
env_dir="${MONAI_ENV_DIR:-.venv-monai}/${version}"
stamp="$env_dir/.requirements.sha256"
want="$(sha256sum "$reqs" | cut -d' ' -f1)"
mkdir -p "$(dirname "$env_dir")"
# one creator at a time: a second caller waits, then finds the venv up to date
exec 9>"$env_dir.lock"
flock 9
if [ -x "$env_dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "monai env '$version' is up to date: $env_dir" >&2
else
    echo "creating monai env '$version' in $env_dir from $reqs" >&2
    rm -rf "$env_dir"
    python3 -m venv "$env_dir"
    "$env_dir/bin/pip" install --disable-pip-version-check -q -r "$reqs"
    echo "$want" > "$stamp"
fi
echo "$(cd "$env_dir" && pwd)/bin/python"
