#!/usr/bin/env bash
# The one script a GPU session runs (issue 3), from the repository root of a copy of the tree:
#
#     CLUDA_GIT_REV=<short hash of the tree> bash bench/gpu_check.sh          # on the GPU machine
#     bash bench/gpu_check.sh --dry-run                                       # plumbing, on a CPU
#
# 1. environment (nvidia-smi, python, torch, triton)           -> $OUT/env.txt
# 2. the GPU-marked tests, `python -m pytest -m gpu -q`          -> $OUT/pytest_gpu.log
# 3. the launch variants of the Triton kernels (kernels.triton_infonce.VARIANTS) at N = 131,072
#    and 16,384, C = 512, bfloat16, forward / backward / both      -> rows in pixel_infonce.csv,
#                                                                   $OUT/variants.log
# 4. the GPU benchmark sweep under a time budget                 -> $OUT/pixel_infonce.{csv,md,png},
#                                                                   $OUT/bench.log
# 5. the short table (issue 3's targets, the C=512 bf16 slice), then the variant comparison with
#    the fastest variant per N, printed last.
#
# About 8 minutes on an H100 at most: tests <= 110 s; the variants start no cell after 75 s and
# are stopped at 105 s; the sweep starts no cell after 170 s and is stopped (SIGTERM, reports
# still written) at 230 s. Nothing is installed: the device machine has no network; its python3
# (torch 2.11, triton 3.6) imports the repository through PYTHONPATH.
# --dry-run runs the same steps on a CPU with the quick sweep, and without step 3 unless
# GPU_CHECK_VARIANTS is set. Knobs (environment):
#   OUT                      output folder (default: a new temporary folder)
#   PYTHON                   interpreter (default: python3)
#   CLUDA_GIT_REV            revision stamp when the copy has no .git
#   GPU_CHECK_TESTS          what pytest collects (default: tests)
#   GPU_CHECK_TEST_TIMEOUT   seconds for the tests (default: 110)
#   GPU_CHECK_VARIANTS       variants to compare, comma-separated, "all" or "none" (default: all;
#                            --dry-run: none)
#   GPU_CHECK_VARIANTS_ARGS  their cells (default: --n 131072,16384 --c 512 --dtype bfloat16)
#   GPU_CHECK_VARIANTS_BUDGET_S  variant budget in seconds (default: 75)
#   GPU_CHECK_BUDGET_S       sweep budget in seconds (default: 170)
#   GPU_CHECK_BENCH_ARGS     extra arguments for bench.bench_pixel_infonce
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  *) echo "usage: bash bench/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TESTS="${GPU_CHECK_TESTS:-tests}"
TEST_TIMEOUT="${GPU_CHECK_TEST_TIMEOUT:-110}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-170}"
HARD_LIMIT_S=$((BUDGET_S + 60))
read -r -a EXTRA_ARGS <<< "${GPU_CHECK_BENCH_ARGS:-}"
if [ "$DRY_RUN" = 1 ]; then VARIANTS="${GPU_CHECK_VARIANTS:-none}"; else VARIANTS="${GPU_CHECK_VARIANTS:-all}"; fi
read -r -a VARIANT_ARGS <<< "${GPU_CHECK_VARIANTS_ARGS:---n 131072,16384 --c 512 --dtype bfloat16}"
VARIANTS_BUDGET_S="${GPU_CHECK_VARIANTS_BUDGET_S:-75}"
VARIANTS_HARD_LIMIT_S=$((VARIANTS_BUDGET_S + 30))

# ---- 1. environment ------------------------------------------------------------------------
{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
  echo "dry run: $DRY_RUN"
  if [ "$DRY_RUN" = 0 ]; then nvidia-smi || echo "nvidia-smi failed"; fi
  "$PY" - <<'EOF'
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
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device visible: run with --dry-run on a CPU" >&2
  exit 3
fi

# ---- 2. GPU-marked tests -------------------------------------------------------------------
echo "== pytest -m gpu ($TESTS, at most ${TEST_TIMEOUT}s)"
timeout --signal=TERM --kill-after=15 "$TEST_TIMEOUT" \
  "$PY" -m pytest -m gpu -q -p no:cacheprovider "$TESTS" > "$OUT/pytest_gpu.log" 2>&1
TEST_RC=$?
case $TEST_RC in
  0) TEST_RESULT="passed" ;;
  5) TEST_RESULT="no GPU test collected" ;;
  124|137) TEST_RESULT="stopped after ${TEST_TIMEOUT}s" ;;
  *) TEST_RESULT="FAILED (exit $TEST_RC)" ;;
esac
tail -n 15 "$OUT/pytest_gpu.log"

# ---- 3. launch variants ----------------------------------------------------------------------
# Before the sweep, so that the sweep stays the newest run of the CSV (the plot and the summary).
VARIANTS_RC=0
if [ "$VARIANTS" != none ]; then
  echo "== bench.bench_pixel_infonce --variants $VARIANTS ${VARIANT_ARGS[*]} (stopped at ${VARIANTS_HARD_LIMIT_S}s)"
  timeout --signal=TERM --kill-after=20 "$VARIANTS_HARD_LIMIT_S" \
    "$PY" -m bench.bench_pixel_infonce --variants "$VARIANTS" "${VARIANT_ARGS[@]}" \
    --budget-s "$VARIANTS_BUDGET_S" --out "$OUT" > "$OUT/variants.log" 2>&1
  VARIANTS_RC=$?
  tail -n 3 "$OUT/variants.log"
fi

# ---- 4. benchmark sweep ----------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  SWEEP=(--quick)
else
  SWEEP=(--budget-s "$BUDGET_S")
fi
echo "== bench.bench_pixel_infonce ${SWEEP[*]} ${EXTRA_ARGS[*]:-} (stopped at ${HARD_LIMIT_S}s)"
timeout --signal=TERM --kill-after=30 "$HARD_LIMIT_S" \
  "$PY" -m bench.bench_pixel_infonce "${SWEEP[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} --out "$OUT" \
  > "$OUT/bench.log" 2>&1
BENCH_RC=$?
tail -n 5 "$OUT/bench.log"

# ---- 5. the short tables, last ---------------------------------------------------------------
echo
echo "== summary (files in $OUT: $(cd "$OUT" && ls | tr '\n' ' '))"
echo "GPU tests: $TEST_RESULT; sweep exit code: $BENCH_RC$([ "$VARIANTS" != none ] && echo "; variants exit code: $VARIANTS_RC")"
if [ -s "$OUT/pixel_infonce.csv" ]; then
  "$PY" -m bench.bench_pixel_infonce --report-only --out "$OUT"
  REPORT_RC=$?
else
  echo "no benchmark rows were written: see $OUT/bench.log"
  REPORT_RC=1
fi
if [ "$VARIANTS" != none ]; then
  echo
  # The variants run's own summary: from its header line to the end of its log.
  sed -n '/^== launch variants/,$p' "$OUT/variants.log" | grep . || echo "no variant was measured: see $OUT/variants.log"
fi
if [ "$BENCH_RC" != 0 ] || [ "$VARIANTS_RC" != 0 ] || [ "$REPORT_RC" != 0 ] \
   || { [ "$TEST_RC" != 0 ] && [ "$TEST_RC" != 5 ]; }; then
  exit 1
fi
exit 0
