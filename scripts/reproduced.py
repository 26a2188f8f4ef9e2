"""Did `dvc repro` on a fresh clone reproduce the committed outputs? (`.ci/run`, after README's quick start)

- A clean `git status`: yes, byte for byte. Exit 0.
- A changed tree on a machine whose CPU kernels round as the committing machine's did (the same
  `cpu_kernels` hash as the committed metrics record): no, so something is not deterministic or the
  committed outputs are stale. Exit 1, listing the changes.
- A changed tree on a CPU that rounds differently: the floats may differ (README: What reproduces), so
  bytes prove nothing. What must still hold is that the committed dvc.lock records the code, params and
  commands that this clone ran: every stage, its command, its params and its code dependencies' hashes
  (its data's and outputs' hashes may differ). Exit 0 if so, else 1 naming the stale stages.

    python scripts/reproduced.py
"""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

CODE = "pldistill_cli/"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def committed_kernels() -> str | None:
    for path in sorted(git("ls-files", "metrics/*-details.json").split()):
        found = json.loads(git("show", f"HEAD:{path}")).get("versions", {}).get("cpu_kernels")
        if found:
            return found
    return None


def recorded(lock: dict) -> dict:
    """What a dvc.lock says was run, without the hashes of data and outputs (they are floats' business)."""
    out = {}
    for name, stage in lock.get("stages", {}).items():
        code = {d["path"]: d.get("md5") for d in stage.get("deps", []) if d["path"].startswith(CODE)}
        data = sorted(d["path"] for d in stage.get("deps", []) if not d["path"].startswith(CODE))
        outs = sorted(o["path"] for o in stage.get("outs", []))
        out[name] = {"cmd": stage.get("cmd"), "params": stage.get("params"), "code": code, "data": data, "outs": outs}
    return out


def main() -> int:
    changed = git("status", "--porcelain")
    if not changed:
        print("reproduced: the tree is clean (every committed output reproduced byte for byte)")
        return 0
    import torch

    from pldistill_cli.config import load_params
    from pldistill_cli.models import cpu_kernels

    torch.set_num_threads(load_params().cpu_threads)  # as the stages ran
    here, then = cpu_kernels(), committed_kernels()
    if here == then or then is None:
        print(f"reproduced: NO: on the CPU kernels that made the committed outputs ({here}), dvc repro changed:")
        print(changed, end="")
        return 1
    ran, committed = recorded(yaml.safe_load(open("dvc.lock"))), recorded(yaml.safe_load(git("show", "HEAD:dvc.lock")))
    stale = sorted(name for name in ran.keys() | committed.keys() if ran.get(name) != committed.get(name))
    if stale:
        print(f"reproduced: NO: the committed dvc.lock is stale (other code, params or commands) for: {', '.join(stale)}")
        return 1
    print(f"reproduced: this CPU's kernels ({here}) round differently from those that made the committed outputs "
          f"({then}), so the floats differ ({len(changed.splitlines())} files changed); the committed dvc.lock "
          "records the same stages, commands, params and code, so the committed outputs are current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
