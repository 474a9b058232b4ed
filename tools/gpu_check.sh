#!/usr/bin/env bash
# The prepared GPU run (tools/benchmarks/gpu_check.py): BTCV training steps with AMP, the sample CT end to end
# against the model zoo's settings, the SSL step against the research code's way, one 4-channel MSD
# step and a one-GPU torchrun DDP run; each part under its own time cap, 8 minutes in all on one
# H100/H200. Writes <output_dir>/gpu_check.json and <output_dir>/gpu_check.md (default: $OUT if set,
# else gpu_check_out).
#
# Set-up on a machine WITH network (here), once, in the repository root:
#   1. the sample CT (TotalSegmentator's example, 1 MB; the GPU box cannot download it):
#        .venv/bin/python -m tools fetch_sample_ct --dest_dir gpu_inputs/sample_ct
#   2. wheels of the project's requirements the GPU box lacks (it has its own CUDA torch, numpy,
#      scipy, einops, pyyaml, tqdm, tensorboard, matplotlib; no network), for its Python 3.12
#      (7.5 MB; versions as in requirements.txt; termcolor is fire's one dependency):
#        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#            -d .whl monai==1.6.1 pytorch-ignite==0.5.5 nibabel==5.4.2 pydicom==3.0.2 fire==0.7.1 termcolor
#      itk (over 64 MiB of wheels) stays behind: without it the model-zoo variant reads the NIfTI
#      with NibabelReader instead of ITKReader (same array; its settings record the reader)
#   3. keep both out of git and send them along:  echo /.whl/ >> .git/info/exclude;
#      echo /gpu_inputs/ >> .git/info/exclude; carry [".whl", "gpu_inputs"]
# On the GPU box (repository root, fresh machine, no network):
#   bash tools/gpu_check.sh [--wheels .whl] [more gpu_check.py flags, e.g. --parts "['ssl','msd']"]
# The wheels are installed alone (--no-index --no-deps) into a folder of their own (--target
# /tmp/gpu_check_site, put first on PYTHONPATH), on top of the box's python3 with its CUDA torch:
# a fresh environment each run, nothing written into the box's own. $PYTHON picks another python.
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

if [ -z "$PYTHON" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [ -n "$WHEELS" ]; then
    SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

OUTPUT_DIR=${OUT:-gpu_check_out}
"$PYTHON" -c "import torch, monai, ignite, nibabel; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m tools gpu_check --output_dir "$OUTPUT_DIR" "${ARGS[@]}"
