#!/usr/bin/env bash
# The study beside the default: `dvc repro` on params.yaml with params-study.yaml's settings replaced
# (5 folds x 6 methods) in a scratch clone of this repository's HEAD, then its report copied
# to report/study/ (Markdown, HTML, figures, and predictions.csv: every run's per-clip test predictions, from
# which tests/test_study_recompute.py recomputes the main table and the paired tests). About 100 minutes on
# the 2-core CPU machine (40 with one seed); resumable (run it again: DVC skips the stages that are done).
#   bash scripts/study.sh [SCRATCH_DIR]     (default: ../pldistill-study)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
scratch=${1:-$repo/../pldistill-study}
[ -d "$scratch/.git" ] || git clone -q "$repo" "$scratch"
cd "$scratch"
ran=$(mktemp) && cp dvc.lock "$ran" 2>/dev/null || true
git fetch -q "$repo" HEAD && git checkout -q --force FETCH_HEAD
# the checkout puts back the committed dvc.lock: add this clone's record of the stages it has run that the
# commit does not record (the study's other folds, methods and seeds), or a re-run would start over; the
# commit's own entries stay, so its committed outputs (the pretrained encoder) are not made again. DVC still
# re-runs whatever the new commit or settings change.
if [ -s "$ran" ]; then
  python - "$ran" <<'PY'
import sys
import yaml
lock, ran = yaml.safe_load(open("dvc.lock")), yaml.safe_load(open(sys.argv[1]))
lock["stages"] = {**ran.get("stages", {}), **lock.get("stages", {})}
open("dvc.lock", "w").write(yaml.safe_dump(lock, sort_keys=False))
PY
fi
rm -f "$ran"
python - "$repo/params-study.yaml" <<'PY'
import sys
import yaml
params = yaml.safe_load(open("params.yaml"))
params.update(yaml.safe_load(open(sys.argv[1])))
open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
PY
start=$(date +%s)
dvc repro
echo "study: dvc repro took $(( ($(date +%s) - start) / 60 )) min"
[ -s report/predictions.csv ] || { echo "study: report/predictions.csv is missing: nothing could recompute it" >&2; exit 1; }
rm -rf "$repo/report/study"
cp -r report "$repo/report/study"
rm -rf "$repo/report/study/study"  # the clone's checkout of the committed study, not this run's
echo "study report -> $repo/report/study/report.md (recompute: python -m pytest tests/test_study_recompute.py)"
