"""The GPU check cannot rot: its wheels are derived from pyproject.toml against the GPU image's package list
(CI also runs `GPU_CHECK_DRY_RUN=1 bash scripts/gpu_check.sh`, the whole check rehearsed on the CPU)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _wheels() -> dict[str, str]:
    out = subprocess.run(["bash", "scripts/fetch_gpu_wheels.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PY": sys.executable}, check=True).stdout
    return dict(line.split("==") for line in out.split())


def test_the_wheels_are_every_runtime_need_the_gpu_image_lacks():
    wheels = _wheels()
    script = (ROOT / "scripts/fetch_gpu_wheels.sh").read_text()
    image = set(re.search(r'IMAGE="([^"]*)"', script).group(1).split())
    # what the first GPU run found missing: pydantic and its own needs, soundfile's, espeak-ng's loader
    assert {"pydantic", "pydantic-core", "annotated-types", "typing-inspection", "soundfile", "cffi", "pycparser",
            "espeakng-loader"} <= wheels.keys()
    assert not wheels.keys() & image and not any(name.startswith("dvc") for name in wheels)
    from importlib.metadata import version

    assert all(version(name) == v for name, v in wheels.items())  # the versions this venv runs
    for requirement in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)).lower()
        assert name in wheels or name in image or name == "dvc", name
