#!/usr/bin/env bash
# The GPU check: one call of at most 7 minutes on a GPU machine, from the repository root:
#     OUT=/a/folder bash benchmarks/gpu_check.sh
# Stages, the most wanted first, each with its own limit, all under one BUDGET (seconds, default 400):
#   preflight      GPU, nvcc of torch's CUDA major (else nothing else can run: the check fails)
#   build          pip install --no-build-isolation --no-deps . against the machine's torch
#   doctor         python -m fastlaplace.doctor: every op on CUDA against the float64 reference, host
#                  syncs, one sinusoid MAML and LLAMA meta-iteration next to plain PyTorch (doctor.json)
#   bench_meta     seconds per meta-iteration, sinusoid and Conv4, MAML and LLAMA, plain-PyTorch loop
#   bench_kernels  the log-det kernels (fused and composite) against the best plain PyTorch, then the
#                  same with FASTLAPLACE_CUDA_FUSED_MAX_ORDER=0 (composite only) beside it
#   cuda_tests     the fused kernels' ptxas report (tests/test_cuda_resources.py), then pytest tests -m cuda
#                  (one launch per fused op, no host sync, CUDA = CPU)
#   memcheck       compute-sanitizer memcheck (--report-api-errors no: torch's own benign API errors)
#   racecheck      compute-sanitizer racecheck, its hazards counted (any error fails it)
# Each stage ends pass, fail or not-run (no time left for it, its tool missing, or the build failed);
# only a fail fails the check (exit status 1). A stage cut short by the budget, or a benchmark or
# sanitizer stage that runs out of its own limit, is not-run; a build, doctor or test stage that
# runs past its own limit is a fail. Every stage writes its log
# (and figures: doctor.json, RESULTS.md) under $OUT as it ends, and summary.txt is rewritten after
# each stage, so a run cut short keeps what it measured. Python runs outside the repository, so
# that the installed package is what is checked. A second call on the same machine compiles
# nothing: the build finds its kernels in build/kernel-cache (CMakeLists.txt).
#
# For the check's own test, GPU_CHECK_<STAGE> (e.g. GPU_CHECK_DOCTOR='exit 1') replaces a stage's
# command, and GPU_CHECK_MIN_STAGE (default 20) is the fewest seconds a stage is started with.
set -uo pipefail
REPO=$(pwd)
export OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
BUDGET=${BUDGET:-400}
MIN_STAGE=${GPU_CHECK_MIN_STAGE:-20}
START=$(date +%s)
RUNDIR=$(mktemp -d)
export PYTHONUNBUFFERED=1 FASTLAPLACE_CUDA=ON FASTLAPLACE_CUDA_ARCHS=${FASTLAPLACE_CUDA_ARCHS:-90}
export CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-lineinfo" PATH="$PATH:/usr/local/cuda/bin"
STAGES=(preflight build doctor bench_meta bench_kernels cuda_tests memcheck racecheck)
BEST_EFFORT=" bench_meta bench_kernels memcheck racecheck "  # running out of time: not-run, not fail
declare -A STATUS SECONDS_TAKEN DETAIL
CURRENT="" CHILD=""

summary() {  # rewrite $OUT/summary.txt: one line per stage, then the verdict
  local line="SUMMARY" failed=0 s
  {
    for s in "${STAGES[@]}"; do
      printf '%-14s %-8s %5ss  %s\n' "$s" "${STATUS[$s]:-not-run}" "${SECONDS_TAKEN[$s]:--}" "${DETAIL[$s]:-}"
      line+=" $s=${STATUS[$s]:-not-run}"
      [[ ${STATUS[$s]:-} == fail ]] && failed=1
    done
    echo "$line total=$(($(date +%s) - START))s verdict=$( ((failed)) && echo FAILED || echo PASSED)"
  } >"$OUT/summary.txt.tmp"
  mv "$OUT/summary.txt.tmp" "$OUT/summary.txt"
  return $failed
}

killed() {
  [[ -n $CHILD ]] && kill -TERM "$CHILD" 2>/dev/null
  [[ -n $CURRENT ]] && STATUS[$CURRENT]=not-run && DETAIL[$CURRENT]="stopped from outside"
  summary
  cat "$OUT/summary.txt"
  exit 124
}
trap killed TERM INT

# stage NAME LIMIT 'default command' [judge]: runs the command (or $GPU_CHECK_NAME) under its
# limit, logging to $OUT/NAME.log; the judge (a function of the log and exit status) may refine
# pass/fail, e.g. by parsing a sanitizer's summary.
stage() {
  local name=$1 limit=$2 default=$3 judge=${4:-}
  local var="GPU_CHECK_${name^^}" left=$((BUDGET - ($(date +%s) - START)))
  local cmd=${!var-$default} log="$OUT/$name.log"  # set but empty: no command (a missing tool)
  if [[ -z $cmd ]]; then
    STATUS[$name]=not-run; DETAIL[$name]="tool missing"
  elif ((left < MIN_STAGE)); then
    STATUS[$name]=not-run; DETAIL[$name]="${left}s of the budget left"
  else
    local cut=0
    ((limit > left)) && limit=$left cut=1
    echo "== $name (limit ${limit}s): $cmd" >"$log"
    CURRENT=$name
    local t0=$SECONDS rc
    timeout -k 5 "$limit" bash -c "$cmd" >>"$log" 2>&1 &
    CHILD=$!
    wait $CHILD  # in the background, so that TERM reaches the trap at once
    rc=$?
    CURRENT="" CHILD=""
    SECONDS_TAKEN[$name]=$((SECONDS - t0))
    if ((rc == 124 || rc == 137)); then
      DETAIL[$name]="ran past its ${limit}s"
      ((cut)) && DETAIL[$name]+=" (all the budget had left)"
      if ((cut)) || [[ $BEST_EFFORT == *" $name "* ]]; then STATUS[$name]=not-run; else STATUS[$name]=fail; fi
    else
      ((rc == 0)) && STATUS[$name]=pass || STATUS[$name]=fail
      DETAIL[$name]="exit status $rc"
      [[ -n $judge ]] && $judge "$name" "$log" "$rc"
    fi
  fi
  # The benchmarks rewrite their blocks of RESULTS.md: copied out fresh after each that passed.
  [[ $name == bench_* && ${STATUS[$name]} == pass ]] && cp "$REPO/benchmarks/RESULTS.md" "$OUT/RESULTS.md"
  summary
  echo "== $name: ${STATUS[$name]} (${SECONDS_TAKEN[$name]:-0}s) ${DETAIL[$name]}"
  tail -n 3 "$log" 2>/dev/null | sed 's/^/   /'
}

judge_doctor() {
  local verdict
  verdict=$(grep -E '^verdict:' "$2" | tail -n 1 | cut -c1-160)
  [[ -n $verdict ]] && DETAIL[$1]=$verdict
}
judge_pytest() {  # a pass needs a test that passed: a GPU that pytest does not see skips them all
  DETAIL[$1]=$(grep -E '[0-9]+ (passed|failed|skipped)' "$2" | tail -n 1 | tr -d '=' | xargs)
  [[ ${STATUS[$1]} == pass ]] && ! grep -qE '[0-9]+ passed' "$2" && STATUS[$1]=fail && DETAIL[$1]+=" (none passed)"
}
judge_memcheck() {
  local errors
  errors=$(grep -oE 'ERROR SUMMARY: [0-9]+' "$2" | tail -n 1 | grep -oE '[0-9]+$')
  [[ -z $errors ]] && STATUS[$1]=fail && DETAIL[$1]+=", no ERROR SUMMARY" && return
  ((errors > 0)) && STATUS[$1]=fail
  DETAIL[$1]="$errors errors, exit status $3"
}
judge_racecheck() {  # "RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)"
  local line errors
  line=$(grep -E 'RACECHECK SUMMARY' "$2" | tail -n 1)
  [[ -z $line ]] && STATUS[$1]=fail && DETAIL[$1]+=", no RACECHECK SUMMARY" && return
  errors=$(grep -oE '[0-9]+ errors?' <<<"$line" | grep -oE '^[0-9]+')
  ((${errors:-0} > 0)) && STATUS[$1]=fail || STATUS[$1]=pass
  DETAIL[$1]=${line#*SUMMARY: }
}

PREFLIGHT="nvidia-smi -L && nvcc --version | tail -n 2 && cmake --version | head -n 1 && python3 -c \"
import re, subprocess, sys, torch
nv = re.search(r'release (\d+)\.', subprocess.run(['nvcc', '--version'], capture_output=True, text=True).stdout)
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)
ok = bool(nv) and torch.cuda.is_available() and (torch.version.cuda or '').split('.')[0] == nv.group(1)
sys.exit(0 if ok else 'preflight: need a GPU that torch sees and nvcc of the CUDA major version torch was built with')\""
stage preflight 60 "$PREFLIGHT"
[[ ${STATUS[preflight]} == pass ]] && stage build 240 "python3 -m pip install --no-build-isolation --no-deps -v '$REPO'"
if [[ ${STATUS[build]:-} != pass ]]; then
  DETAIL[doctor]="no build"
  summary
  cat "$OUT/summary.txt"
  exit 1
fi
stage doctor 60 "cd '$RUNDIR' && python3 -m fastlaplace.doctor --device cuda --json '$OUT/doctor.json'" judge_doctor
stage bench_meta 60 "python3 benchmarks/bench_meta.py --device cuda --reps 5 --conv-iterations 3"
stage bench_kernels 60 "python3 benchmarks/bench_kernels.py --device cuda --quick && \
  FASTLAPLACE_CUDA_FUSED_MAX_ORDER=0 python3 benchmarks/bench_kernels.py --device cuda --quick --sinusoid-only --no-write"
TIMEOUT=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
# The resource report of the fused kernels (ptxas, kept by the build) is checked here too.
stage cuda_tests 120 "cd '$RUNDIR' && python3 -m pytest '$REPO/tests/test_cuda_resources.py' -q -p no:cacheprovider && \
  python3 -m pytest '$REPO/tests' -m cuda -q -rfE -p no:cacheprovider $TIMEOUT" judge_pytest
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
# Only fastlaplace's kernels are instrumented; the workload is the doctor's checks of every op.
WORKLOAD="--print-limit 20 --kernel-name kns=fastlaplace python3 -m fastlaplace.doctor --device cuda --checks-only"
stage memcheck 90 "${CS:+cd '$RUNDIR' && '$CS' --tool memcheck --report-api-errors no $WORKLOAD}" judge_memcheck
stage racecheck 90 "${CS:+cd '$RUNDIR' && '$CS' --tool racecheck $WORKLOAD}" judge_racecheck
summary
status=$?
cat "$OUT/summary.txt"
exit $status
