#!/usr/bin/env bash
# The study beside the default: `dvc repro` on params.yaml with the design's settings (study/DESIGN.yaml)
# merged in, in a scratch clone of this repository's HEAD, then its report copied to report/study/DESIGN/
# (Markdown, HTML, figures, and predictions.csv: every run's per-clip test predictions, from which
# tests/test_study_recompute.py recomputes the main table and the paired tests). The two designs took about
# 80 (labels-25) and 50 (labels-100) minutes side by side on the 2-core CPU machine; resumable (run it again: DVC skips
# the stages that are done).
#   bash scripts/study.sh DESIGN [SCRATCH_DIR]     (DESIGN: labels-25 | labels-100; default ../pldistill-study-DESIGN)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
design=${1:?usage: study.sh DESIGN [SCRATCH_DIR] (DESIGN: a file study/DESIGN.yaml)}
overlay=$repo/study/$design.yaml
[ -f "$overlay" ] || { echo "error: $overlay does not exist: name a design in study/" >&2; exit 2; }
scratch=${2:-$repo/../pldistill-study-$design}
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
python - "$overlay" <<'PY'
import sys
import yaml
def merge(base, new):  # the design's settings replace the default's, key by key inside a section
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in new.items()}}
params = merge(yaml.safe_load(open("params.yaml")), yaml.safe_load(open(sys.argv[1])))
open("params.yaml", "w").write(yaml.safe_dump(params, sort_keys=False))
PY
start=$(date +%s)
dvc repro
echo "study: dvc repro took $(( ($(date +%s) - start) / 60 )) min"
[ -s report/predictions.csv ] || { echo "study: report/predictions.csv is missing: nothing could recompute it" >&2; exit 1; }
rm -rf "$repo/report/study/$design"
mkdir -p "$repo/report/study"
cp -r report "$repo/report/study/$design"
rm -rf "$repo/report/study/$design/study"  # the clone's checkout of the committed study, not this run's
echo "study report -> $repo/report/study/$design/report.md (recompute: python -m pytest tests/test_study_recompute.py)"
