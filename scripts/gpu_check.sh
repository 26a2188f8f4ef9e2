#!/usr/bin/env bash
# The GPU check, run from the repo root on the device machine (no network):
#   bash scripts/gpu_check.sh            (device tool: carry [".whl"], made by scripts/fetch_gpu_wheels.sh)
# a. installs the carried wheels; b. runs the default pipeline on CUDA, stage by stage, in a scratch
# folder, from the committed pretrained encoder and teacher (as a fresh clone's `dvc repro` does), and pretrain-encoder
# itself briefly in another; c. times the paper-sized student's training step with and without
# checkpointing (scripts/gpu_student_step.py: step time, peak memory, the GPU sizes it fits); d. the
# paper-size ratio table (scripts/benchmark.py --preset paper: online / cached, KD overhead, cache / bare
# ... at batch 8 and 30 s, the teacher in bf16). One command prints every GPU figure.
# Budgets: pipeline 200 s, student step 120 s, ratio table 200 s, so the whole stays under 9 minutes (the
# device tool's 10-minute call) even when something hangs.
# Everything printed also goes to $OUT/gpu_check.log when $OUT is set.
#   GPU_CHECK_DRY_RUN=1   CPU rehearsal (CI runs it): no wheel install (use the active venv), 1-epoch stages,
#                         the student step with --tiny-check, the ratio table on the small preset (quick).
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO=$PWD
if [ -n "${OUT:-}" ]; then  # log everything; at exit, let tee finish writing before $OUT is collected
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1; TEE=$!
  trap 'exec >&- 2>&-; wait $TEE 2>/dev/null' EXIT
fi
DRY=${GPU_CHECK_DRY_RUN:-0}
FAILED=()

# --- a. packages --------------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  export PYTHONPATH=$REPO
else
  # soundfile, cffi, pycparser, espeakng-loader (missing from the image); torch 2.11 and
  # transformers 5.17 are the image's. The project travels as the working tree, imported from $REPO.
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$REPO
fi
python3 - <<'EOF'
import platform, torch, transformers, soundfile, espeakng_loader
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__} "
      f"({transformers.__file__}), soundfile {soundfile.__version__}")
print("GPU:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# --- b. the tiny pipeline, in a scratch folder (stages write data/, metrics/, report/ under cwd) --
WORK=$(mktemp -d /tmp/pldistill-check.XXXX)
TEACHER_EPOCHS=8 DISTILL_EPOCHS=4
[ "$DRY" = 1 ] && TEACHER_EPOCHS=1 DISTILL_EPOCHS=1
python3 - "$REPO/params.yaml" "$WORK/params.yaml" "$TEACHER_EPOCHS" "$DISTILL_EPOCHS" <<'EOF'
import sys, yaml
src, dst, teacher_epochs, distill_epochs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
p = yaml.safe_load(open(src))
p["train_teacher"]["epochs"], p["distill"]["epochs"] = teacher_epochs, distill_epochs
p["methods"], p["seeds"], p["folds"] = ["pl-distill"], [p["seed"]], [1]  # one student: what the report expects
p["preprocess"]["workers"] = 8  # the device machine has 16 cores
for section in ("train_teacher", "cache", "distill", "evaluate"):
    p[section]["device"] = "auto"  # CUDA with bf16 autocast when present
yaml.safe_dump(p, open(dst, "w"), sort_keys=False)
EOF
mkdir -p "$WORK/data" "$WORK/pretrain"
cp -r "$REPO/data/encoder" "$REPO/data/teacher-init" "$WORK/data/"  # committed, as in a fresh clone: train-teacher starts from them
python3 - "$WORK/params.yaml" "$WORK/pretrain/params.yaml" "$DRY" <<'EOF'
import sys, yaml
p = yaml.safe_load(open(sys.argv[1]))
p["pretrain_encoder"].update(clips=24 if sys.argv[3] == "1" else 200, epochs=1)  # the stage on CUDA, briefly
yaml.safe_dump(p, open(sys.argv[2], "w"), sort_keys=False)
EOF
cd "$WORK"
PLD=(python3 -m pldistill_cli.cli)
ARGS=(--dataset synthetic --fold 1 --params "$WORK/params.yaml")
DEADLINE=$(( $(date +%s) + 200 ))  # the pipeline's budget
stage() {  # stage NAME LIMIT_S CMD...: time one stage; after a failure the later stages are skipped
  local name=$1 limit=$2; shift 2
  if [ ${#FAILED[@]} -gt 0 ]; then echo "== $name: skipped (an earlier stage failed)"; return; fi
  local left=$(( DEADLINE - $(date +%s) ))
  [ $left -lt $limit ] && limit=$left
  if [ $limit -le 0 ]; then echo "== $name: skipped (pipeline budget spent)"; FAILED+=("$name"); return; fi
  echo "== $name"
  local t0=$(date +%s%N)
  timeout "$limit" "$@"; local rc=$?
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '== %s: %d.%d s, exit %d\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) "$rc"
  [ $rc -eq 0 ] || FAILED+=("$name")
}
T0=$(date +%s)
cd "$WORK/pretrain" && stage pretrain-encoder 60 "${PLD[@]}" pretrain-encoder --params "$WORK/pretrain/params.yaml"
cd "$WORK"
stage preprocess 90 "${PLD[@]}" preprocess --dataset synthetic --params "$WORK/params.yaml"
stage train-teacher 90 "${PLD[@]}" train-teacher "${ARGS[@]}"
stage cache-teacher 60 "${PLD[@]}" cache-teacher "${ARGS[@]}"
stage distill 90 "${PLD[@]}" distill "${ARGS[@]}" --method pl-distill
stage evaluate-teacher 60 "${PLD[@]}" evaluate --model teacher "${ARGS[@]}"
stage evaluate-student 60 "${PLD[@]}" evaluate --model student --method pl-distill "${ARGS[@]}"
stage evaluate-references 60 "${PLD[@]}" evaluate --model references "${ARGS[@]}"
# report reads dvc only for `dvc exp` rows and skips them when dvc is missing (report.py)
stage report 60 "${PLD[@]}" report --params "$WORK/params.yaml"
echo "pipeline: $(( $(date +%s) - T0 )) s in $WORK"
[ -f report/report.md ] && sed -n '/^| model/,/^$/p' report/report.md
cd "$REPO"

# --- c. the paper-sized student's training step ----------------------------------------------------
STEP=(python3 scripts/gpu_student_step.py --batch-size 8)
[ "$DRY" = 1 ] && STEP=(python3 scripts/gpu_student_step.py --tiny-check)
echo "== student step: ${STEP[*]}"
timeout 120 "${STEP[@]}" || FAILED+=("student-step")

# --- d. the paper-size ratio table ---------------------------------------------------------------------
RATIOS=(python3 scripts/benchmark.py --print --preset paper --teacher-dtype bf16 --lengths 30 --batch 8)
[ "$DRY" = 1 ] && RATIOS=(python3 scripts/benchmark.py --print --preset small --lengths 3 --batch 2 --quick)
echo "== ratio table: ${RATIOS[*]}"
timeout 200 "${RATIOS[@]}" || FAILED+=("ratio-table")

if [ ${#FAILED[@]} -gt 0 ]; then echo "GPU CHECK FAILED: ${FAILED[*]}"; exit 1; fi
echo "GPU CHECK OK"
