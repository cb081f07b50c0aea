// CUDA kernel of kron_factors: out[b] = x̄ᵀx̄ / R, tiled like a GEMM of x̄ᵀ and x̄ with
// the bias column made on the fly. Only lower-triangle tiles are computed and each is
// mirrored, so the result is exactly symmetric. When there are many rows (conv patches:
// R = examples × locations) the rows are split over blocks and the partial sums reduced.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "checks.h"
#include "cuda/kernels.h"

namespace fastlaplace {
namespace {

constexpr int kTile = 16;
constexpr int64_t kRowsPerSplit = 1024;
constexpr int64_t kMaxSplits = 64;

template <typename scalar_t>
__device__ __forceinline__ double load_row(const scalar_t* x, int64_t sR, int64_t sD, int64_t R, int64_t d, bool bias,
                                           int64_t r, int64_t col) {
  if (r >= R) return 0.0;
  if (col < d) return static_cast<double>(x[r * sR + col * sD]);
  return (bias && col == d) ? 1.0 : 0.0;
}

// grid: (tiles, tiles, B·splits); out: [splits, B, D, D] partial sums.
template <typename scalar_t>
__global__ void factor_kernel(const scalar_t* __restrict__ x, int64_t sB, int64_t sR, int64_t sD, int64_t B, int64_t R,
                              int64_t d, bool bias, int64_t splits, int64_t rows_per_split, double inv_R,
                              scalar_t* __restrict__ out) {
  const int64_t tile_i = blockIdx.y, tile_j = blockIdx.x;
  if (tile_j > tile_i) return;  // whole block leaves together: upper tiles are mirrored
  const int64_t b = blockIdx.z % B, split = blockIdx.z / B;
  const int64_t D = d + (bias ? 1 : 0);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = tile_i * kTile, j0 = tile_j * kTile;
  const scalar_t* xb = x + b * sB;
  const int64_t r_begin = split * rows_per_split;
  const int64_t r_end = min(R, r_begin + rows_per_split);

  __shared__ double ti[kTile][kTile + 1];
  __shared__ double tj[kTile][kTile + 1];
  double sum = 0;
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kTile) {
    const int64_t r = r0 + ty;
    ti[ty][tx] = r < r_end ? load_row(xb, sR, sD, R, d, bias, r, i0 + tx) : 0.0;
    tj[ty][tx] = r < r_end ? load_row(xb, sR, sD, R, d, bias, r, j0 + tx) : 0.0;
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTile; ++k) sum += ti[k][ty] * tj[k][tx];
    __syncthreads();
  }
  const int64_t i = i0 + ty, j = j0 + tx;
  if (i < D && j < D && j <= i) {
    scalar_t* o = out + (split * B + b) * D * D;
    o[i * D + j] = o[j * D + i] = static_cast<scalar_t>(sum * inv_R);
  }
}

at::Tensor factor(const at::Tensor& x, bool bias) {
  const int64_t B = x.size(0), R = x.size(1), d = x.size(2), D = d + (bias ? 1 : 0);
  if (D == 0) return at::zeros({B, 0, 0}, x.options());  // no zero-sized grid
  const int64_t splits = std::min(kMaxSplits, (R + kRowsPerSplit - 1) / kRowsPerSplit);
  const int64_t rows_per_split = (R + splits - 1) / splits;
  TORCH_CHECK_VALUE(B * splits <= 65535, "fastlaplace: too many tasks for one launch (", B, ")");
  auto partial = at::empty({splits, B, D, D}, x.options());
  const int64_t tiles = (D + kTile - 1) / kTile;
  const dim3 grid(tiles, tiles, B * splits), block(kTile, kTile);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_factors_cuda", [&] {
    factor_kernel<scalar_t><<<grid, block, 0, stream>>>(x.data_ptr<scalar_t>(), x.stride(0), x.stride(1), x.stride(2),
                                                        B, R, d, bias, splits, rows_per_split, 1.0 / R,
                                                        partial.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return splits == 1 ? partial.squeeze(0) : partial.sum(0);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> kron_factors_cuda(const at::Tensor& a, const at::Tensor& g, bool bias) {
  check_rows(a, g, bias ? 1 : 0);
  const c10::cuda::CUDAGuard guard(a.device());
  return {factor(a, bias), factor(g, false)};
}

}  // namespace fastlaplace
