// CPU kernel of kron_factors: A = x̄ᵀx̄ / R and G = gᵀg / R for every task.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "kfac_math.h"

namespace fastlaplace {
namespace {

// The dot-free loops below beat a batched BLAS call only for the smallest factors over few
// rows (the sinusoid's first layer, d_A = 2), where BLAS's per-matrix overhead dominates.
constexpr int64_t kLoopsUpTo = 8;
constexpr int64_t kLoopsRowsUpTo = 1024;
// BLAS accumulates in the input's precision: float32 sums of more than ~2^24 terms stop
// growing. Float32 rows are multiplied in chunks whose partial products are added in double.
constexpr int64_t kFloatChunkRows = 4096;

at::Tensor gemm_factor(const at::Tensor& xb, int64_t R) {
  const int64_t B = xb.size(0), D = xb.size(2);
  if (xb.scalar_type() == at::kDouble || R <= kFloatChunkRows)
    // One pass: beta = 0 ignores the uninitialised input, alpha folds in the 1/R.
    return at::baddbmm(at::empty({B, D, D}, xb.options()), xb.mT(), xb, /*beta=*/0, /*alpha=*/1.0 / R);
  auto sum = at::zeros({B, D, D}, xb.options().dtype(at::kDouble));
  for (int64_t r0 = 0; r0 < R; r0 += kFloatChunkRows) {
    auto chunk = xb.narrow(1, r0, std::min(kFloatChunkRows, R - r0));
    sum.add_(at::bmm(chunk.mT(), chunk));
  }
  return sum.div_(static_cast<double>(R)).to(xb.scalar_type());
}

at::Tensor factor(const at::Tensor& x, bool bias) {
  const int64_t B = x.size(0), R = x.size(1), D = x.size(2) + (bias ? 1 : 0);
  if (D > kLoopsUpTo || R > kLoopsRowsUpTo) {
    return gemm_factor(bias ? at::cat({x, at::ones({B, R, 1}, x.options())}, 2) : x, R);
  }
  auto out = at::empty({B, D, D}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kron_factors_cpu", [&] {
    auto oa = out.accessor<scalar_t, 3>();
    const auto side = math::plan_side(R, x.size(2), bias);
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> rows(R * D), K(D * D);
      for (int64_t b = b0; b < b1; ++b) {
        const scalar_t* xb = x.const_data_ptr<scalar_t>() + b * x.stride(0);
        for (int64_t r = 0; r < R; ++r) {
          for (int64_t i = 0; i < side.d; ++i)
            rows[r * D + i] = static_cast<double>(xb[r * x.stride(1) + i * x.stride(2)]);
          if (bias) rows[r * D + side.d] = 1.0;
        }
        math::syrk_rows(block::Serial{}, rows.data(), R, D, K.data());
        for (int64_t i = 0; i < D; ++i)
          for (int64_t j = 0; j < D; ++j) oa[b][i][j] = static_cast<scalar_t>(K[i * D + j]);
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> kron_factors_cpu(const at::Tensor& a, const at::Tensor& g, bool bias) {
  check_rows(a, g, bias ? 1 : 0);
  return {factor(a, bias), factor(g, false)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) { m.impl("kron_factors", &kron_factors_cpu); }

}  // namespace fastlaplace
