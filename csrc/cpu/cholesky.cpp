// CPU kernel of damped_cholesky: L = chol(M + damping·I) and log det, per task.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"
#include "composite.h"
#include "kfac_math.h"

namespace fastlaplace {
namespace {

// Above this order LAPACK's blocked potrf wins over the unblocked loop.
constexpr int64_t kLapackAbove = 96;

std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky_cpu(const at::Tensor& M, const at::Tensor& damping) {
  check_damped(M, damping);
  const int64_t B = M.size(0), d = M.size(1);
  if (d > kLapackAbove) return damped_cholesky_library(M, damping);
  auto L = at::empty({B, d, d}, M.options());
  auto logdet = at::empty({B}, M.options());
  auto info = at::empty({B}, M.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(M.scalar_type(), "damped_cholesky_cpu", [&] {
    auto Ma = M.accessor<const scalar_t, 3>();
    auto da = damping.accessor<const scalar_t, 1>();
    auto La = L.accessor<scalar_t, 3>();
    auto lda = logdet.accessor<scalar_t, 1>();
    auto ia = info.accessor<int, 1>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> S(d * d);
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t i = 0; i < d; ++i)  // upper triangle of S = lower triangle of M
          for (int64_t j = 0; j <= i; ++j) S[j * d + i] = static_cast<double>(Ma[b][i][j]);
        const auto [failed, ld] = math::cholesky_upper(block::Serial{}, S.data(), d, static_cast<double>(da[b]));
        ia[b] = static_cast<int>(failed);
        lda[b] = failed ? std::numeric_limits<scalar_t>::quiet_NaN() : static_cast<scalar_t>(ld);
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = 0; j < d; ++j)
            La[b][i][j] = failed ? std::numeric_limits<scalar_t>::quiet_NaN() : static_cast<scalar_t>(S[j * d + i]);
      }
    });
  });
  return {L, logdet, info};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) { m.impl("damped_cholesky", &damped_cholesky_cpu); }

}  // namespace fastlaplace
