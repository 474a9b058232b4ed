#!/usr/bin/env bash
# The one recipe of the pinned venvs (sourced by client_env.sh, monai_env.sh and lint_env.sh):
#   pinned_venv LABEL ENV_DIR REQUIREMENTS [pip install flags...]
# creates ENV_DIR from REQUIREMENTS once and reuses it while its stamp (the file's sha256) matches; one
# creator at a time (a second caller waits, then finds the venv up to date). PINNED_VENV_PIP_CHECK=1 runs
# `pip check` after the install. Prints the venv's python on the last line.
pinned_venv() {
    local label="$1" env_dir="$2" reqs="$3"
    shift 3
    local stamp="$env_dir/.requirements.sha256"
    local want
    want="$(sha256sum "$reqs" | cut -d' ' -f1)"
    mkdir -p "$(dirname "$env_dir")"
    exec 9>"$env_dir.lock"
    flock 9
    if [ -x "$env_dir/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        echo "$label is up to date: $env_dir" >&2
    else
        echo "creating $label in $env_dir from $reqs" >&2
        rm -rf "$env_dir"
        python3 -m venv "$env_dir"
        "$env_dir/bin/pip" install --disable-pip-version-check -q "$@" -r "$reqs"
        if [ "${PINNED_VENV_PIP_CHECK:-0}" = 1 ]; then
            "$env_dir/bin/pip" check >&2
        fi
        echo "$want" > "$stamp"
    fi
    echo "$(cd "$env_dir" && pwd)/bin/python"
}
