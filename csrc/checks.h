// Input checks shared by every kernel: each failure names the argument and the problem,
// and surfaces in Python as ValueError / TypeError rather than a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <string>

#include "formulas.h"  // Method

namespace fastlaplace {

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "fastlaplace: ", name,
                   " must be float32 or float64, got ", t.scalar_type());
}

inline void check_rank(const at::Tensor& t, int64_t rank, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == rank, "fastlaplace: ", name, " must have shape ", shape, ", got a tensor of shape ",
                    t.sizes());
}

inline void check_same_kind(const at::Tensor& x, const at::Tensor& y, const char* nx, const char* ny) {
  TORCH_CHECK_TYPE(x.scalar_type() == y.scalar_type(), "fastlaplace: ", nx, " and ", ny,
                   " must have the same dtype, got ", x.scalar_type(), " and ", y.scalar_type());
  TORCH_CHECK_VALUE(x.device() == y.device(), "fastlaplace: ", nx, " and ", ny, " must be on the same device, got ",
                    x.device(), " and ", y.device());
}

// The bound on one call's work (docs/design.md §5): at most 2^30 elements in each input and
// output (views count their logical size: a stride-0 view of 2^51 rows is refused) and at
// most 2^44 multiply-adds to form the factors, B·R·(d_A² + d_G²). Beyond, a call would run
// for hours on one CPU core, and cannot be interrupted.
constexpr int64_t kMaxElements = int64_t(1) << 30;
constexpr double kMaxWork = 17592186044416.0;  // 2^44

inline void check_work(const at::Tensor& a, const at::Tensor& g, int64_t bias_columns) {
  const double B = static_cast<double>(a.size(0)), R = static_cast<double>(a.size(1));
  const double dA = static_cast<double>(a.size(2) + bias_columns), dG = static_cast<double>(g.size(2));
  const double limit = static_cast<double>(kMaxElements);
  TORCH_CHECK_VALUE(static_cast<double>(a.numel()) <= limit && static_cast<double>(g.numel()) <= limit &&
                        B * (dA * dA + dG * dG) <= limit && B * R * (dA * dA + dG * dG) <= kMaxWork,
                    "fastlaplace: a of shape ", a.sizes(), " and g of shape ", g.sizes(),
                    " exceed the work one call accepts (2^30 elements per input or factor, 2^44 multiply-adds "
                    "B*R*(d_A^2 + d_G^2)); split the batch or the rows");
}

// Rows of one layer: a [B, R, d_in], g [B, R, d_out]; bias_columns: 1 when a gets a bias column.
inline void check_rows(const at::Tensor& a, const at::Tensor& g, int64_t bias_columns) {
  check_float(a, "a");
  check_float(g, "g");
  check_rank(a, 3, "a", "[tasks, rows, d_in]");
  check_rank(g, 3, "g", "[tasks, rows, d_out]");
  check_same_kind(a, g, "a", "g");
  TORCH_CHECK_VALUE(a.size(0) == g.size(0), "fastlaplace: a and g must have the same number of tasks, got ", a.size(0),
                    " and ", g.size(0));
  TORCH_CHECK_VALUE(a.size(1) == g.size(1), "fastlaplace: a and g must have the same number of rows, got ", a.size(1),
                    " and ", g.size(1));
  TORCH_CHECK_VALUE(a.size(0) >= 1 && a.size(1) >= 1,
                    "fastlaplace: need at least one task and one row, got a of shape ", a.sizes());
  TORCH_CHECK_VALUE(g.size(2) >= 1, "fastlaplace: g needs d_out >= 1, got shape ", g.sizes());
  check_work(a, g, bias_columns);
}

// The rows of a layer whose curvature's log-det is taken: the layer needs at least one
// parameter per output (d_in >= 1, or a bias).
inline void check_layer(const at::Tensor& a, const at::Tensor& g, bool bias) {
  check_rows(a, g, bias ? 1 : 0);
  TORCH_CHECK_VALUE(a.size(2) + (bias ? 1 : 0) >= 1,
                    "fastlaplace: a has d_in = 0 and bias=False: the layer has no "
                    "parameters, so its curvature has no log-determinant (shape ",
                    a.sizes(), ")");
}

// A batch of square matrices [B, d, d].
inline void check_square(const at::Tensor& m, const char* name) {
  check_float(m, name);
  check_rank(m, 3, name, "[tasks, d, d]");
  TORCH_CHECK_VALUE(m.size(1) == m.size(2) && m.size(1) >= 1, "fastlaplace: ", name,
                    " must be a batch of square matrices [tasks, d, d], got ", m.sizes());
  TORCH_CHECK_VALUE(m.size(0) >= 1, "fastlaplace: ", name, " needs at least one task, got ", m.sizes());
}

// A batch of matrices to factor and one damping value per matrix.
inline void check_damped(const at::Tensor& M, const at::Tensor& damping) {
  check_square(M, "M");
  check_rank(damping, 1, "damping", "[tasks]");
  check_same_kind(M, damping, "M", "damping");
  TORCH_CHECK_VALUE(damping.size(0) == M.size(0), "fastlaplace: damping must have one value per task (", M.size(0),
                    "), got ", damping.size(0));
}

inline void check_factors(const at::Tensor& A, const at::Tensor& G) {
  check_square(A, "A");
  check_square(G, "G");
  check_same_kind(A, G, "A", "G");
  TORCH_CHECK_VALUE(A.size(0) == G.size(0), "fastlaplace: A and G must have the same number of tasks, got ", A.size(0),
                    " and ", G.size(0));
}

inline Method parse_method(const std::string& method) {
  if (method == "exact") return Method::Exact;
  if (method == "factored") return Method::Factored;
  TORCH_CHECK_VALUE(false, "fastlaplace: method must be 'exact' or 'factored', got '", method, "'");
}

inline void check_scale_tau(double scale, double tau) {
  TORCH_CHECK_VALUE(scale > 0 && std::isfinite(scale), "fastlaplace: scale must be positive and finite, got ", scale);
  TORCH_CHECK_VALUE(tau > 0 && std::isfinite(tau),
                    "fastlaplace: tau (prior precision) must be positive and finite, got ", tau);
}

}  // namespace fastlaplace
