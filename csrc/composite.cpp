#include "composite.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <cmath>
#include <limits>

#include "checks.h"
#ifdef FASTLAPLACE_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace fastlaplace {

using at::Tensor;

std::tuple<Tensor, Tensor> call_kron_factors(const Tensor& a, const Tensor& g, bool bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlaplace::kron_factors", "")
                       .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, bool)>();
  return op.call(a, g, bias);
}

std::tuple<Tensor, Tensor, Tensor> call_damped_cholesky(const Tensor& M, const Tensor& damping) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fastlaplace::damped_cholesky", "")
                       .typed<std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&)>();
  return op.call(M, damping);
}

std::tuple<Tensor, Tensor, Tensor> damped_cholesky_library(const Tensor& M, const Tensor& damping) {
  auto damped = M.clone(at::MemoryFormat::Contiguous);  // the library reads the lower triangle
  damped.diagonal(0, -2, -1).add_(damping.unsqueeze(-1));
  auto [L, info] = at::linalg_cholesky_ex(damped);
  auto diagonal = L.diagonal(0, -2, -1);
  // potrf passes Inf and NaN through where the per-task loops stop: report the first
  // non-finite pivot as the failing minor, as they do.
  auto nonfinite = at::logical_not(at::isfinite(diagonal));
  info = at::where(at::logical_and(info == 0, nonfinite.any(-1)), nonfinite.to(at::kInt).argmax(-1) + 1, info)
             .to(at::kInt);
  auto ok = info == 0;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  auto logdet = at::where(ok, diagonal.log().sum(-1) * 2, at::full_like(info, nan, M.options()));
  L = at::where(ok.view({-1, 1, 1}), L, at::full_like(L, nan));
  return {L, logdet, info};
}

namespace {

Tensor batch_trace(const Tensor& M) { return M.diagonal(0, -2, -1).sum(-1); }

// (LLᵀ)⁻¹ = L⁻ᵀL⁻¹ by a triangular solve: unlike cholesky_inverse it checks no info
// code, so it makes no host synchronisation on CUDA. NaN factors give NaN inverses.
Tensor inverse_from_cholesky(const Tensor& L) {
  auto eye = at::eye(L.size(-1), L.options()).expand_as(L);
  auto X = at::linalg_solve_triangular(L, eye, /*upper=*/false);  // L⁻¹
  return at::matmul(X.mT(), X);
}

Tensor add_to_diagonal(const Tensor& M, const Tensor& value) {  // M + value[b]·I, value [B]
  auto out = M.clone();
  out.diagonal(0, -2, -1).add_(value.unsqueeze(-1));
  return out;
}

// x̄x̄ᵀ / R for the R×R Gram matrix of the rows x̄ = [x, 1] (bias) or x.
Tensor gram(const Tensor& x, bool bias) {
  auto K = at::matmul(x, x.mT());
  if (bias) K = K + 1;
  return K / static_cast<double>(x.size(1));
}

// Eigenvalues (and eigenvectors) of each task's matrix. Not clamped at 0: log(c·a·g + τ)
// is smooth through a = 0, and a clamp would make the gradient wrong for factors of low
// rank. LAPACK raises on non-finite input where the other paths report NaN: such tasks are
// decomposed as zero matrices and their eigenvalues set to NaN, so that every result of
// theirs is NaN, as on the fused path.
struct Spectrum {
  Tensor w, V;
};

Spectrum symmetric_eigh(const Tensor& K, bool vectors) {
  auto bad = at::logical_not(at::isfinite(K).flatten(1).all(1));
  auto clean = at::where(bad.view({-1, 1, 1}), at::zeros_like(K), K);
#ifdef FASTLAPLACE_WITH_CUDA
  if (K.is_cuda()) {  // linalg.eigh would check cuSOLVER's status on the host: two syncs
    auto [w, V] = symmetric_eigh_cuda(clean, vectors);
    return {at::where(bad.unsqueeze(1), at::full_like(w, std::numeric_limits<double>::quiet_NaN()), w), V};
  }
#endif
  auto [w, V] = at::_linalg_eigh(clean, "L", vectors);
  return {at::where(bad.unsqueeze(1), at::full_like(w, std::numeric_limits<double>::quiet_NaN()), w), V};
}

// Σ_ij log(c·a_i·g_j + τ) over all d_A·d_G pairs, given the n_A ≤ d_A and n_G ≤ d_G
// possibly nonzero eigenvalues; each missing (zero) pair contributes log τ.
Tensor exact_from_eigenvalues(const Tensor& wA, int64_t dA, const Tensor& wG, int64_t dG, double c, double tau) {
  auto s = at::log(wA.unsqueeze(2) * wG.unsqueeze(1) * c + tau).sum({1, 2});
  const double zero_pairs = static_cast<double>(dA * dG - wA.size(1) * wG.size(1));
  return s + zero_pairs * std::log(tau);
}

// ψ_A(a_i) = Σ_j c·g_j / (c·a_i·g_j + τ) and ψ_G likewise: the derivative of the exact
// log-det with respect to each eigenvalue (zero eigenvalues of the other factor add 0).
std::tuple<Tensor, Tensor> exact_psi(const Tensor& wA, const Tensor& wG, double c, double tau) {
  auto denom = wA.unsqueeze(2) * wG.unsqueeze(1) * c + tau;
  auto psiA = (wG.unsqueeze(1) * c / denom).sum(2);
  auto psiG = (wA.unsqueeze(2) * c / denom).sum(1);
  return {psiA, psiG};
}

Tensor spectral(const Tensor& V, const Tensor& psi) {  // V diag(ψ) Vᵀ
  return at::matmul(V * psi.unsqueeze(1), V.mT());
}

// Gradient with respect to the rows x of a factor K = x̄ᵀx̄ / R, given a symmetric
// dL/dK = P: (2/R)·x̄P, without its bias column.
Tensor rows_grad_factor(const Tensor& x, const Tensor& P, bool bias) {
  const int64_t d = x.size(2);
  auto out = at::matmul(x, P.narrow(1, 0, d).narrow(2, 0, d));
  if (bias) out = out + P.select(1, d).narrow(1, 0, d).unsqueeze(1);
  return out * (2.0 / static_cast<double>(x.size(1)));
}

// The same when the spectral function was taken on the Gram matrix x̄x̄ᵀ / R:
// dL/dx̄ = (2/R)·P x̄, whose first d columns are (2/R)·P x.
Tensor rows_grad_gram(const Tensor& x, const Tensor& P) {
  return at::matmul(P, x) * (2.0 / static_cast<double>(x.size(1)));
}

// x̄ᵀx̄ / R through the kron_factors primitive of the tensor's backend (its second,
// 1×1 factor is discarded).
Tensor factor_of(const Tensor& x, bool bias) {
  auto probe = x.size(2) > 0 ? x.narrow(2, 0, 1) : at::zeros({x.size(0), x.size(1), 1}, x.options());
  return std::get<0>(call_kron_factors(x, probe, bias));
}

// The matrices carrying the spectra of a layer's two factors: each factor itself, or with
// fewer rows than columns its R×R Gram matrix (same nonzero eigenvalues, docs/design.md §2).
// One kron_factors call serves both sides when neither is a Gram matrix.
std::tuple<Tensor, Tensor> spectrum_carriers(const Tensor& a, const Tensor& g, bool bias) {
  const int64_t R = a.size(1);
  const bool gramA = R < a.size(2) + (bias ? 1 : 0), gramG = R < g.size(2);
  if (!gramA && !gramG) return call_kron_factors(a, g, bias);
  return {gramA ? gram(a, bias) : factor_of(a, bias), gramG ? gram(g, false) : factor_of(g, false)};
}

struct Factored {
  Tensor LA, LG, logdet, pi, valid, trA, trG, lamA, lamG;
};

// (√c·A + π√τ·I) ⊗ (√c·G + (√τ/π)·I) from K_A (n_A ≤ d_A) and K_G: its log-det is
// d_G·logdet(A + λ_A I) + d_A·logdet(G + λ_G I) + d_A·d_G·log c with λ_A = π√τ/√c,
// λ_G = √τ/(π√c), and logdet(A + λI) = logdet(K + λI) + (d − n)·log λ.
Factored factored_forward(const Tensor& KA, int64_t dA, const Tensor& KG, int64_t dG, double c, double tau) {
  const int64_t nA = KA.size(1), nG = KG.size(1);
  Factored f;
  f.trA = batch_trace(KA);  // tr K = tr A for a Gram matrix too
  f.trG = batch_trace(KG);
  f.valid = at::logical_and(f.trA > 0, f.trG > 0);
  // π-correction (Martens & Grosse 2015); π = 1 where a factor has zero trace.
  f.pi = at::where(f.valid, at::sqrt((f.trA / static_cast<double>(dA)) / (f.trG / static_cast<double>(dG))),
                   at::ones_like(f.trA));
  const double sc = std::sqrt(c), st = std::sqrt(tau);
  f.lamA = f.pi * (st / sc);
  f.lamG = f.pi.reciprocal() * (st / sc);
  auto [LA, ldA, infoA] = call_damped_cholesky(KA, f.lamA);
  auto [LG, ldG, infoG] = call_damped_cholesky(KG, f.lamG);
  f.LA = LA;
  f.LG = LG;
  ldA = ldA + f.lamA.log() * static_cast<double>(dA - nA);
  ldG = ldG + f.lamG.log() * static_cast<double>(dG - nG);
  f.logdet = ldA * static_cast<double>(dG) + ldG * static_cast<double>(dA) + static_cast<double>(dA * dG) * std::log(c);
  return f;
}

// d logdet / dK_A and d logdet / dK_G for the factored method, π's dependence included.
std::tuple<Tensor, Tensor> factored_backward(const Factored& f, int64_t dA, int64_t dG, double c, double tau) {
  const double sc = std::sqrt(c), st = std::sqrt(tau);
  const int64_t nA = f.LA.size(1), nG = f.LG.size(1);
  auto invA = inverse_from_cholesky(f.LA);  // (K_A + λ_A I)⁻¹
  auto invG = inverse_from_cholesky(f.LG);
  auto trInvA = batch_trace(invA) + f.lamA.reciprocal() * static_cast<double>(dA - nA);
  auto trInvG = batch_trace(invG) + f.lamG.reciprocal() * static_cast<double>(dG - nG);
  // d logdet / dπ = d_G·√τ·tr(A_d⁻¹) − d_A·(√τ/π²)·tr(G_d⁻¹), with A_d⁻¹ = (A + λ_A I)⁻¹/√c
  auto dpi =
      trInvA * (static_cast<double>(dG) * st / sc) - trInvG * (static_cast<double>(dA) * st / sc) / (f.pi * f.pi);
  auto zero = at::zeros_like(dpi);
  auto kA = at::where(f.valid, dpi * f.pi / (f.trA * 2.0), zero);
  auto kG = at::where(f.valid, -dpi * f.pi / (f.trG * 2.0), zero);
  return std::make_tuple(add_to_diagonal(invA * static_cast<double>(dG), kA),
                         add_to_diagonal(invG * static_cast<double>(dA), kG));
}

// dL/dx from dL/dK = P for the matrix K that spectrum_carriers returned for x.
Tensor rows_grad(const Tensor& x, const Tensor& P, bool bias) {
  return x.size(1) < x.size(2) + (bias ? 1 : 0) ? rows_grad_gram(x, P) : rows_grad_factor(x, P, bias);
}

}  // namespace

Tensor kron_logdet_composite(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  if (parse_method(method) == Method::Factored) return factored_forward(A, A.size(1), G, G.size(1), scale, tau).logdet;
  auto wA = symmetric_eigh(A, false).w;
  auto wG = symmetric_eigh(G, false).w;
  return exact_from_eigenvalues(wA, A.size(1), wG, G.size(1), scale, tau);
}

std::tuple<Tensor, Tensor, Tensor> kron_logdet_and_grad_composite(const Tensor& A, const Tensor& G, double scale,
                                                                  double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  if (parse_method(method) == Method::Factored) {
    auto f = factored_forward(A, A.size(1), G, G.size(1), scale, tau);
    auto [gA, gG] = factored_backward(f, A.size(1), G.size(1), scale, tau);
    return {f.logdet, gA.contiguous(), gG.contiguous()};
  }
  auto [wA, VA] = symmetric_eigh(A, true);
  auto [wG, VG] = symmetric_eigh(G, true);
  auto [psiA, psiG] = exact_psi(wA, wG, scale, tau);
  return {exact_from_eigenvalues(wA, A.size(1), wG, G.size(1), scale, tau), spectral(VA, psiA).contiguous(),
          spectral(VG, psiG).contiguous()};
}

Tensor kfac_logdet_composite(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                             bool bias) {
  check_layer(a, g, bias);
  check_scale_tau(scale, tau);
  const int64_t dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  auto [KA, KG] = spectrum_carriers(a, g, bias);
  if (parse_method(method) == Method::Factored) return factored_forward(KA, dA, KG, dG, scale, tau).logdet;
  auto wA = symmetric_eigh(KA, false).w;
  auto wG = symmetric_eigh(KG, false).w;
  return exact_from_eigenvalues(wA, dA, wG, dG, scale, tau);
}

std::tuple<Tensor, Tensor, Tensor> kfac_logdet_and_grad_composite(const Tensor& a, const Tensor& g, double scale,
                                                                  double tau, const std::string& method, bool bias) {
  check_layer(a, g, bias);
  check_scale_tau(scale, tau);
  const int64_t dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  auto [KA, KG] = spectrum_carriers(a, g, bias);
  Tensor logdet, PA, PG;
  if (parse_method(method) == Method::Factored) {
    auto f = factored_forward(KA, dA, KG, dG, scale, tau);
    logdet = f.logdet;
    std::tie(PA, PG) = factored_backward(f, dA, dG, scale, tau);
  } else {
    auto [wA, VA] = symmetric_eigh(KA, true);
    auto [wG, VG] = symmetric_eigh(KG, true);
    auto [psiA, psiG] = exact_psi(wA, wG, scale, tau);
    logdet = exact_from_eigenvalues(wA, dA, wG, dG, scale, tau);
    PA = spectral(VA, psiA);
    PG = spectral(VG, psiG);
  }
  return {logdet, rows_grad(a, PA, bias).contiguous(), rows_grad(g, PG, false).contiguous()};
}

}  // namespace fastlaplace
