#!/usr/bin/env bash
# Fetch, into .whl/, the wheels that the GPU image lacks (see /work/.library/device/KINDS.md), for
# Python 3.12 on x86-64 manylinux. The GPU machine has no network, so these travel with the working
# tree (`carry: [".whl"]`) and scripts/gpu_check.sh installs them with --no-index.
# Everything else pyproject.toml needs is in the image (torch, torchaudio, peft, accelerate, ...);
# dvc is left out on purpose: the check runs the pldistill commands directly, not `dvc repro`.
#   bash scripts/fetch_gpu_wheels.sh                    # the image's transformers 5.17.0 is used
#   bash scripts/fetch_gpu_wheels.sh --transformers-5.24 # + transformers 5.24.0, to check that too
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PIP:-.venv/bin/python -m pip}"

# The same versions as the CPU venv. soundfile's wheel bundles libsndfile; cffi needs pycparser.
WHEELS=(soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 espeakng-loader==0.2.4)
# pldistill works with both (forward.CACHE picks the KV-cache keyword); transformers 5.24.0 needs
# nothing newer than the image has (huggingface-hub>=1.31: 1.33; tokenizers>=0.23.1: 0.23.2).
[ "${1:-}" = --transformers-5.24 ] && WHEELS+=(transformers==5.24.0)

# .whl/ must not travel as an untracked file nor be committed: ignore it locally.
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

rm -rf .whl && mkdir .whl
# The device README's form: binary wheels only, no dependency resolution (each need is named above).
$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"

ls -l .whl
du -sh .whl
