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
source tools/env/pinned_venv.sh
pinned_venv "monai env '$version'" "$env_dir" "$reqs"
