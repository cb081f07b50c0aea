#include "composite.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <cmath>
#include <limits>

#include "checks.h"
#include "kfac_math.h"
#ifdef FASTLAPLACE_WITH_CUDA
#include "cuda/kernels.h"
#endif

namespace fastlaplace {

using at::Tensor;

// formulas.h's operations on batches of values.
template <>
struct math::Arith<Tensor> {
  static Tensor select(const Tensor& cond, const Tensor& x, const Tensor& y) { return at::where(cond, x, y); }
  static Tensor abs(const Tensor& x) { return x.abs(); }
  static Tensor sqrt(const Tensor& x) { return x.sqrt(); }
  static Tensor full_like(const Tensor& x, double value) { return at::full_like(x, value); }
};

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
  return s + math::zero_pairs_logdet(dA, dG, wA.size(1), wG.size(1), tau);
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

// The factors' formation (O(R·d²), in the input's dtype with sums in double) aside, this
// path computes in double, as the fused one does: in float32, λ = π√(τ/c) overflowed for
// extreme c and the damped factors lost the digits the precision guard counts on. The
// decompositions are O(d³), small beside the formation at the orders that come here.
Tensor to_double(const Tensor& t) { return t.to(at::kDouble); }

// The matrices carrying the spectra of a layer's two factors: each factor itself, or with
// fewer rows than columns its R×R Gram matrix (same nonzero eigenvalues, docs/design.md §2).
// One kron_factors call serves both sides when neither is a Gram matrix.
// They are returned in double, like everything after them (see to_double).
std::tuple<Tensor, Tensor> spectrum_carriers(const Tensor& a, const Tensor& g, bool bias) {
  const int64_t R = a.size(1);
  const bool gramA = R < a.size(2) + (bias ? 1 : 0), gramG = R < g.size(2);
  if (!gramA && !gramG) {
    auto [KA, KG] = call_kron_factors(a, g, bias);
    return {to_double(KA), to_double(KG)};
  }
  return {gramA ? gram(to_double(a), bias) : to_double(factor_of(a, bias)),
          gramG ? gram(to_double(g), false) : to_double(factor_of(g, false))};
}

// The rounding of computed eigenvalues w [B, n]: kRounding·ε·‖K‖ per task.
Tensor eigenvalue_rounding(const Tensor& w) { return w.abs().amax(-1) * (math::kRounding * math::kEps); }

// NaN gradients wherever the value is not finite, as on the fused path, so that a NaN loss
// never comes with a finite gradient.
Tensor nan_where_not_finite(const Tensor& grad, const Tensor& logdet) {
  auto bad = at::logical_not(at::isfinite(logdet)).view({-1, 1, 1});
  return at::where(bad, at::full_like(grad, std::numeric_limits<double>::quiet_NaN()), grad);
}

struct Factored {
  Tensor KA, KG, LA, LG, logdet, trA, trG;
  math::Dampings<Tensor> damp;
};

// Σ_j M_jj / p_j over the pivots p_j = L_jj² of M = K + λI (math::pivot_ratios).
Tensor pivot_ratios(const Tensor& K, const Tensor& L, const Tensor& lam) {
  auto diagonal = L.diagonal(0, -2, -1);
  return ((K.diagonal(0, -2, -1) + lam.unsqueeze(-1)) / (diagonal * diagonal)).sum(-1);
}

// (√c·A + π√τ·I) ⊗ (√c·G + (√τ/π)·I) from K_A (n_A ≤ d_A) and K_G: its log-det is
// d_G·logdet(A + λ_A I) + d_A·logdet(G + λ_G I) + d_A·d_G·log c with λ_A = π√τ/√c,
// λ_G = √τ/(π√c), and logdet(A + λI) = logdet(K + λI) + (d − n)·log λ.
Factored factored_forward(const Tensor& KA, int64_t dA, const Tensor& KG, int64_t dG, double c, double tau) {
  const int64_t nA = KA.size(1), nG = KG.size(1);
  Factored f;
  f.KA = KA;
  f.KG = KG;
  f.trA = batch_trace(KA);  // tr K = tr A for a Gram matrix too
  f.trG = batch_trace(KG);
  f.damp = math::factored_dampings(f.trA, dA, f.trG, dG, c, tau);
  const Tensor &lamA = f.damp.lamA, &lamG = f.damp.lamG;
  auto [LA, ldA, infoA] = call_damped_cholesky(KA, lamA);
  auto [LG, ldG, infoG] = call_damped_cholesky(KG, lamG);
  f.LA = LA;
  f.LG = LG;
  ldA = ldA + lamA.log() * static_cast<double>(dA - nA);
  ldG = ldG + lamG.log() * static_cast<double>(dG - nG);
  auto logdet =
      ldA * static_cast<double>(dG) + ldG * static_cast<double>(dA) + static_cast<double>(dA * dG) * std::log(c);
  auto err =
      (pivot_ratios(KA, LA, lamA) * static_cast<double>(dG) + pivot_ratios(KG, LG, lamG) * static_cast<double>(dA)) *
      (math::kRounding * math::kEps);
  f.logdet = math::guarded(logdet, err, dA * dG);
  return f;
}

// d logdet / dK_A and d logdet / dK_G for the factored method, π's dependence included.
// π's share: math::pi_share.
std::tuple<Tensor, Tensor> factored_backward(const Factored& f, int64_t dA, int64_t dG) {
  auto invA = inverse_from_cholesky(f.LA);  // (K_A + λ_A I)⁻¹
  auto invG = inverse_from_cholesky(f.LG);
  auto tA = (f.KA * invA).sum({1, 2}), tG = (f.KG * invG).sum({1, 2});
  const auto k = math::pi_share(f.damp, tA, tG, f.trA, f.trG, dA, dG);
  return std::make_tuple(nan_where_not_finite(add_to_diagonal(invA * static_cast<double>(dG), k.kA), f.logdet),
                         nan_where_not_finite(add_to_diagonal(invG * static_cast<double>(dA), k.kG), f.logdet));
}

// The exact method from the carriers' spectra: the log-det, guarded (each eigenvalue moves by
// its rounding δ, the value by δ·|dL/dw|), and the derivatives ψ with respect to the eigenvalues.
struct Exact {
  Tensor logdet, psiA, psiG;
};

Exact exact(const Tensor& wA, int64_t dA, const Tensor& wG, int64_t dG, double c, double tau) {
  auto [psiA, psiG] = exact_psi(wA, wG, c, tau);
  auto err = eigenvalue_rounding(wA) * psiA.abs().sum(-1) + eigenvalue_rounding(wG) * psiG.abs().sum(-1);
  return {math::guarded(exact_from_eigenvalues(wA, dA, wG, dG, c, tau), err, dA * dG), psiA, psiG};
}

// dL/dx from dL/dK = P for the matrix K that spectrum_carriers returned for x.
Tensor rows_grad(const Tensor& x, const Tensor& P, bool bias) {
  return x.size(1) < x.size(2) + (bias ? 1 : 0) ? rows_grad_gram(x, P) : rows_grad_factor(x, P, bias);
}

// The log-det from the double carriers K_A (order n_A of a factor of order d_A) and K_G, and
// with grads dL/dK_A and dL/dK_G (NaN wherever the log-det is).
std::tuple<Tensor, Tensor, Tensor> carrier_logdet(const Tensor& KA, int64_t dA, const Tensor& KG, int64_t dG, double c,
                                                  double tau, Method method, bool grads) {
  if (method == Method::Factored) {
    auto f = factored_forward(KA, dA, KG, dG, c, tau);
    if (!grads) return {f.logdet, Tensor(), Tensor()};
    auto [PA, PG] = factored_backward(f, dA, dG);
    return {f.logdet, PA, PG};
  }
  auto [wA, VA] = symmetric_eigh(KA, grads);
  auto [wG, VG] = symmetric_eigh(KG, grads);
  auto e = exact(wA, dA, wG, dG, c, tau);
  if (!grads) return {e.logdet, Tensor(), Tensor()};
  return {e.logdet, nan_where_not_finite(spectral(VA, e.psiA), e.logdet),
          nan_where_not_finite(spectral(VG, e.psiG), e.logdet)};
}

}  // namespace

// The ops' checks ran in csrc/fused.h.
std::tuple<Tensor, Tensor, Tensor> kron_logdet_composite(const Tensor& A, const Tensor& G, double scale, double tau,
                                                         Method method, bool grads) {
  auto [logdet, PA, PG] = carrier_logdet(to_double(A), A.size(1), to_double(G), G.size(1), scale, tau, method, grads);
  const auto dtype = A.scalar_type();
  if (!grads) return {logdet.to(dtype), PA, PG};
  return {logdet.to(dtype), PA.to(dtype).contiguous(), PG.to(dtype).contiguous()};
}

std::tuple<Tensor, Tensor, Tensor> kfac_logdet_composite(const Tensor& a, const Tensor& g, double scale, double tau,
                                                         Method method, bool bias, bool grads) {
  const int64_t dA = a.size(2) + (bias ? 1 : 0), dG = g.size(2);
  auto [KA, KG] = spectrum_carriers(a, g, bias);
  auto [logdet, PA, PG] = carrier_logdet(KA, dA, KG, dG, scale, tau, method, grads);
  const auto dtype = a.scalar_type();
  if (!grads) return {logdet.to(dtype), PA, PG};
  return {logdet.to(dtype), rows_grad(a, PA.to(dtype), bias).contiguous(),
          rows_grad(g, PG.to(dtype), false).contiguous()};
}

}  // namespace fastlaplace
