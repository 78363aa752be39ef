#!/usr/bin/env bash
# The GPU validation kit as one command on a lent machine (`make gpu-check`): installs the kit's
# wheels (scripts/gpu_wheels.sh) into a temporary folder put on PYTHONPATH, then runs
# scripts/gpu_check.py on CUDA, writing gpu_check.json and gpu_check.log into $OUT (default
# outputs/gpu_check). Extra arguments go to gpu_check.py (e.g. --budget 300, --device cpu).
#
#   bash scripts/gpu_check.sh [gpu_check.py arguments]
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-.gpu_kit}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT

# A failed install is not fatal: gpu_check.py lists the modules it cannot import, and the
# sections that do not need them still run.
if compgen -G "$KIT/wheels/*.whl" >/dev/null; then
    $PYTHON -m pip install --no-index --no-deps --no-compile --disable-pip-version-check \
        --quiet --target "$SITE" "$KIT"/wheels/*.whl >"$OUT/pip_install.log" 2>&1 ||
        echo "pip install of $KIT/wheels failed: see $OUT/pip_install.log"
else
    echo "no wheels in $KIT/wheels (run make gpu-wheels where PyPI is reachable)"
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PYTHON scripts/gpu_check.py --device cuda --kit "$KIT" --out "$OUT" "$@"
