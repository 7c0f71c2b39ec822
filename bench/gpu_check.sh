#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root of a copy of the tree. Three modes,
# each one call of the device tool:
#
#     CLUDA_GIT_REV=<short hash> bash bench/gpu_check.sh            # GPU tests, training steps,
#                                                                  # kernel sweep (~6 min)
#     CLUDA_GIT_REV=<short hash> bash bench/gpu_check.sh --train    # the training measurements
#                                                                  # (<= 9 min: timeout_s=560)
#     CLUDA_GIT_REV=<short hash> bash bench/gpu_check.sh --kernel   # the launch presets against
#                                                                  # each other (<= 9 min)
#     bash bench/gpu_check.sh [--train | --kernel] --dry-run        # the plumbing, on a CPU
#
# Default mode:
# 1. environment (nvidia-smi, python, torch, triton)
# 2. the GPU-marked tests, `python -m pytest -m gpu -q`
# 3. training steps of the paper configs on synthetic data, and the HRDA slide-inference case
#    (bench/train_steps.py)                           -> $OUT/train_steps.{csv,md}
# 4. optionally, the launch presets of the Triton kernels (kernels.triton_infonce.VARIANTS) at
#    N = 131,072 and 16,384, C = 512, bfloat16        -> rows in $OUT/pixel_infonce.csv
# 5. the GPU benchmark sweep under a time budget      -> $OUT/pixel_infonce.{csv,md,png}
# 6. the short tables, printed last: the kernel's targets and the C=512 bf16 slice, the preset
#    comparison (when run) with the fastest preset per N, the training step times.
# The training steps run before the kernel steps: the kernel's H200 numbers are committed
# (bench/results/pixel_infonce.csv) and a GPU training step time is what no lease has measured.
# Every step's log goes to $OUT/gpu_check.log (one file: the device tool returns at most 8).
#
# About 6 minutes on an H100 / H200 at most: tests <= 100 s; the training cases start none after
# 150 s and are stopped at 230 s; the sweep starts no cell after 120 s and is stopped (SIGTERM,
# reports still written) at 180 s; the presets, when asked for, start no cell after 75 s and are
# stopped at 105 s. Nothing is installed: the device machine has no network; its python3
# (torch 2.11, triton 3.6) imports the repository through PYTHONPATH.
# --dry-run runs the same steps on a CPU with the quick sweep and the quick training cases.
# Knobs (environment):
#   OUT                      output folder (default: a new temporary folder)
#   PYTHON                   interpreter (default: python3)
#   CLUDA_GIT_REV            revision stamp when the copy has no .git
#   GPU_CHECK_TESTS          what pytest collects (default: tests)
#   GPU_CHECK_TEST_TIMEOUT   seconds for the tests (default: 100)
#   GPU_CHECK_VARIANTS       presets to compare, comma-separated, "all" or "none" (default: none;
#                            the H200 run of 2026-11-27 picked the default, see bench/NOTES.md)
#   GPU_CHECK_VARIANTS_ARGS  their cells (default: --n 131072,16384 --c 512 --dtype bfloat16)
#   GPU_CHECK_VARIANTS_BUDGET_S  preset budget in seconds (default: 75)
#   GPU_CHECK_BUDGET_S       sweep budget in seconds (default: 120; 0 skips step 5)
#   GPU_CHECK_BENCH_ARGS     extra arguments for bench.bench_pixel_infonce
#   GPU_CHECK_TRAIN_BUDGET_S training budget in seconds (default: 150; 0 skips step 3)
#   GPU_CHECK_TRAIN_ARGS     extra arguments for bench.train_steps (e.g. --cases daformer,hrda)
#
# --train: the training measurements, in one call of at most ~9 minutes (`run` with
# timeout_s=560), no GPU tests and no kernel steps:
# 1. environment (as above)
# 2. the training cases at each config's crop and batch size, 25 iterations each, and the HRDA +
#    CLUDA slide inference of one 1024 x 2048 image: daformer, daformer_cluda, hrda, hrda_cluda,
#    eval_hrda_slide, daformer_cluda_65 (none started after 180 s, stopped at 260 s; a stopped
#    case keeps the windows it logged)                -> $OUT/train_steps.{csv,md}
# 3. the stability run: HRDA + CLUDA for 300 iterations (`--stability 300`: every term finite,
#    loss going down, memory flat after iteration 50), stopped when the call's total of 530 s is
#    reached (the verdict is then on the windows logged so far) -> rows in the same files
# 4. the training table, last (bench.train_steps --report-only)
# Knobs: GPU_CHECK_TRAIN_CASES (step 2's cases, comma-separated), GPU_CHECK_TRAIN_BUDGET_S (step
# 2's start budget, default 180), GPU_CHECK_STABILITY (iterations, default 300; 0 skips step 3),
# GPU_CHECK_TRAIN_TOTAL_S (the call's limit, default 530), GPU_CHECK_TRAIN_ARGS (extra arguments
# for both steps). --dry-run: the tiny demo cases on the CPU and a 4-iteration stability run.
#
# --kernel: the launch presets measured against each other (one call of at most ~8 minutes:
# `run` with timeout_s=540), every step under its own time limit:
# 1. environment (as above)
# 2. the GPU tests as a gate: `pytest -m gpu -k "$GPU_CHECK_KERNEL_TESTS"` (<= 150 s; every
#    preset against the float64 reference with every optional input, and determinism)
# 3. bench.kernel_probe --prepare (<= 120 s): same-run references (8192^3 bf16 matmul, the
#    shape-matched 8192 x ~118K x 512 product), SM clock, a compile warm-up of every preset at
#    N = 4,096 (compile seconds logged), every preset against the tiled torch path at N = 32,768
#                                                     -> $OUT/kernel_probe.json
# 4. the main cell, N = 131,072, C = 512, bfloat16, fwd / bwd / fwd+bwd, memory and determinism,
#    for every preset that passed the gate (<= 110 s)  -> rows in $OUT/pixel_infonce.csv
# 5. the regression cells (<= 90 s): N = 16,384 / C = 512 and N = 131,072 / C = 256 for those
#    presets; N = 131,072 / C = 768 and float32 N = 16,384 / C = 256 for the default only (every
#    preset runs the same kernels there)
# 6. the short table, last (bench.kernel_probe --report)
# Knobs: GPU_CHECK_KERNEL_VARIANTS (default resident,split,split_tma,split_m32; the default
# preset first), GPU_CHECK_KERNEL_TESTS (the pytest -k filter).
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
DRY_RUN=0
KERNEL=0
TRAIN_MODE=0
USAGE="usage: bash bench/gpu_check.sh [--train | --kernel] [--dry-run]"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --kernel) KERNEL=1 ;;
    --train) TRAIN_MODE=1 ;;
    *) echo "$USAGE" >&2; exit 2 ;;
  esac
done
if [ "$KERNEL" = 1 ] && [ "$TRAIN_MODE" = 1 ]; then
  echo "--train and --kernel are two calls: pick one. $USAGE" >&2
  exit 2
fi
MODE_NAME=default
if [ "$KERNEL" = 1 ]; then MODE_NAME=kernel; elif [ "$TRAIN_MODE" = 1 ]; then MODE_NAME=train; fi

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TESTS="${GPU_CHECK_TESTS:-tests}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-100}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-120}"
HARD_LIMIT_S=$((BUDGET_S + 60))
read -r -a EXTRA_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
VARIANTS="${GPU_CHECK_VARIANTS:-none}"
read -r -a VARIANT_ARGS <<< "${GPU_CHECK_VARIANTS_ARGS:---n 131072,16384 --c 512 --dtype bfloat16}"
VARIANTS_BUDGET_S="${GPU_CHECK_VARIANTS_BUDGET_S:-75}"
VARIANTS_HARD_LIMIT_S=$((VARIANTS_BUDGET_S + 30))
TRAIN_BUDGET_S="${GPU_CHECK_TRAIN_BUDGET_S:-150}"
TRAIN_HARD_LIMIT_S=$((TRAIN_BUDGET_S + 80))
read -r -a TRAIN_ARGS <<< "${GPU_CHECK_TRAIN_ARGS:-}"

# Step logs live in LOGS and are gathered into $OUT/gpu_check.log when the script ends, however
# it ends.
LOGS="$(mktemp -d)"
gather_logs() {
  for f in env pytest_gpu kernel_probe variants regression_all bench train_steps stability; do
    if [ -f "$LOGS/$f.log" ]; then echo "==================== $f.log"; cat "$LOGS/$f.log"; fi
  done > "$OUT/gpu_check.log"
  rm -rf "$LOGS"
}
trap gather_logs EXIT

# ---- 1. environment ------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "dry run: $DRY_RUN; mode: $MODE_NAME"
  if [ "$DRY_RUN" = 0 ]; then nvidia-smi || echo "nvidia-smi failed"; fi
  "$PY" - <<'PYEOF'
import sys
import torch
print("python", sys.version.split()[0], sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", p.multi_processor_count, "SMs")
try:
    import triton
    print("triton", triton.__version__)
except ImportError as exc:
    print("triton: not importable:", exc)
from bench.utils import git_revision
print("revision", git_revision())
PYEOF
} > "$LOGS/env.log" 2>&1
cat "$LOGS/env.log"
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible: run with --dry-run on a CPU" >&2
  exit 3
fi

# run_step LOG LIMIT_S KILL_AFTER_S TAIL_LINES CMD...: CMD under a hard time limit (SIGTERM, then
# SIGKILL after KILL_AFTER_S), its output in $LOGS/LOG.log, the last TAIL_LINES lines shown;
# returns CMD's exit code (124 / 137 when stopped).
run_step() {
  local log="$LOGS/$1.log" limit="$2" kill_after="$3" lines="$4"
  shift 4
  timeout --signal=TERM --kill-after="$kill_after" "$limit" "$@" > "$log" 2>&1
  local rc=$?
  tail -n "$lines" "$log"
  return $rc
}

if [ "$TRAIN_MODE" = 1 ]; then
  TOTAL_S="${GPU_CHECK_TRAIN_TOTAL_S:-530}"
  CASES_BUDGET_S="${GPU_CHECK_TRAIN_BUDGET_S:-180}"
  CASES_LIMIT_S=$((CASES_BUDGET_S + 80))
  if [ "$DRY_RUN" = 1 ]; then
    MODE=(--quick)
    CASES="${GPU_CHECK_TRAIN_CASES:-demo_tiny,demo_tiny_no_cl,eval_demo_tiny}"
    STABILITY="${GPU_CHECK_STABILITY:-4}"
  else
    MODE=()
    CASES="${GPU_CHECK_TRAIN_CASES:-daformer,daformer_cluda,hrda,hrda_cluda,eval_hrda_slide,daformer_cluda_65}"
    STABILITY="${GPU_CHECK_STABILITY:-300}"
  fi
  # step_result RC: how a training step ended. Stopped at its limit (SIGTERM), the case in
  # progress keeps the windows it logged; killed (SIGKILL, it did not stop in time), it has no row.
  step_result() {
    case $1 in 0) echo "ok" ;; 124) echo "stopped at its time limit (rows kept)" ;;
      137) echo "KILLED at its time limit (the case in progress has no row)" ;;
      *) echo "FAILED (exit $1)" ;; esac
  }
  echo "== bench.train_steps ${MODE[*]} --cases $CASES ${TRAIN_ARGS[*]:-} (none started after" \
       "${CASES_BUDGET_S}s, stopped at ${CASES_LIMIT_S}s)"
  run_step train_steps "$CASES_LIMIT_S" 20 3 "$PY" -m bench.train_steps ${MODE[@]+"${MODE[@]}"} \
    --cases "$CASES" --budget-s "$CASES_BUDGET_S" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} --out "$OUT"
  CASES_RC=$?
  STABILITY_RC=0
  STABILITY_RESULT="skipped (GPU_CHECK_STABILITY=0)"
  if [ "$STABILITY" != 0 ]; then
    LEFT=$((TOTAL_S - SECONDS - 20))  # 20 s for the table at the end
    if [ "$LEFT" -lt 60 ]; then
      STABILITY_RESULT="skipped (${LEFT}s left of ${TOTAL_S}s)"
      STABILITY_RC=1
    else
      echo "== bench.train_steps ${MODE[*]} --stability $STABILITY ${TRAIN_ARGS[*]:-} (stopped at ${LEFT}s)"
      run_step stability "$LEFT" 15 3 "$PY" -m bench.train_steps ${MODE[@]+"${MODE[@]}"} \
        --cases "" --stability "$STABILITY" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} --out "$OUT"
      STABILITY_RC=$?
      STABILITY_RESULT="$(step_result $STABILITY_RC)"
    fi
  fi
  echo
  echo "== summary (files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')+ gpu_check.log)"
  echo "training cases: $(step_result $CASES_RC); stability run ($STABILITY iterations): $STABILITY_RESULT"
  REPORT_RC=0
  if [ -s "$OUT/train_steps.csv" ]; then
    echo "training steps (paper configs on the synthetic pair, from scratch; train_steps.md):"
    "$PY" -m bench.train_steps --report-only --out "$OUT" || REPORT_RC=1
    # A stopped step exits 124 whatever its rows say: the rows decide (an error, an OOM or an
    # unstable verdict fails the call).
    "$PY" - "$OUT/train_steps.csv" <<'PYEOF' || REPORT_RC=1
import csv, sys
with open(sys.argv[1], newline="") as f:
    bad = [r["case"] for r in csv.DictReader(f)
           if not (r["status"] == "ok" or r["status"].startswith(("skipped", "stopped")))]
sys.exit(1 if bad else 0)
PYEOF
  else
    echo "no training rows were written: see gpu_check.log"
    REPORT_RC=1
  fi
  for rc in "$CASES_RC" "$STABILITY_RC" "$REPORT_RC"; do
    case $rc in 0|124) ;; *) exit 1 ;; esac
  done
  exit 0
fi

if [ "$KERNEL" = 1 ]; then
  KVARIANTS="${GPU_CHECK_KERNEL_VARIANTS:-resident,split,split_tma,split_m32}"
  KDEFAULT="${KVARIANTS%%,*}"
  KTESTS="${GPU_CHECK_KERNEL_TESTS:-variants or determinis}"
  if [ "$DRY_RUN" = 1 ]; then
    # The interpreter: float16 (it has no bfloat16) so that the split kernels run, tiny cells.
    MAIN=(--n 96 --c 16 --dtype float16)
    PROBE=("${MAIN[@]}" --gate-n 80 --warm-n 64)
    REG_ALL=("--n 64 --c 16 --dtype float16")
    REG_DEFAULT=("--n 64 --c 24 --dtype float32")
    BENCH_EXTRA=(--no-det)
  else
    MAIN=(--n 131072 --c 512 --dtype bfloat16)
    PROBE=("${MAIN[@]}")
    REG_ALL=("--n 16384 --c 512 --dtype bfloat16" "--n 131072 --c 256 --dtype bfloat16")
    REG_DEFAULT=("--n 131072 --c 768 --dtype bfloat16" "--n 16384 --c 256 --dtype float32")
    BENCH_EXTRA=()
  fi
  echo "== pytest -m gpu -k \"$KTESTS\" ($TESTS, at most ${GPU_CHECK_TEST_TIMEOUT:-150}s)"
  run_step pytest_gpu "${GPU_CHECK_TEST_TIMEOUT:-150}" 10 15 \
    "$PY" -m pytest -m gpu -q -p no:cacheprovider "$TESTS" -k "$KTESTS"
  TEST_RC=$?
  echo "== bench.kernel_probe --prepare --variants $KVARIANTS ${PROBE[*]} (stopped at 120s)"
  run_step kernel_probe 120 10 30 \
    "$PY" -m bench.kernel_probe --prepare --variants "$KVARIANTS" "${PROBE[@]}" --out "$OUT"
  PROBE_RC=$?
  PASSING=""
  if [ "$PROBE_RC" = 0 ]; then PASSING="$("$PY" -m bench.kernel_probe --passing --out "$OUT")"; fi
  CELLS_RC=0
  if [ -n "$PASSING" ]; then
    echo "== main cell: bench.bench_pixel_infonce --variants $PASSING ${MAIN[*]} (stopped at 110s)"
    run_step variants 110 10 3 "$PY" -m bench.bench_pixel_infonce --variants "$PASSING" \
      "${MAIN[@]}" --budget-s 85 ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"} --out "$OUT" || CELLS_RC=1
    START=$SECONDS
    for cell in "${REG_ALL[@]}" "${REG_DEFAULT[@]}"; do
      read -r -a CELL <<< "$cell"
      case " ${REG_ALL[*]} " in *" $cell "*) WHO="$PASSING" ;; *) WHO="$KDEFAULT" ;; esac
      LEFT=$((90 - (SECONDS - START)))
      if [ "$LEFT" -lt 15 ]; then echo "regression cell $cell: skipped (time)"; continue; fi
      echo "== regression cell: --variants $WHO $cell (stopped at ${LEFT}s)"
      run_step regression "$LEFT" 10 2 "$PY" -m bench.bench_pixel_infonce --variants "$WHO" \
        "${CELL[@]}" --budget-s $((LEFT - 10)) ${BENCH_EXTRA[@]+"${BENCH_EXTRA[@]}"} \
        --out "$OUT"
      case $? in 0|124|137) ;; *) CELLS_RC=1 ;; esac  # a cell stopped for time is not a failure
      cat "$LOGS/regression.log" >> "$LOGS/regression_all.log"
    done
  else
    echo "no preset passed the gate: nothing timed (see gpu_check.log)"
    CELLS_RC=1
  fi
  echo
  case $TEST_RC in 0) T="passed" ;; 5) T="no GPU test collected" ;;
    124|137) T="stopped" ;; *) T="FAILED (exit $TEST_RC)" ;; esac
  echo "== summary (files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')+ gpu_check.log)"
  echo "GPU tests: $T; probe exit code: $PROBE_RC; timed presets: ${PASSING:-none}"
  REPORT_RC=0
  if [ -s "$OUT/kernel_probe.json" ]; then
    "$PY" -m bench.kernel_probe --report --out "$OUT" || REPORT_RC=1
  else
    REPORT_RC=1
  fi
  if [ "$PROBE_RC" != 0 ] || [ "$CELLS_RC" != 0 ] || [ "$REPORT_RC" != 0 ] \
     || { [ "$TEST_RC" != 0 ] && [ "$TEST_RC" != 5 ]; }; then
    exit 1
  fi
  exit 0
fi

# ---- 2. GPU-marked tests -------------------------------------------------------------------
echo "== pytest -m gpu ($TESTS, at most ${TEST_TIMEOUT}s)"
run_step pytest_gpu "$TEST_TIMEOUT" 15 15 "$PY" -m pytest -m gpu -q -p no:cacheprovider "$TESTS"
TEST_RC=$?
case $TEST_RC in
  0) TEST_RESULT="passed" ;;
  5) TEST_RESULT="no GPU test collected" ;;
  124|137) TEST_RESULT="stopped after ${TEST_TIMEOUT}s" ;;
  *) TEST_RESULT="FAILED (exit $TEST_RC)" ;;
esac

# ---- 3. training steps -----------------------------------------------------------------------
TRAIN_RC=0
if [ "$TRAIN_BUDGET_S" != 0 ]; then
  if [ "$DRY_RUN" = 1 ]; then TRAIN=(--quick); else TRAIN=(--budget-s "$TRAIN_BUDGET_S"); fi
  echo "== bench.train_steps ${TRAIN[*]} ${TRAIN_ARGS[*]:-} (stopped at ${TRAIN_HARD_LIMIT_S}s)"
  run_step train_steps "$TRAIN_HARD_LIMIT_S" 20 3 \
    "$PY" -m bench.train_steps "${TRAIN[@]}" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"} --out "$OUT"
  TRAIN_RC=$?
fi

# ---- 4. launch variants (optional) ---------------------------------------------------------
# Before the sweep, so that the sweep stays the newest run of the CSV (the plot and the summary).
VARIANTS_RC=0
if [ "$VARIANTS" != none ]; then
  echo "== bench.bench_pixel_infonce --variants $VARIANTS ${VARIANT_ARGS[*]} (stopped at ${VARIANTS_HARD_LIMIT_S}s)"
  run_step variants "$VARIANTS_HARD_LIMIT_S" 20 3 \
    "$PY" -m bench.bench_pixel_infonce --variants "$VARIANTS" "${VARIANT_ARGS[@]}" \
    --budget-s "$VARIANTS_BUDGET_S" --out "$OUT"
  VARIANTS_RC=$?
fi

# ---- 5. benchmark sweep ----------------------------------------------------------------------
BENCH_RC=0
if [ "$BUDGET_S" != 0 ]; then
  if [ "$DRY_RUN" = 1 ]; then SWEEP=(--quick); else SWEEP=(--budget-s "$BUDGET_S"); fi
  echo "== bench.bench_pixel_infonce ${SWEEP[*]} ${EXTRA_ARGS[*]:-} (stopped at ${HARD_LIMIT_S}s)"
  run_step bench "$HARD_LIMIT_S" 30 5 \
    "$PY" -m bench.bench_pixel_infonce "${SWEEP[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} --out "$OUT"
  BENCH_RC=$?
fi

# ---- 6. the short tables, last ---------------------------------------------------------------
echo
echo "== summary (files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')+ gpu_check.log)"
STEPS="GPU tests: $TEST_RESULT"
if [ "$BUDGET_S" != 0 ]; then STEPS="$STEPS; sweep exit code: $BENCH_RC"; else STEPS="$STEPS; sweep skipped"; fi
if [ "$VARIANTS" != none ]; then STEPS="$STEPS; variants exit code: $VARIANTS_RC"; fi
if [ "$TRAIN_BUDGET_S" != 0 ]; then STEPS="$STEPS; training exit code: $TRAIN_RC"; fi
echo "$STEPS"
REPORT_RC=0
if [ -s "$OUT/pixel_infonce.csv" ]; then
  "$PY" -m bench.bench_pixel_infonce --report-only --out "$OUT"
  REPORT_RC=$?
elif [ "$BUDGET_S" != 0 ] || [ "$VARIANTS" != none ]; then
  echo "no benchmark rows were written: see gpu_check.log"
  REPORT_RC=1
fi
if [ "$VARIANTS" != none ]; then
  echo
  # The variants run's own summary: from its header line to the end of its log.
  sed -n '/^== launch variants/,$p' "$LOGS/variants.log" | grep . || echo "no variant was measured: see gpu_check.log"
fi
if [ "$TRAIN_BUDGET_S" != 0 ]; then
  echo
  if [ -s "$OUT/train_steps.csv" ]; then
    echo "training steps (paper configs on the synthetic pair, from scratch; train_steps.md):"
    "$PY" -m bench.train_steps --report-only --out "$OUT" || TRAIN_RC=1
  else
    echo "no training rows were written: see gpu_check.log"
    TRAIN_RC=1
  fi
fi
if [ "$BENCH_RC" != 0 ] || [ "$VARIANTS_RC" != 0 ] || [ "$REPORT_RC" != 0 ] || [ "$TRAIN_RC" != 0 ] \
   || { [ "$TEST_RC" != 0 ] && [ "$TEST_RC" != 5 ]; }; then
  exit 1
fi
exit 0
