#!/usr/bin/env bash
# One prepared GPU run (on the GPU machine, from the repo root):  bash benchmarks/gpu_check.sh  (allow 420 s).
# Stages in priority order, each with its own limit, all under one BUDGET (default 360 s, excluding
# the machine's start): preflight, build, smoke (benchmarks/gpu_smoke.py), CUDA tests, sanitizer,
# benchmarks. A stage that no longer fits is skipped and said so. Python always runs outside the repository so
# that the installed package, not the source tree, is imported. Exactly 8 files land in $OUT.
# Exit status 1 unless build, smoke, pytest and memcheck all passed; last line: SUMMARY ...
# Rerun on the same machine, benchmarks only:
#   SKIP_BUILD=1 SKIP='smoke pytest memcheck racecheck' BUDGET=240 bash benchmarks/gpu_check.sh
set -uo pipefail
REPO=$(pwd)
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
START=$(date +%s)
RUNDIR=$(mktemp -d)  # Python runs here, so that the installed package is imported, not the source tree
BUDGET=${BUDGET:-360}
export PYTHONUNBUFFERED=1 FASTLAPLACE_CUDA=ON FASTLAPLACE_CUDA_ARCHS=90 CMAKE_ARGS="-DCMAKE_CUDA_FLAGS=-lineinfo"
export PATH="$PATH:/usr/local/cuda/bin"
S="$OUT/summary.txt"
declare -A ST

stage() {  # stage NAME MAX_SECONDS LOGFILE 'shell command'
  local name=$1 max=$2 log=$3 cmd=$4
  local left=$((BUDGET - ($(date +%s) - START)))
  if [[ " ${SKIP:-} " == *" $name "* ]]; then ST[$name]=skip; echo "== $name skipped (SKIP)" | tee -a "$S"; return; fi
  if ((left < 25)); then ST[$name]="skipped"; echo "== $name SKIPPED (${left}s left)" | tee -a "$S"; return; fi
  ((max > left - 5)) && max=$((left - 5))
  echo "== $name (limit ${max}s): $cmd" | tee -a "$S" "$log" >/dev/null
  local t0=$(date +%s)
  timeout -k 5 "$max" bash -c "$cmd" >>"$log" 2>&1
  local rc=$?
  ST[$name]=$rc
  echo "== $name rc=$rc in $(($(date +%s) - t0))s" | tee -a "$S"
  grep -E '^(FAIL|INFO|SUMMARY)|(passed|failed|error)|ERROR SUMMARY|RACECHECK SUMMARY|Error|error:' "$log" | tail -n 25
}

# --- preflight (seconds): versions, and that nvcc's CUDA major matches torch's ---------------------
{
  nvidia-smi -L
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  nvcc --version | tail -n 2
  cmake --version | head -n 1
  python3 -m pip show scikit-build-core pybind11 ninja pytest-timeout 2>/dev/null | grep -E '^(Name|Version)'
  echo "compute-sanitizer: $(command -v compute-sanitizer)"
} >>"$S" 2>&1
cat "$S"
python3 - >>"$S" 2>&1 <<'EOF'
import re, subprocess, sys, torch
nv = re.search(r"release (\d+)\.", subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout)
ok = bool(nv) and torch.cuda.is_available() and torch.version.cuda and nv.group(1) == torch.version.cuda.split(".")[0]
print("preflight", "ok" if ok else "FAILED: need a GPU and nvcc with torch's CUDA major version")
sys.exit(0 if ok else 1)
EOF
if (($? != 0)); then tail -n 1 "$S"; echo "SUMMARY preflight=FAILED"; exit 1; fi

# --- build against the machine's own torch (no network, no build isolation) ------------------------
if [[ ${SKIP_BUILD:-0} == 1 ]] && (cd "$RUNDIR" && python3 -c "import fastlaplace; assert fastlaplace.has_cuda()"); then
  ST[build]=0; echo "== build skipped (SKIP_BUILD=1, installed build has CUDA)" | tee -a "$S"
else
  stage build 240 "$OUT/build.log" "python3 -m pip install --no-build-isolation --no-deps -v '$REPO'"
fi
grep -E 'fastlaplace: (torch|building)' "$OUT/build.log" 2>/dev/null | tee -a "$S"
if [[ ${ST[build]} != 0 ]]; then tail -n 40 "$OUT/build.log"; echo "SUMMARY build=${ST[build]}"; exit 1; fi

# --- correctness against the CPU kernels, syncs, launches, timings ----------------------------------
stage smoke 100 "$OUT/smoke.log" "cd '$RUNDIR' && python3 '$REPO/benchmarks/gpu_smoke.py'"
# --- the CUDA tests: no -x (see every failure), a per-test limit ------------------------------------
TO=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout=60")
stage pytest 150 "$OUT/pytest.log" "cd '$RUNDIR' && python3 -m pytest '$REPO/tests' -m cuda -q -rfE -p no:cacheprovider --maxfail=25 $TO"
[[ ${ST[pytest]} == 0 ]] && ! grep -qE '[0-9]+ passed' "$OUT/pytest.log" && ST[pytest]="no-test-passed"
# --- compute-sanitizer on a tiny workload (only our kernels instrumented for memcheck/racecheck) ----
CS=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
if [[ -n $CS ]]; then
  for tool in memcheck racecheck; do
    stage "$tool" 60 "$OUT/sanitizer.log" "cd '$RUNDIR' && '$CS' --tool $tool --error-exitcode 9 --print-limit 20 --kernel-name kns=fastlaplace python3 '$REPO/benchmarks/gpu_smoke.py' --tiny"
  done
else
  ST[memcheck]="no-compute-sanitizer"
fi
# --- benchmarks: only if time is left ---------------------------------------------------------------
stage bench_kernels 100 "$OUT/bench_kernels.log" "cd '$REPO' && python3 benchmarks/bench_kernels.py --device cuda --quick"
[[ -n $CS ]] && stage initcheck 45 "$OUT/sanitizer.log" "cd '$RUNDIR' && '$CS' --tool initcheck --error-exitcode 9 --print-limit 20 python3 '$REPO/benchmarks/gpu_smoke.py' --tiny"
stage bench_meta 80 "$OUT/bench_meta.log" "cd '$REPO' && python3 benchmarks/bench_meta.py --device cuda --reps 3 --conv-iterations 2"
stage bench_resnet12 60 "$OUT/bench_meta.log" "cd '$REPO' && python3 benchmarks/bench_meta.py --device cuda --reps 0 --conv-iterations 0 --resnet-iterations 3"
cp "$REPO/benchmarks/RESULTS.md" "$OUT/RESULTS.md" 2>/dev/null

line="SUMMARY"
for k in build smoke pytest memcheck racecheck initcheck bench_kernels bench_meta bench_resnet12; do line+=" $k=${ST[$k]:-n/a}"; done
line+=" total=$(($(date +%s) - START))s"
echo "$line" | tee -a "$S"
for k in build smoke pytest memcheck; do [[ ${ST[$k]:-x} == 0 || ${ST[$k]:-x} == skip ]] || exit 1; done
exit 0
