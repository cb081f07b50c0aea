// CPU kernels of kron_logdet, kfac_logdet and their backward ops. Small layers (every
// matrix of order ≤ 64, as in the sinusoid MLP and the classifier heads) run fused, one
// task per thread, from rows to log-det in double precision with no intermediate tensors;
// larger ones go to the composite path (BLAS and LAPACK) in csrc/composite.cpp.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "checks.h"
#include "composite.h"
#include "cpu/dense.h"
#include "cpu/rows.h"

namespace fastlaplace {
namespace {

using at::Tensor;
constexpr int64_t kFusedMaxOrder = 64;
constexpr int64_t kFusedMaxWork = int64_t(1) << 22;  // multiply-adds to build one task's matrices
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---------------------------------------------------------------------------------------
// Per-task math (see composite.cpp for the same formulas over a batch).

struct Spectrum {
  std::vector<double> w, V;
};

void psd_eigh(const double* K, int64_t n, Spectrum& s, std::vector<double>& work) {
  work.assign(K, K + n * n);
  s.w.resize(n);
  s.V.resize(n * n);
  dense::jacobi_eigh(work.data(), n, s.w.data(), s.V.data());
}

double exact_logdet(const Spectrum& A, int64_t dA, const Spectrum& G, int64_t dG, double c, double tau) {
  const int64_t nA = A.w.size(), nG = G.w.size();
  double s = 0;
  for (int64_t i = 0; i < nA; ++i)
    for (int64_t j = 0; j < nG; ++j) s += std::log(c * A.w[i] * G.w[j] + tau);
  return s + static_cast<double>(dA * dG - nA * nG) * std::log(tau);
}

// P = V diag(ψ) Vᵀ · grad.
void spectral(const Spectrum& s, const std::vector<double>& psi, double grad, std::vector<double>& P) {
  const int64_t n = psi.size();
  P.resize(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      double v = 0;
      for (int64_t k = 0; k < n; ++k) v += s.V[i * n + k] * psi[k] * s.V[j * n + k];
      P[i * n + j] = P[j * n + i] = v * grad;
    }
}

void exact_grad(const Spectrum& A, const Spectrum& G, double c, double tau, double grad, std::vector<double>& PA,
                std::vector<double>& PG) {
  const int64_t nA = A.w.size(), nG = G.w.size();
  std::vector<double> psiA(nA, 0.0), psiG(nG, 0.0);
  for (int64_t i = 0; i < nA; ++i)
    for (int64_t j = 0; j < nG; ++j) {
      const double denom = c * A.w[i] * G.w[j] + tau;
      psiA[i] += c * G.w[j] / denom;
      psiG[j] += c * A.w[i] / denom;
    }
  spectral(A, psiA, grad, PA);
  spectral(G, psiG, grad, PG);
}

struct Factored {
  double pi = 1, trA = 0, trG = 0, logdet = kNaN;
  bool valid = false, failed = false;
  std::vector<double> LA, LG;
};

void factored_forward(const double* KA, int64_t dA, const double* KG, int64_t dG, double c, double tau, Factored& f) {
  f.trA = f.trG = 0;
  for (int64_t i = 0; i < dA; ++i) f.trA += KA[i * dA + i];
  for (int64_t i = 0; i < dG; ++i) f.trG += KG[i * dG + i];
  f.valid = f.trA > 0 && f.trG > 0;
  f.pi = f.valid ? std::sqrt((f.trA / dA) / (f.trG / dG)) : 1.0;
  const double sc = std::sqrt(c), st = std::sqrt(tau);
  f.LA.assign(KA, KA + dA * dA);
  f.LG.assign(KG, KG + dG * dG);
  double ldA = 0, ldG = 0;
  const bool failA = dense::cholesky(f.LA.data(), dA, f.pi * st / sc, &ldA) != 0;
  const bool failG = dense::cholesky(f.LG.data(), dG, st / (f.pi * sc), &ldG) != 0;
  f.failed = failA || failG;
  f.logdet = f.failed ? kNaN : dG * ldA + dA * ldG + static_cast<double>(dA * dG) * std::log(c);
}

void factored_grad(const Factored& f, int64_t dA, int64_t dG, double c, double tau, double grad,
                   std::vector<double>& gA, std::vector<double>& gG, std::vector<double>& work) {
  gA.assign(dA * dA, kNaN);
  gG.assign(dG * dG, kNaN);
  if (f.failed) return;
  dense::cholesky_inverse(f.LA.data(), dA, gA.data(), work);
  dense::cholesky_inverse(f.LG.data(), dG, gG.data(), work);
  double trInvA = 0, trInvG = 0;
  for (int64_t i = 0; i < dA; ++i) trInvA += gA[i * dA + i];
  for (int64_t i = 0; i < dG; ++i) trInvG += gG[i * dG + i];
  const double sc = std::sqrt(c), st = std::sqrt(tau);
  const double dpi = dG * st / sc * trInvA - dA * st / sc * trInvG / (f.pi * f.pi);
  const double kA = f.valid ? dpi * f.pi / (2 * f.trA) : 0.0;
  const double kG = f.valid ? -dpi * f.pi / (2 * f.trG) : 0.0;
  for (auto& x : gA) x *= dG * grad;
  for (auto& x : gG) x *= dA * grad;
  for (int64_t i = 0; i < dA; ++i) gA[i * dA + i] += kA * grad;
  for (int64_t i = 0; i < dG; ++i) gG[i * dG + i] += kG * grad;
}

// One side of a layer for one task: its rows and the matrix K that is decomposed,
// either the factor x̄ᵀx̄/R (D×D) or, with fewer rows than columns, the Gram x̄x̄ᵀ/R (R×R).
struct Side {
  int64_t R = 0, D = 0, n = 0;
  bool gram = false;
  std::vector<double> rows, cols, K;

  template <typename scalar_t>
  void load(const at::TensorAccessor<const scalar_t, 3>& x, int64_t b, bool bias) {
    cpu::load_rows(x, b, bias, rows, cols);
    K.resize(n * n);
    if (gram)
      cpu::gram_from_rows(rows, R, D, K.data());
    else
      cpu::factor_from_cols(cols, R, D, K.data());
  }

  // dL/dx for dL/dK = P (symmetric), the first d columns of (2/R)·x̄P or (2/R)·P x̄.
  template <typename scalar_t>
  void rows_grad(const std::vector<double>& P, int64_t d, at::TensorAccessor<scalar_t, 3> out, int64_t b) const {
    const double s = 2.0 / R;
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < d; ++k) {
        const double v = gram ? dense::dot(P.data() + r * R, cols.data() + k * R, R)
                              : dense::dot(rows.data() + r * D, P.data() + k * D, D);
        out[b][r][k] = static_cast<scalar_t>(s * v);
      }
  }
};

Side plan_side(int64_t R, int64_t D, bool allow_gram) {
  Side s;
  s.R = R;
  s.D = D;
  s.gram = allow_gram && R < D;
  s.n = s.gram ? R : D;
  return s;
}

int64_t build_work(const Side& s) { return s.gram ? s.R * s.R * s.D : s.D * s.D * s.R; }

bool fused_fits(const Side& A, const Side& G) {
  return A.n <= kFusedMaxOrder && G.n <= kFusedMaxOrder && build_work(A) + build_work(G) <= kFusedMaxWork;
}

template <typename scalar_t>
void load_symmetric(const at::TensorAccessor<const scalar_t, 3>& M, int64_t b, std::vector<double>& K) {
  const int64_t n = M.size(1);
  K.resize(n * n);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) K[i * n + j] = K[j * n + i] = static_cast<double>(M[b][i][j]);
}

template <typename scalar_t>
void store(const std::vector<double>& K, at::TensorAccessor<scalar_t, 3> out, int64_t b) {
  const int64_t n = out.size(1);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) out[b][i][j] = static_cast<scalar_t>(K[i * n + j]);
}

// Log-det of one task from its two matrices; also the gradients dL/dK when grad is given.
struct TaskLogdet {
  Method method;
  double c, tau;
  Spectrum sA, sG;
  Factored f;
  std::vector<double> work;

  double forward(const std::vector<double>& KA, int64_t nA, int64_t dA, const std::vector<double>& KG, int64_t nG,
                 int64_t dG) {
    if (method == Method::Factored) {
      factored_forward(KA.data(), dA, KG.data(), dG, c, tau, f);
      return f.logdet;
    }
    psd_eigh(KA.data(), nA, sA, work);
    psd_eigh(KG.data(), nG, sG, work);
    return exact_logdet(sA, dA, sG, dG, c, tau);
  }

  void backward(int64_t dA, int64_t dG, double grad, std::vector<double>& PA, std::vector<double>& PG) {
    if (method == Method::Factored)
      factored_grad(f, dA, dG, c, tau, grad, PA, PG, work);
    else
      exact_grad(sA, sG, c, tau, grad, PA, PG);
  }
};

// ---------------------------------------------------------------------------------------
// Kernels.

Tensor kron_logdet_cpu(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  const auto m = parse_method(method);
  const int64_t B = A.size(0), dA = A.size(1), dG = G.size(1);
  if (dA > kFusedMaxOrder || dG > kFusedMaxOrder) return kron_logdet_composite(A, G, scale, tau, method);
  auto out = at::empty({B}, A.options());
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_logdet_cpu", [&] {
    auto Aa = A.accessor<const scalar_t, 3>();
    auto Ga = G.accessor<const scalar_t, 3>();
    auto oa = out.accessor<scalar_t, 1>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TaskLogdet task{m, scale, tau};
      std::vector<double> KA, KG;
      for (int64_t b = b0; b < b1; ++b) {
        load_symmetric(Aa, b, KA);
        load_symmetric(Ga, b, KG);
        oa[b] = static_cast<scalar_t>(task.forward(KA, dA, dA, KG, dG, dG));
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> kron_logdet_backward_cpu(const Tensor& grad, const Tensor& A, const Tensor& G,
                                                    double scale, double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  check_grad(grad, A, A.size(0));
  const auto m = parse_method(method);
  const int64_t B = A.size(0), dA = A.size(1), dG = G.size(1);
  if (dA > kFusedMaxOrder || dG > kFusedMaxOrder)
    return kron_logdet_backward_composite(grad, A, G, scale, tau, method);
  auto gA = at::empty_like(A, at::MemoryFormat::Contiguous);
  auto gG = at::empty_like(G, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_logdet_backward_cpu", [&] {
    auto Aa = A.accessor<const scalar_t, 3>();
    auto Ga = G.accessor<const scalar_t, 3>();
    auto ga = grad.accessor<const scalar_t, 1>();
    auto gAa = gA.accessor<scalar_t, 3>();
    auto gGa = gG.accessor<scalar_t, 3>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TaskLogdet task{m, scale, tau};
      std::vector<double> KA, KG, PA, PG;
      for (int64_t b = b0; b < b1; ++b) {
        load_symmetric(Aa, b, KA);
        load_symmetric(Ga, b, KG);
        task.forward(KA, dA, dA, KG, dG, dG);
        task.backward(dA, dG, static_cast<double>(ga[b]), PA, PG);
        store(PA, gAa, b);
        store(PG, gGa, b);
      }
    });
  });
  return {gA, gG};
}

Tensor kfac_logdet_cpu(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                       bool bias) {
  check_rows(a, g);
  check_scale_tau(scale, tau);
  const auto m = parse_method(method);
  const int64_t B = a.size(0), R = a.size(1), dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  const Side planA = plan_side(R, dA, m == Method::Exact), planG = plan_side(R, dG, m == Method::Exact);
  if (!fused_fits(planA, planG)) return kfac_logdet_composite(a, g, scale, tau, method, bias);
  auto out = at::empty({B}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kfac_logdet_cpu", [&] {
    auto aa = a.accessor<const scalar_t, 3>();
    auto gg = g.accessor<const scalar_t, 3>();
    auto oa = out.accessor<scalar_t, 1>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TaskLogdet task{m, scale, tau};
      Side sA = planA, sG = planG;
      for (int64_t b = b0; b < b1; ++b) {
        sA.load(aa, b, bias);
        sG.load(gg, b, false);
        oa[b] = static_cast<scalar_t>(task.forward(sA.K, sA.n, dA, sG.K, sG.n, dG));
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor> kfac_logdet_backward_cpu(const Tensor& grad, const Tensor& a, const Tensor& g,
                                                    double scale, double tau, const std::string& method, bool bias) {
  check_rows(a, g);
  check_scale_tau(scale, tau);
  check_grad(grad, a, a.size(0));
  const auto m = parse_method(method);
  const int64_t B = a.size(0), R = a.size(1), dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  const Side planA = plan_side(R, dA, m == Method::Exact), planG = plan_side(R, dG, m == Method::Exact);
  if (!fused_fits(planA, planG)) return kfac_logdet_backward_composite(grad, a, g, scale, tau, method, bias);
  auto grad_a = at::empty(a.sizes(), a.options());
  auto grad_g = at::empty(g.sizes(), g.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kfac_logdet_backward_cpu", [&] {
    auto aa = a.accessor<const scalar_t, 3>();
    auto gg = g.accessor<const scalar_t, 3>();
    auto ga = grad.accessor<const scalar_t, 1>();
    auto oa = grad_a.accessor<scalar_t, 3>();
    auto og = grad_g.accessor<scalar_t, 3>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TaskLogdet task{m, scale, tau};
      Side sA = planA, sG = planG;
      std::vector<double> PA, PG;
      for (int64_t b = b0; b < b1; ++b) {
        sA.load(aa, b, bias);
        sG.load(gg, b, false);
        task.forward(sA.K, sA.n, dA, sG.K, sG.n, dG);
        task.backward(dA, dG, static_cast<double>(ga[b]), PA, PG);
        sA.rows_grad(PA, a.size(2), oa, b);
        sG.rows_grad(PG, dG, og, b);
      }
    });
  });
  return {grad_a, grad_g};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_logdet", &kron_logdet_cpu);
  m.impl("kron_logdet_backward", &kron_logdet_backward_cpu);
  m.impl("kfac_logdet", &kfac_logdet_cpu);
  m.impl("kfac_logdet_backward", &kfac_logdet_backward_cpu);
}

}  // namespace fastlaplace
