#!/usr/bin/env bash
# One prepared run on a GPU machine (the device tool): build against the machine's own
# torch, run the CUDA tests, the kernel and meta-iteration benchmarks on the GPU, and
# compute-sanitizer on a small workload. Everything lands in $OUT (logs + RESULTS.md).
#   run: bash benchmarks/gpu_check.sh        (timeout ~540 s; leaves time for one rerun)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASTLAPLACE_CUDA=ON FASTLAPLACE_CUDA_ARCHS=${FASTLAPLACE_CUDA_ARCHS:-90}
nvidia-smi -L | tee "$OUT/gpu.txt"
python3 -c "import torch; print(torch.__version__, torch.version.cuda)" | tee -a "$OUT/gpu.txt"

t0=$(date +%s)
pip install --no-build-isolation --no-deps -q . > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/gpu.txt"

cd /tmp
timeout 240 python3 -m pytest "$OLDPWD/tests" -m cuda -q -x -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.log" | tail -5
cd "$OLDPWD"

timeout 150 python3 benchmarks/bench_kernels.py --device cuda --quick 2>&1 | tee "$OUT/bench_kernels.log" | tail -40
timeout 120 python3 benchmarks/bench_meta.py --device cuda --reps 5 --conv-iterations 5 2>&1 | tee "$OUT/bench_meta.log" | tail -12
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"

if command -v compute-sanitizer >/dev/null; then
  timeout 60 compute-sanitizer --tool memcheck python3 -c "
import torch, fastlaplace.ops as ops
a = torch.randn(3, 50, 27, device='cuda'); g = torch.randn(3, 50, 64, device='cuda')
A, G = ops.kron_factors(a, g)
L, ld = ops.damped_cholesky(A, 0.1)
print(ops.kfac_logdet(a, g, 50., 1e-3, 'factored'), ops.kfac_logdet(a, g, 50., 1e-3, 'exact'))
" > "$OUT/sanitizer.log" 2>&1
  tail -3 "$OUT/sanitizer.log"
fi
