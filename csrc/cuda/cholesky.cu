// CUDA kernel of damped_cholesky: one block per task, left-looking Cholesky in the output
// buffer, one warp per row for the column updates (coalesced along the row), double
// accumulation. Failure is reported per task in `info` and NaN, never by a host sync.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "composite.h"
#include "cuda/kernels.h"

namespace fastlaplace {
namespace {

constexpr int kWarps = 8;
constexpr int64_t kBlockPerMatrixUpTo = 128;

__device__ __forceinline__ double warp_sum(double v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename scalar_t>
__global__ void damped_cholesky_kernel(const scalar_t* __restrict__ M, int64_t sB, int64_t sI, int64_t sJ,
                                       const scalar_t* __restrict__ damping, int64_t sDamp, int64_t d,
                                       scalar_t* __restrict__ L, scalar_t* __restrict__ logdet,
                                       int* __restrict__ info) {
  const int64_t b = blockIdx.x;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const scalar_t* Mb = M + b * sB;
  scalar_t* Lb = L + b * d * d;
  const double damp = static_cast<double>(damping[b * sDamp]);
  __shared__ int failed;
  __shared__ double ld;
  if (threadIdx.x == 0) {
    failed = 0;
    ld = 0;
  }
  for (int64_t idx = threadIdx.x; idx < d * d; idx += blockDim.x) {
    const int64_t i = idx / d, j = idx % d;
    Lb[idx] = j <= i ? Mb[i * sI + j * sJ] : scalar_t(0);
  }
  __syncthreads();
  for (int64_t j = 0; j < d; ++j) {
    const scalar_t* Lj = Lb + j * d;
    if (warp == 0) {
      double s = 0;
      for (int64_t k = lane; k < j; k += 32) s += static_cast<double>(Lj[k]) * Lj[k];
      s = warp_sum(s);
      if (lane == 0) {
        const double djj = static_cast<double>(Lj[j]) + damp - s;
        if (!(djj > 0) || !isfinite(djj)) {
          failed = static_cast<int>(j + 1);
        } else {
          Lb[j * d + j] = static_cast<scalar_t>(sqrt(djj));
          ld += log(djj);
        }
      }
    }
    __syncthreads();
    if (failed) break;
    const double ljj = static_cast<double>(Lj[j]);
    for (int64_t i = j + 1 + warp; i < d; i += kWarps) {
      const scalar_t* Li = Lb + i * d;
      double s = 0;
      for (int64_t k = lane; k < j; k += 32) s += static_cast<double>(Li[k]) * Lj[k];
      s = warp_sum(s);
      if (lane == 0) Lb[i * d + j] = static_cast<scalar_t>((static_cast<double>(Li[j]) - s) / ljj);
    }
    __syncthreads();
  }
  if (failed) {
    for (int64_t idx = threadIdx.x; idx < d * d; idx += blockDim.x) Lb[idx] = static_cast<scalar_t>(NAN);
  }
  if (threadIdx.x == 0) {
    info[b] = failed;
    logdet[b] = failed ? static_cast<scalar_t>(NAN) : static_cast<scalar_t>(ld);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky_cuda(const at::Tensor& M, const at::Tensor& damping) {
  check_damped(M, damping);
  const int64_t B = M.size(0), d = M.size(1);
  const c10::cuda::CUDAGuard guard(M.device());
  // One block per matrix leaves most of the GPU idle on a few large matrices (4 of 132 SMs
  // for Conv4's d = 577): cuSOLVER's blocked factorisation serves those.
  if (d > kBlockPerMatrixUpTo) return damped_cholesky_library(M, damping);
  auto L = at::empty({B, d, d}, M.options());
  auto logdet = at::empty({B}, M.options());
  auto info = at::empty({B}, M.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "damped_cholesky_cuda", [&] {
    damped_cholesky_kernel<scalar_t><<<B, kWarps * 32, 0, stream>>>(
        M.data_ptr<scalar_t>(), M.stride(0), M.stride(1), M.stride(2), damping.data_ptr<scalar_t>(), damping.stride(0),
        d, L.data_ptr<scalar_t>(), logdet.data_ptr<scalar_t>(), info.data_ptr<int>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {L, logdet, info};
}

}  // namespace fastlaplace
