#!/usr/bin/env bash
# The prepared GPU run (tools/gpu_check.py): BTCV training steps with AMP, the sample CT end to end
# against the model zoo's settings, the SSL step against the research code's way, one 4-channel MSD
# step and a one-GPU torchrun DDP run; each part under its own time cap, 8 minutes in all on one
# H100/H200. Writes <output_dir>/gpu_check.json and <output_dir>/gpu_check.md (default: $OUT if set,
# else gpu_check_out).
#
# Set-up on a machine WITH network (here), once, in the repository root:
#   1. the sample CT (TotalSegmentator's example, 1 MB; the GPU box cannot download it):
#        .venv/bin/python -m tools.fetch_sample_ct --dest_dir gpu_inputs/sample_ct
#   2. wheels of the project's requirements except torch (the GPU box has its own CUDA torch and no
#      network) and the test/lint tools, for the GPU box's Python (3.12, x86-64):
#        grep -vE '^(torch|pytest|ruff|jsonschema)==' requirements.txt | grep -v '^#' > /tmp/req-gpu.txt
#        python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#            -d .whl -r /tmp/req-gpu.txt
#      (add itk's wheels only if they fit the transfer limit: without itk the model-zoo variant,
#      which reads with ITKReader, is recorded as failed and everything else still runs)
#   3. keep both out of git and send them along:  echo /.whl/ >> .git/info/exclude;
#      echo /gpu_inputs/ >> .git/info/exclude; carry [".whl", "gpu_inputs"]
# On the GPU box (repository root, fresh machine, no network):
#   bash tools/gpu_check.sh [--wheels .whl] [more gpu_check.py flags, e.g. --parts "['ssl','msd']"]
# The wheels go into a fresh venv that sees the system's CUDA torch (--system-site-packages);
# pip installs from the wheels folder only (--no-index). With no --wheels the current python is used.
# Dry run anywhere (CPU, tiny sizes, same code paths): bash tools/gpu_check.sh --dry_run True
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-}
WHEELS=""
ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) WHEELS="$2"; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

if [ -n "$WHEELS" ]; then
    VENV=${GPU_CHECK_VENV:-/tmp/gpu_check_venv}
    python3 -m venv --system-site-packages "$VENV"
    "$VENV/bin/python" -m pip install -q --no-index --find-links "$WHEELS" --no-cache-dir "$WHEELS"/*.whl
    PYTHON="$VENV/bin/python"
fi
if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

OUTPUT_DIR=${OUT:-gpu_check_out}
"$PYTHON" -c "import torch, monai, ignite, nibabel; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m tools.gpu_check --output_dir "$OUTPUT_DIR" "${ARGS[@]}"
