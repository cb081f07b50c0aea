// CPU kernels of kron_logdet, kfac_logdet and their _and_grad variants. Small layers (every
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
// Per-task math. Each task's factors are represented by the matrices K_A (n_A × n_A) and
// K_G (n_G × n_G) that carry their nonzero spectrum: the factor itself, or with fewer
// rows R than columns its R×R Gram matrix (docs/design.md §2).

// Exact: log det(c·A⊗G + τI) = Σ_ij log(c·s_i·b_j + τ) + (zero pairs)·log τ over the
// eigenvalues s_i of K_small and b_j of K_big. For the value alone, or when the smaller
// side has few eigenvalues (the sinusoid's first and last layers: 1 or 2),
// Σ_i log det(c·s_i·K_big + τI) — one Cholesky of K_big per s_i — avoids decomposing K_big
// (measured faster at n = 10), and its gradient needs no eigenvectors of K_big:
//   dL/dK_big = Σ_i c·s_i (c·s_i·K_big + τI)⁻¹,  dL/ds_i = c·tr(K_big (c·s_i·K_big + τI)⁻¹).
// With gradients and more eigenvalues, both sides are decomposed (cheaper than an inverse
// per eigenvalue): dL/ds_i = Σ_j c·b_j / (c·s_i·b_j + τ) and likewise.
// In both, dL/dK = V diag(dL/ds) Vᵀ for a decomposed side.
constexpr int64_t kCholeskyPerEigenvalueUpTo = 4;

struct Exact {
  double c, tau;
  std::vector<double> w, V, wb, Vb, S, Minv, X, psi, psib;

  double forward(const std::vector<double>& Ks, int64_t ns, int64_t ds, const std::vector<double>& Kb, int64_t nb,
                 int64_t db, bool grads, std::vector<double>* Ps, std::vector<double>* Pb) {
    if (!decompose(Ks, ns, grads, w, V)) return kNaN;
    // Pairs with a zero eigenvalue on either side contribute log τ each.
    double logdet = static_cast<double>(ds * db - ns * nb) * std::log(tau);
    psi.assign(ns, 0.0);
    if (ns <= kCholeskyPerEigenvalueUpTo || !grads) {
      if (grads) {
        Pb->assign(nb * nb, 0.0);
        Minv.resize(nb * nb);
      }
      for (int64_t j = 0; j < ns; ++j) {
        const double cs = c * w[j];
        S.resize(nb * nb);
        for (int64_t i = 0; i < nb * nb; ++i) S[i] = cs * Kb[i];
        double ld = 0;
        if (dense::cholesky_upper(S.data(), nb, tau, &ld) != 0) return kNaN;
        logdet += ld;
        if (!grads) continue;
        dense::inverse_from_upper(S.data(), nb, Minv.data(), X);
        for (int64_t i = 0; i < nb * nb; ++i) {
          (*Pb)[i] += cs * Minv[i];
          psi[j] += Kb[i] * Minv[i];  // tr(K M⁻¹) of two symmetric matrices
        }
        psi[j] *= c;
      }
    } else {
      if (!decompose(Kb, nb, grads, wb, Vb)) return kNaN;
      psib.assign(nb, 0.0);
      for (int64_t i = 0; i < ns; ++i)
        for (int64_t j = 0; j < nb; ++j) {
          const double denom = c * w[i] * wb[j] + tau;
          logdet += std::log(denom);
          psi[i] += c * wb[j] / denom;
          psib[j] += c * w[i] / denom;
        }
      if (grads) spectral(Vb, psib, nb, *Pb);
    }
    if (grads) spectral(V, psi, ns, *Ps);
    return logdet;
  }

  bool decompose(const std::vector<double>& K, int64_t n, bool vectors, std::vector<double>& values,
                 std::vector<double>& vecs) {
    vecs.assign(K.begin(), K.end());
    values.resize(n);
    return dense::eigh(vecs.data(), n, values.data(), vectors, X);
  }

  // P = V diag(ψ) Vᵀ.
  static void spectral(const std::vector<double>& V, const std::vector<double>& psi, int64_t n,
                       std::vector<double>& P) {
    P.resize(n * n);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t k = 0; k <= i; ++k) {
        double v = 0;
        for (int64_t m = 0; m < n; ++m) v += V[i * n + m] * psi[m] * V[k * n + m];
        P[i * n + k] = P[k * n + i] = v;
      }
  }
};

// Factored: d_G·logdet(A + λ_A I) + d_A·logdet(G + λ_G I) + d_A·d_G·log c, with
// λ_A = π√τ/√c and λ_G = √τ/(π√c). When K is a Gram matrix (n < d), the factor's other
// d − n eigenvalues are zero: logdet(A + λI) = logdet(K + λI) + (d − n)·log λ, and by the
// push-through identity x̄(A + λI)⁻¹ = (K + λI)⁻¹x̄, so every matrix stays n×n.
struct Factored {
  double c, tau;
  double pi = 1, trA = 0, trG = 0, lamA = 0, lamG = 0;
  bool valid = false;
  std::vector<double> UA, UG, X;

  double forward(const std::vector<double>& KA, int64_t nA, int64_t dA, const std::vector<double>& KG, int64_t nG,
                 int64_t dG, bool grads, std::vector<double>* PA, std::vector<double>* PG) {
    trA = trG = 0;
    for (int64_t i = 0; i < nA; ++i) trA += KA[i * nA + i];
    for (int64_t i = 0; i < nG; ++i) trG += KG[i * nG + i];
    valid = trA > 0 && trG > 0;
    pi = valid ? std::sqrt((trA / dA) / (trG / dG)) : 1.0;
    const double sc = std::sqrt(c), st = std::sqrt(tau);
    lamA = pi * st / sc;
    lamG = st / (pi * sc);
    UA.assign(KA.begin(), KA.end());
    UG.assign(KG.begin(), KG.end());
    double ldA = 0, ldG = 0;
    if (dense::cholesky_upper(UA.data(), nA, lamA, &ldA) != 0 || dense::cholesky_upper(UG.data(), nG, lamG, &ldG) != 0)
      return kNaN;
    ldA += (dA - nA) * std::log(lamA);
    ldG += (dG - nG) * std::log(lamG);
    if (grads) gradients(nA, dA, nG, dG, *PA, *PG);
    return dG * ldA + dA * ldG + static_cast<double>(dA * dG) * std::log(c);
  }

  // dL/dK_A = d_G·(K_A + λ_A I)⁻¹ + κ_A I, where κ carries π's dependence on the traces.
  void gradients(int64_t nA, int64_t dA, int64_t nG, int64_t dG, std::vector<double>& PA, std::vector<double>& PG) {
    PA.resize(nA * nA);
    PG.resize(nG * nG);
    dense::inverse_from_upper(UA.data(), nA, PA.data(), X);
    dense::inverse_from_upper(UG.data(), nG, PG.data(), X);
    double trInvA = (dA - nA) / lamA, trInvG = (dG - nG) / lamG;
    for (int64_t i = 0; i < nA; ++i) trInvA += PA[i * nA + i];
    for (int64_t i = 0; i < nG; ++i) trInvG += PG[i * nG + i];
    const double sc = std::sqrt(c), st = std::sqrt(tau);
    const double dpi = dG * st / sc * trInvA - dA * st / sc * trInvG / (pi * pi);
    const double kA = valid ? dpi * pi / (2 * trA) : 0.0;
    const double kG = valid ? -dpi * pi / (2 * trG) : 0.0;
    for (auto& x : PA) x *= dG;
    for (auto& x : PG) x *= dA;
    for (int64_t i = 0; i < nA; ++i) PA[i * nA + i] += kA;
    for (int64_t i = 0; i < nG; ++i) PG[i * nG + i] += kG;
  }
};

// The log-det of one task from K_A (n_A, full dimension d_A) and K_G; with grads, also
// PA = dL/dK_A and PG = dL/dK_G.
struct TaskLogdet {
  Method method;
  double c, tau;
  Exact exact{c, tau};
  Factored factored{c, tau};

  double operator()(const std::vector<double>& KA, int64_t nA, int64_t dA, const std::vector<double>& KG, int64_t nG,
                    int64_t dG, bool grads = false, std::vector<double>* PA = nullptr,
                    std::vector<double>* PG = nullptr) {
    if (method == Method::Factored) return factored.forward(KA, nA, dA, KG, nG, dG, grads, PA, PG);
    if (nA <= nG) return exact.forward(KA, nA, dA, KG, nG, dG, grads, PA, PG);
    return exact.forward(KG, nG, dG, KA, nA, dA, grads, PG, PA);
  }
};

// One side of a layer for one task: its rows and the matrix K that carries its spectrum,
// the factor x̄ᵀx̄/R (D×D) or, with fewer rows than columns, the Gram x̄x̄ᵀ/R (R×R),
// for both methods.
struct Side {
  int64_t R = 0, D = 0, n = 0;
  bool gram = false;
  std::vector<double> rows, K;

  template <typename scalar_t>
  void load(const at::TensorAccessor<const scalar_t, 3>& x, int64_t b, bool bias) {
    cpu::load_rows(x, b, bias, rows);
    K.resize(n * n);
    if (gram)
      cpu::gram_from_rows(rows, R, D, K.data());
    else
      dense::syrk_rows(rows.data(), R, D, K.data());
  }

  // dL/dx for dL/dK = P (symmetric): the first d columns of (2/R)·x̄P (factor) or
  // (2/R)·P x̄ (Gram), each output row built as a sum of scaled rows.
  template <typename scalar_t>
  void rows_grad(const std::vector<double>& P, int64_t d, at::TensorAccessor<scalar_t, 3> out, int64_t b,
                 std::vector<double>& acc) const {
    const double s = 2.0 / R;
    acc.resize(D);
    for (int64_t r = 0; r < R; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const int64_t terms = gram ? R : D;
      for (int64_t m = 0; m < terms; ++m) {
        const double coef = gram ? P[r * R + m] : rows[r * D + m];
        const double* src = gram ? rows.data() + m * D : P.data() + m * D;
        for (int64_t k = 0; k < d; ++k) acc[k] += coef * src[k];
      }
      for (int64_t k = 0; k < d; ++k) out[b][r][k] = static_cast<scalar_t>(s * acc[k]);
    }
  }
};

Side plan_side(int64_t R, int64_t D) {
  Side s;
  s.R = R;
  s.D = D;
  s.gram = R < D;
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

// ---------------------------------------------------------------------------------------
// Kernels.

// The fused path of kron_logdet over the batch; with grads, also dL/dA and dL/dG for a unit
// upstream gradient (otherwise those tensors are left undefined).
std::tuple<Tensor, Tensor, Tensor> kron_fused(const Tensor& A, const Tensor& G, double scale, double tau, Method m,
                                              bool grads) {
  const int64_t B = A.size(0), dA = A.size(1), dG = G.size(1);
  auto out = at::empty({B}, A.options());
  Tensor gA, gG;
  if (grads) {
    gA = at::empty_like(A, at::MemoryFormat::Contiguous);
    gG = at::empty_like(G, at::MemoryFormat::Contiguous);
  }
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_logdet_cpu", [&] {
    auto Aa = A.accessor<const scalar_t, 3>();
    auto Ga = G.accessor<const scalar_t, 3>();
    auto oa = out.accessor<scalar_t, 1>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TaskLogdet task{m, scale, tau};
      std::vector<double> KA, KG, PA, PG;
      for (int64_t b = b0; b < b1; ++b) {
        load_symmetric(Aa, b, KA);
        load_symmetric(Ga, b, KG);
        const double logdet = task(KA, dA, dA, KG, dG, dG, grads, &PA, &PG);
        oa[b] = static_cast<scalar_t>(logdet);
        if (!grads) continue;
        if (std::isnan(logdet)) {
          PA.assign(dA * dA, kNaN);
          PG.assign(dG * dG, kNaN);
        }
        store(PA, gA.accessor<scalar_t, 3>(), b);
        store(PG, gG.accessor<scalar_t, 3>(), b);
      }
    });
  });
  return {out, gA, gG};
}

// The fused path of kfac_logdet, likewise.
std::tuple<Tensor, Tensor, Tensor> kfac_fused(const Tensor& a, const Tensor& g, double scale, double tau, Method m,
                                              bool bias, const Side& planA, const Side& planG, bool grads) {
  const int64_t B = a.size(0), dA = planA.D, dG = planG.D;
  auto out = at::empty({B}, a.options());
  Tensor grad_a, grad_g;
  if (grads) {
    grad_a = at::empty(a.sizes(), a.options());
    grad_g = at::empty(g.sizes(), g.options());
  }
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "kfac_logdet_cpu", [&] {
    auto aa = a.accessor<const scalar_t, 3>();
    auto gg = g.accessor<const scalar_t, 3>();
    auto oa = out.accessor<scalar_t, 1>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      TaskLogdet task{m, scale, tau};
      Side sA = planA, sG = planG;
      std::vector<double> PA, PG, acc;
      for (int64_t b = b0; b < b1; ++b) {
        sA.load(aa, b, bias);
        sG.load(gg, b, false);
        const double logdet = task(sA.K, sA.n, dA, sG.K, sG.n, dG, grads, &PA, &PG);
        oa[b] = static_cast<scalar_t>(logdet);
        if (!grads) continue;
        if (std::isnan(logdet)) {
          PA.assign(sA.n * sA.n, kNaN);
          PG.assign(sG.n * sG.n, kNaN);
        }
        sA.rows_grad(PA, a.size(2), grad_a.accessor<scalar_t, 3>(), b, acc);
        sG.rows_grad(PG, dG, grad_g.accessor<scalar_t, 3>(), b, acc);
      }
    });
  });
  return {out, grad_a, grad_g};
}

bool kron_fits(const Tensor& A, const Tensor& G) { return A.size(1) <= kFusedMaxOrder && G.size(1) <= kFusedMaxOrder; }

Tensor kron_logdet_cpu(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  if (!kron_fits(A, G)) return kron_logdet_composite(A, G, scale, tau, method);
  return std::get<0>(kron_fused(A, G, scale, tau, parse_method(method), false));
}

std::tuple<Tensor, Tensor, Tensor> kron_logdet_and_grad_cpu(const Tensor& A, const Tensor& G, double scale, double tau,
                                                            const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  if (!kron_fits(A, G)) return kron_logdet_and_grad_composite(A, G, scale, tau, method);
  return kron_fused(A, G, scale, tau, parse_method(method), true);
}

Tensor kfac_logdet_cpu(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                       bool bias) {
  check_layer(a, g, bias);
  check_scale_tau(scale, tau);
  const Side planA = plan_side(a.size(1), a.size(2) + (bias ? 1 : 0)), planG = plan_side(g.size(1), g.size(2));
  if (!fused_fits(planA, planG)) return kfac_logdet_composite(a, g, scale, tau, method, bias);
  return std::get<0>(kfac_fused(a, g, scale, tau, parse_method(method), bias, planA, planG, false));
}

std::tuple<Tensor, Tensor, Tensor> kfac_logdet_and_grad_cpu(const Tensor& a, const Tensor& g, double scale, double tau,
                                                            const std::string& method, bool bias) {
  check_layer(a, g, bias);
  check_scale_tau(scale, tau);
  const Side planA = plan_side(a.size(1), a.size(2) + (bias ? 1 : 0)), planG = plan_side(g.size(1), g.size(2));
  if (!fused_fits(planA, planG)) return kfac_logdet_and_grad_composite(a, g, scale, tau, method, bias);
  return kfac_fused(a, g, scale, tau, parse_method(method), bias, planA, planG, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_logdet", &kron_logdet_cpu);
  m.impl("kron_logdet_and_grad", &kron_logdet_and_grad_cpu);
  m.impl("kfac_logdet", &kfac_logdet_cpu);
  m.impl("kfac_logdet_and_grad", &kfac_logdet_and_grad_cpu);
}

}  // namespace fastlaplace
