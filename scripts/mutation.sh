#!/usr/bin/env bash
# Mutation testing of the core (losses, methods, training, metrics, the report's aggregation) with
# mutmut 3 (`pip install -e '.[mutation]'`), configured in pyproject.toml [tool.mutmut]: for each
# mutant it runs the fast tests that call the mutated function and expects one to fail. Not run in CI
# (about half an hour on 2 cores). Results, and why each surviving mutant is harmless: TESTING.md.
#
#   scripts/mutation.sh [WORKERS]      fresh run (deletes mutants/), WORKERS parallel test processes (2)
#   KEEP=1 scripts/mutation.sh         reuse mutants/ from the last run: only changed functions rerun
#
# Prints the counts per module and lists every mutant that was not killed; `python -m mutmut show NAME`
# shows one mutant's diff.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
workers=${1:-2}

"$python" -c "import mutmut" 2>/dev/null || { echo "mutmut is missing: pip install -e '.[mutation]'" >&2; exit 1; }
[ "${KEEP:-0}" = 1 ] || rm -rf mutants
export OMP_NUM_THREADS=1  # one thread per test process: the workers are the parallelism
start=$(date +%s)
# mutmut's exit status is 0 whatever the mutants did; its progress line goes to the terminal
"$python" -m mutmut run --max-children "$workers"
echo "mutation run: $(( $(date +%s) - start )) s with $workers workers"

"$python" -m mutmut results --all true >mutants/results.txt
"$python" - <<'EOF'
import collections
import re

counts = collections.defaultdict(collections.Counter)
not_killed = []
for line in open("mutants/results.txt"):
    match = re.match(r"\s*(pldistill_cli\.\w+)\.(\S+): (.+)$", line)
    if match:
        module, mutant, status = match.groups()
        counts[module][status] += 1
        if status != "killed":
            not_killed.append(f"{module}.{mutant}: {status}")
statuses = ["killed", "survived", "timeout", "no tests", "suspicious", "segfault"]
print(f"{'module':28}" + "".join(f"{s:>11}" for s in statuses) + f"{'total':>8}")
for module in sorted(counts):
    c = counts[module]
    print(f"{module:28}" + "".join(f"{c[s]:>11}" for s in statuses) + f"{sum(c.values()):>8}")
print("\nnot killed:" if not_killed else "\nevery mutant was killed", *not_killed, sep="\n")
EOF
