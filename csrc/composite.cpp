#include "composite.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <cmath>

#include "checks.h"

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

namespace {

Tensor batch_trace(const Tensor& M) { return M.diagonal(0, -2, -1).sum(-1); }

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

// Eigenvalues and eigenvectors. Not clamped at 0: log(c·a·g + τ) is smooth through a = 0,
// and a clamp would make the gradient wrong for factors of low rank.
std::tuple<Tensor, Tensor> psd_eigh(const Tensor& K) {
  auto [w, V] = at::linalg_eigh(K);
  return {w, V};
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

struct Factored {
  Tensor LA, LG, logdet, pi, valid, trA, trG;
};

// (√c·A + π√τ·I) ⊗ (√c·G + (√τ/π)·I), whose log-det is
// d_G·logdet(A + π√τ/√c·I) + d_A·logdet(G + √τ/(π√c)·I) + d_A·d_G·log c.
Factored factored_forward(const Tensor& A, const Tensor& G, double c, double tau) {
  const int64_t dA = A.size(1), dG = G.size(1);
  Factored f;
  f.trA = batch_trace(A);
  f.trG = batch_trace(G);
  f.valid = at::logical_and(f.trA > 0, f.trG > 0);
  // π-correction (Martens & Grosse 2015); π = 1 where a factor has zero trace.
  f.pi = at::where(f.valid, at::sqrt((f.trA / static_cast<double>(dA)) / (f.trG / static_cast<double>(dG))),
                   at::ones_like(f.trA));
  const double sc = std::sqrt(c), st = std::sqrt(tau);
  auto [LA, ldA, infoA] = call_damped_cholesky(A, f.pi * (st / sc));
  auto [LG, ldG, infoG] = call_damped_cholesky(G, f.pi.reciprocal() * (st / sc));
  f.LA = LA;
  f.LG = LG;
  f.logdet = ldA * static_cast<double>(dG) + ldG * static_cast<double>(dA) +
             static_cast<double>(dA * dG) * std::log(c);
  return f;
}

// d logdet / dA and d logdet / dG for the factored method, π's dependence included.
std::tuple<Tensor, Tensor> factored_backward(const Factored& f, const Tensor& grad, int64_t dA, int64_t dG,
                                             double c, double tau) {
  const double sc = std::sqrt(c), st = std::sqrt(tau);
  auto invA = at::cholesky_inverse(f.LA);  // (A + λ_A I)⁻¹ = √c·A_d⁻¹
  auto invG = at::cholesky_inverse(f.LG);
  // d logdet / dπ = d_G·√τ·tr(A_d⁻¹) − d_A·(√τ/π²)·tr(G_d⁻¹)
  auto dpi = batch_trace(invA) * (static_cast<double>(dG) * st / sc) -
             batch_trace(invG) * (static_cast<double>(dA) * st / sc) / (f.pi * f.pi);
  auto zero = at::zeros_like(dpi);
  auto kA = at::where(f.valid, dpi * f.pi / (f.trA * 2.0), zero);
  auto kG = at::where(f.valid, -dpi * f.pi / (f.trG * 2.0), zero);
  auto gA = add_to_diagonal(invA * static_cast<double>(dG), kA) * grad.view({-1, 1, 1});
  auto gG = add_to_diagonal(invG * static_cast<double>(dA), kG) * grad.view({-1, 1, 1});
  return std::make_tuple(gA, gG);
}

}  // namespace

Tensor kron_logdet_composite(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  if (parse_method(method) == Method::Factored) return factored_forward(A, G, scale, tau).logdet;
  auto wA = at::linalg_eigvalsh(A);
  auto wG = at::linalg_eigvalsh(G);
  return exact_from_eigenvalues(wA, A.size(1), wG, G.size(1), scale, tau);
}

std::tuple<Tensor, Tensor> kron_logdet_backward_composite(const Tensor& grad, const Tensor& A, const Tensor& G,
                                                          double scale, double tau, const std::string& method) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  check_grad(grad, A, A.size(0));
  if (parse_method(method) == Method::Factored)
    return factored_backward(factored_forward(A, G, scale, tau), grad, A.size(1), G.size(1), scale, tau);
  auto [wA, VA] = psd_eigh(A);
  auto [wG, VG] = psd_eigh(G);
  auto [psiA, psiG] = exact_psi(wA, wG, scale, tau);
  auto g = grad.view({-1, 1, 1});
  return {spectral(VA, psiA) * g, spectral(VG, psiG) * g};
}

Tensor kfac_logdet_composite(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                             bool bias) {
  check_rows(a, g);
  check_scale_tau(scale, tau);
  const int64_t R = a.size(1), dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  if (parse_method(method) == Method::Factored) {
    auto [A, G] = call_kron_factors(a, g, bias);
    return factored_forward(A, G, scale, tau).logdet;
  }
  // With fewer rows than columns the factor's nonzero eigenvalues are the Gram matrix's.
  Tensor KA, KG;
  if (R >= dA || R >= dG) std::tie(KA, KG) = call_kron_factors(a, g, bias);
  if (R < dA) KA = gram(a, bias);
  if (R < dG) KG = gram(g, false);
  auto wA = at::linalg_eigvalsh(KA);
  auto wG = at::linalg_eigvalsh(KG);
  return exact_from_eigenvalues(wA, dA, wG, dG, scale, tau);
}

std::tuple<Tensor, Tensor> kfac_logdet_backward_composite(const Tensor& grad, const Tensor& a, const Tensor& g,
                                                          double scale, double tau, const std::string& method,
                                                          bool bias) {
  check_rows(a, g);
  check_scale_tau(scale, tau);
  check_grad(grad, a, a.size(0));
  const int64_t R = a.size(1), dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  if (parse_method(method) == Method::Factored) {
    auto [A, G] = call_kron_factors(a, g, bias);
    auto [gA, gG] = factored_backward(factored_forward(A, G, scale, tau), grad, dA, dG, scale, tau);
    return {rows_grad_factor(a, gA, bias), rows_grad_factor(g, gG, false)};
  }
  Tensor KA, KG;
  if (R >= dA || R >= dG) std::tie(KA, KG) = call_kron_factors(a, g, bias);
  if (R < dA) KA = gram(a, bias);
  if (R < dG) KG = gram(g, false);
  auto [wA, VA] = psd_eigh(KA);
  auto [wG, VG] = psd_eigh(KG);
  auto [psiA, psiG] = exact_psi(wA, wG, scale, tau);
  auto gvec = grad.view({-1, 1, 1});
  auto PA = spectral(VA, psiA) * gvec;
  auto PG = spectral(VG, psiG) * gvec;
  auto grad_a = R < dA ? rows_grad_gram(a, PA) : rows_grad_factor(a, PA, bias);
  auto grad_g = R < dG ? rows_grad_gram(g, PG) : rows_grad_factor(g, PG, false);
  return {grad_a, grad_g};
}

}  // namespace fastlaplace
