// Per-task rows of a layer in double precision, for the CPU kernels.
#pragma once
#include <ATen/core/TensorAccessor.h>
#include <vector>

#include "dense.h"

namespace fastlaplace::cpu {

// Rows x̄ = [x, 1] (bias) or x of task b: R × D, row-major.
template <typename scalar_t>
void load_rows(const at::TensorAccessor<const scalar_t, 3>& x, int64_t b, bool bias, std::vector<double>& rows) {
  const int64_t R = x.size(1), d = x.size(2), D = d + (bias ? 1 : 0);
  rows.resize(R * D);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t i = 0; i < d; ++i) rows[r * D + i] = static_cast<double>(x[b][r][i]);
    if (bias) rows[r * D + d] = 1.0;
  }
}

// The Gram matrix x̄x̄ᵀ / R (R × R) of the rows; the factor x̄ᵀx̄ / R is dense::syrk_rows.
inline void gram_from_rows(const std::vector<double>& rows, int64_t R, int64_t D, double* K) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j <= i; ++j)
      K[i * R + j] = K[j * R + i] = dense::dot(rows.data() + i * D, rows.data() + j * D, D) / R;
}

}  // namespace fastlaplace::cpu
