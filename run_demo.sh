#!/usr/bin/env bash
# Run the end-to-end demo (tools/demo/demo.py): sample CT + phantoms -> self-supervised pre-training -> export ->
# figures -> fine-tune from the export -> evaluate -> infer -> overlays.
# Creates .venv at the repository root if missing and installs the pinned requirements into it.
# Arguments go to the demo, e.g.: bash run_demo.sh --output_dir /tmp/demo --ssl_steps 150 --epochs 2   (or --quick)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --disable-pip-version-check -q -r requirements.txt
exec .venv/bin/python -m tools demo "$@"
