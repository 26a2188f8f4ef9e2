#!/usr/bin/env bash
# Fetch, into .whl/, the wheels of every runtime dependency that the GPU image lacks, for Python 3.12 on
# x86-64 manylinux. The GPU machine has no network, so these travel with the working tree
# (`carry: [".whl"]`) and scripts/gpu_check.sh installs them with --no-index.
# The list is derived, not written out: pyproject.toml's dependencies and, recursively, their own
# requirements (as installed in this venv, at this venv's versions), less what the image already has
# (IMAGE below: its package list, /work/.library/device/KINDS.md, read 2026-11-17) and less NOT_NEEDED.
#   bash scripts/fetch_gpu_wheels.sh           # fetch
#   bash scripts/fetch_gpu_wheels.sh --list    # print NAME==VERSION per wheel, fetch nothing (no network)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

# The image's Python packages (names as pip normalises them).
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin
jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite
lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand
nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink
nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn
scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers
treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"
# dvc orchestrates the stages; no stage imports it (the report skips its `dvc exp` rows without it), and the
# check runs the stages directly.
NOT_NEEDED="dvc"

WHEELS=$(IMAGE="$IMAGE" NOT_NEEDED="$NOT_NEEDED" "$PY" - <<'PY'
import os, re, tomllib
from importlib.metadata import distribution
from packaging.requirements import Requirement

norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
have = {norm(n) for n in os.environ["IMAGE"].split()} | {norm(n) for n in os.environ["NOT_NEEDED"].split()}
todo = [Requirement(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
wheels = {}
while todo:
    req = todo.pop()
    name = norm(req.name)
    if name in have or name in wheels or (req.marker and not req.marker.evaluate({"extra": ""})):
        continue
    dist = distribution(name)  # installed here: its version and its own requirements
    wheels[name] = dist.version
    todo += [Requirement(r) for r in dist.requires or []]
print(" ".join(f"{n}=={v}" for n, v in sorted(wheels.items())))
PY
)
if [ "${1:-}" = --list ]; then tr ' ' '\n' <<< "$WHEELS"; exit 0; fi

# .whl/ must not travel as an untracked file nor be committed: ignore it locally.
mkdir -p .git/info
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

rm -rf .whl && mkdir .whl
# The device README's form: binary wheels only, no dependency resolution (the list above is closed).
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS

ls -l .whl
du -sh .whl
