// The fused log-det ops (orders ≤ 64 after the Gram trick: every few-shot layer), shared by
// the CPU and CUDA backends: input checks, the choice between the fused path and the
// composite one (csrc/composite.cpp), output allocation and dtype dispatch. A backend
// supplies only a Launcher, which runs a per-task functor over the batch: a thread per task
// with a parallel_for on the CPU (csrc/cpu/logdet.cpp), one kernel launch on CUDA
// (csrc/cuda/logdet.cu). The per-task math is csrc/kfac_math.h.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>

#include "checks.h"
#include "composite.h"
#include "kfac_math.h"

namespace fastlaplace::fused {

using at::Tensor;

constexpr int64_t kMaxOrder = 64;
constexpr int64_t kMaxWork = int64_t(1) << 22;  // multiply-adds to build one task's matrices

inline int64_t build_work(const math::Side& s) { return s.gram ? s.R * s.R * s.D : s.D * s.D * s.R; }

inline bool kfac_fits(const math::Side& A, const math::Side& G) {
  return A.n <= kMaxOrder && G.n <= kMaxOrder && build_work(A) + build_work(G) <= kMaxWork;
}

inline bool kron_fits(const Tensor& A, const Tensor& G) { return A.size(1) <= kMaxOrder && G.size(1) <= kMaxOrder; }

template <typename scalar_t>
struct KfacTask {
  const scalar_t* a;
  int64_t saB, saR, saD;
  const scalar_t* g;
  int64_t sgB, sgR, sgD;
  math::Side A, G;
  bool exact;
  double c, tau;
  bool grads;
  scalar_t* out;
  scalar_t* grad_a;
  scalar_t* grad_g;

  FL_HD void operator()(int64_t b, double* ws) const {
    out[b] = static_cast<scalar_t>(math::kfac_task(A, G, exact, c, tau, a + b * saB, saR, saD, g + b * sgB, sgR, sgD,
                                                   grads, grads ? grad_a + b * A.R * A.d : nullptr,
                                                   grads ? grad_g + b * G.R * G.d : nullptr, ws));
  }
};

template <typename scalar_t>
struct KronTask {
  const scalar_t* A;
  int64_t sAB, sAi, sAj;
  const scalar_t* G;
  int64_t sGB, sGi, sGj;
  int64_t dA, dG;
  bool exact;
  double c, tau;
  bool grads;
  scalar_t* out;
  scalar_t* grad_A;
  scalar_t* grad_G;

  FL_HD void operator()(int64_t b, double* ws) const {
    out[b] = static_cast<scalar_t>(math::kron_task(dA, dG, exact, c, tau, A + b * sAB, sAi, sAj, G + b * sGB, sGi, sGj,
                                                   grads, grads ? grad_A + b * dA * dA : nullptr,
                                                   grads ? grad_G + b * dG * dG : nullptr, ws));
  }
};

template <typename scalar_t>
scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr;
}

// The log-det (and with grads, its gradients for a unit upstream gradient) over the batch.
template <class Launcher>
std::tuple<Tensor, Tensor, Tensor> kfac(const Tensor& a, const Tensor& g, double c, double tau, bool exact, bool bias,
                                        bool grads, const Launcher& launch) {
  const auto A = math::plan_side(a.size(1), a.size(2), bias), G = math::plan_side(g.size(1), g.size(2), false);
  const int64_t B = a.size(0);
  auto out = at::empty({B}, a.options());
  Tensor grad_a, grad_g;
  if (grads) {
    grad_a = at::empty(a.sizes(), a.options());
    grad_g = at::empty(g.sizes(), g.options());
  }
  const int64_t workspace = math::kfac_task_workspace(A, G, exact);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastlaplace_kfac_fused", [&] {
    // One line per operand (its pointer and strides), so clang-format is off here.
    // clang-format off
    const KfacTask<scalar_t> task{a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), a.stride(2),
                                  g.const_data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2),
                                  A, G, exact, c, tau, grads, out.mutable_data_ptr<scalar_t>(),
                                  data_or_null<scalar_t>(grad_a), data_or_null<scalar_t>(grad_g)};
    // clang-format on
    launch(B, workspace, task);
  });
  return {out, grad_a, grad_g};
}

template <class Launcher>
std::tuple<Tensor, Tensor, Tensor> kron(const Tensor& A, const Tensor& G, double c, double tau, bool exact, bool grads,
                                        const Launcher& launch) {
  const int64_t B = A.size(0), dA = A.size(1), dG = G.size(1);
  auto out = at::empty({B}, A.options());
  Tensor grad_A, grad_G;
  if (grads) {
    grad_A = at::empty(A.sizes(), A.options());
    grad_G = at::empty(G.sizes(), G.options());
  }
  const int64_t workspace = math::kron_task_workspace(dA, dG, exact);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "fastlaplace_kron_fused", [&] {
    // One line per operand (its pointer and strides), so clang-format is off here.
    // clang-format off
    const KronTask<scalar_t> task{A.const_data_ptr<scalar_t>(), A.stride(0), A.stride(1), A.stride(2),
                                  G.const_data_ptr<scalar_t>(), G.stride(0), G.stride(1), G.stride(2),
                                  dA, dG, exact, c, tau, grads, out.mutable_data_ptr<scalar_t>(),
                                  data_or_null<scalar_t>(grad_A), data_or_null<scalar_t>(grad_G)};
    // clang-format on
    launch(B, workspace, task);
  });
  return {out, grad_A, grad_G};
}

// The four ops, for a backend's Launcher: fused where the layer fits, composite above.
template <class Launcher>
struct Ops {
  static Tensor kron_logdet(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
    check_factors(A, G);
    check_scale_tau(scale, tau);
    const bool exact = parse_method(method) == Method::Exact;
    if (!kron_fits(A, G)) return kron_logdet_composite(A, G, scale, tau, method);
    return std::get<0>(kron(A, G, scale, tau, exact, false, Launcher(A)));
  }

  static std::tuple<Tensor, Tensor, Tensor> kron_logdet_and_grad(const Tensor& A, const Tensor& G, double scale,
                                                                 double tau, const std::string& method) {
    check_factors(A, G);
    check_scale_tau(scale, tau);
    const bool exact = parse_method(method) == Method::Exact;
    if (!kron_fits(A, G)) return kron_logdet_and_grad_composite(A, G, scale, tau, method);
    return kron(A, G, scale, tau, exact, true, Launcher(A));
  }

  static Tensor kfac_logdet(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                            bool bias) {
    check_layer(a, g, bias);
    check_scale_tau(scale, tau);
    const bool exact = parse_method(method) == Method::Exact;
    if (!kfac_fits(math::plan_side(a.size(1), a.size(2), bias), math::plan_side(g.size(1), g.size(2), false)))
      return kfac_logdet_composite(a, g, scale, tau, method, bias);
    return std::get<0>(kfac(a, g, scale, tau, exact, bias, false, Launcher(a)));
  }

  static std::tuple<Tensor, Tensor, Tensor> kfac_logdet_and_grad(const Tensor& a, const Tensor& g, double scale,
                                                                 double tau, const std::string& method, bool bias) {
    check_layer(a, g, bias);
    check_scale_tau(scale, tau);
    const bool exact = parse_method(method) == Method::Exact;
    if (!kfac_fits(math::plan_side(a.size(1), a.size(2), bias), math::plan_side(g.size(1), g.size(2), false)))
      return kfac_logdet_and_grad_composite(a, g, scale, tau, method, bias);
    return kfac(a, g, scale, tau, exact, bias, true, Launcher(a));
  }
};

}  // namespace fastlaplace::fused
