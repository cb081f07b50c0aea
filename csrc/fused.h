// The fused log-det ops (orders ≤ 64 after the Gram trick: every few-shot layer), shared by
// the CPU and CUDA backends and the emulator of the CUDA launch: input checks, the choice
// between the fused path and the composite one (csrc/composite.cpp), output allocation,
// dtype dispatch and the tasks. A backend supplies only a Launcher, which runs a task over
// the batch with its thresholds: a serial block per task with a parallel_for on the CPU
// (csrc/cpu/logdet.cpp), one block per task in one kernel launch on CUDA
// (csrc/cuda/launch.cuh), the same launch simulated on the CPU (csrc/testing/emulator.h).
// The per-task math is csrc/kfac_math.h.
#pragma once
#include <ATen/ATen.h>

#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "checks.h"
#include "composite.h"
#include "kfac_math.h"

namespace fastlaplace::fused {

using at::Tensor;

// Which layers go fused: carriers of order ≤ max_order (max_order_eigen where the exact
// method decomposes both) and at most max_work multiply-adds to build one task's matrices.
// The CPU's bounds were measured (docs/design.md §7); the GPU's
// follows the cost model there, and FASTLAPLACE_CUDA_FUSED_MAX_ORDER overrides its order
// (0: never fused; max_order_eigen is at most 32) so that one GPU run can time both paths
// on the same inputs.
// The exact method decomposes both carriers unless the smaller has at most
// kCholeskyPerEigenvalueUpTo eigenvalues; on the GPU that is cyclic Jacobi, whose barriers
// (three per round, n − 1 rounds per sweep) outgrow the composite path's launches above order
// 32 (docs/design.md §7), so such layers have a bound of their own, max_order_eigen.
struct Thresholds {
  int64_t max_order, max_work, max_order_eigen;
};

constexpr int64_t kMaxOrder = 64;  // 64×64 doubles: 32 KiB, a matrix in shared memory
constexpr Thresholds kCpuThresholds{kMaxOrder, int64_t(1) << 22, kMaxOrder};
constexpr int64_t kCudaMaxWork = int64_t(1) << 24;
constexpr int64_t kCudaMaxOrderEigen = 32;

inline Thresholds cuda_thresholds() {
  const char* env = std::getenv("FASTLAPLACE_CUDA_FUSED_MAX_ORDER");
  if (env == nullptr || *env == '\0') return {kMaxOrder, kCudaMaxWork, kCudaMaxOrderEigen};
  char* end = nullptr;
  const long order = std::strtol(env, &end, 10);
  TORCH_CHECK_VALUE(*end == '\0' && order >= 0 && order <= kMaxOrder,
                    "fastlaplace: FASTLAPLACE_CUDA_FUSED_MAX_ORDER must be an integer from 0 (never fused) to ",
                    kMaxOrder, ", got '", env, "'");
  return {order, kCudaMaxWork, math::mini(order, kCudaMaxOrderEigen)};
}

inline int64_t build_work(const math::Side& s) { return s.gram ? s.R * s.R * s.D : s.D * s.D * s.R; }

// Carriers of orders nA and nG go fused under t with this method.
inline bool orders_fit(const Thresholds& t, Method method, int64_t nA, int64_t nG) {
  const int64_t small = math::mini(nA, nG), large = math::maxi(nA, nG);
  const bool eigen = method == Method::Exact && small > math::kCholeskyPerEigenvalueUpTo;
  return large <= (eigen ? t.max_order_eigen : t.max_order);
}

inline bool kfac_fits(const Thresholds& t, Method method, const math::Side& A, const math::Side& G) {
  return orders_fit(t, method, A.n, G.n) && build_work(A) + build_work(G) <= t.max_work;
}

// What a launcher needs of a launch: the tasks, the largest carrier order (it sets the block
// shape), and per task the doubles of matrices (shared memory where they fit) and of rows
// (global memory).
struct Plan {
  int64_t tasks, order, matrices, rows;
};

// The GPU's launch layout, which the emulator reproduces: a block of `threads` per task; in
// shared memory the sum's scratch, then the task's matrices when they fit under the
// per-block limit; in global memory, per task, its rows (and the matrices otherwise).
struct Layout {
  int64_t threads;
  bool in_shared;
  int64_t shared, global;  // doubles per block, per task
};

inline int64_t block_threads(int64_t order) { return order <= 8 ? 32 : order <= 32 ? 64 : 128; }

inline Layout layout(const Plan& plan, int64_t threads, int64_t shared_limit_bytes) {
  const int64_t scratch = block::reduce_scratch(threads);
  const bool in_shared = (scratch + plan.matrices) * static_cast<int64_t>(sizeof(double)) <= shared_limit_bytes;
  return {threads, in_shared, scratch + (in_shared ? plan.matrices : 0), plan.rows + (in_shared ? 0 : plan.matrices)};
}

// Block b's buffers in that layout, from the start of its shared memory and of the workspace.
template <class P>
struct Buffers {
  P scratch, mats, rows;
};

template <class P>
FL_HD Buffers<P> task_buffers(bool in_shared, int64_t threads, int64_t matrices, int64_t global_per_task, P shared,
                              P global, int64_t b) {
  P ws = global + b * global_per_task;
  return {shared, in_shared ? shared + threads : ws, in_shared ? ws : ws + matrices};
}

// Elements addressable from t's data pointer (what the emulator bounds its reads by).
inline int64_t span(const Tensor& t) {
  if (t.numel() == 0) return 0;
  int64_t last = 0;
  for (int64_t i = 0; i < t.dim(); ++i) last += (t.size(i) - 1) * t.stride(i);
  return last + 1;
}

template <typename scalar_t>
struct KfacTask {
  const scalar_t* a;
  int64_t saB, saR, saD, a_span;
  const scalar_t* g;
  int64_t sgB, sgR, sgD, g_span;
  math::Side A, G;
  Method method;
  double c, tau;
  bool grads;
  int64_t tasks;
  scalar_t* out;
  scalar_t* grad_a;
  scalar_t* grad_g;

  template <class Blk, class P>
  FL_HD void operator()(const Blk& blk, int64_t b, P mats, P rows) const {
    const int64_t na = A.R * A.d, ng = G.R * G.d;
    const double v = math::kfac_task(blk, A, G, method, c, tau, blk.view(a, a_span) + b * saB, saR, saD,
                                     blk.view(g, g_span) + b * sgB, sgR, sgD, grads,
                                     blk.view(grad_a, grads ? tasks * na : 0) + (grads ? b * na : 0),
                                     blk.view(grad_g, grads ? tasks * ng : 0) + (grads ? b * ng : 0), mats, rows);
    if (blk.tid() == 0) blk.view(out, tasks)[b] = v;
  }
};

template <typename scalar_t>
struct KronTask {
  const scalar_t* A;
  int64_t sAB, sAi, sAj, A_span;
  const scalar_t* G;
  int64_t sGB, sGi, sGj, G_span;
  int64_t dA, dG;
  Method method;
  double c, tau;
  bool grads;
  int64_t tasks;
  scalar_t* out;
  scalar_t* grad_A;
  scalar_t* grad_G;

  template <class Blk, class P>
  FL_HD void operator()(const Blk& blk, int64_t b, P mats, P) const {
    const int64_t nA = dA * dA, nG = dG * dG;
    const double v = math::kron_task(blk, dA, dG, method, c, tau, blk.view(A, A_span) + b * sAB, sAi, sAj,
                                     blk.view(G, G_span) + b * sGB, sGi, sGj, grads,
                                     blk.view(grad_A, grads ? tasks * nA : 0) + (grads ? b * nA : 0),
                                     blk.view(grad_G, grads ? tasks * nG : 0) + (grads ? b * nG : 0), mats);
    if (blk.tid() == 0) blk.view(out, tasks)[b] = v;
  }
};

// The task structs travel by value as kernel arguments (4 KiB at most).
static_assert(std::is_trivially_copyable_v<KfacTask<double>> && sizeof(KfacTask<double>) <= 256);
static_assert(std::is_trivially_copyable_v<KronTask<double>> && sizeof(KronTask<double>) <= 256);

template <typename scalar_t>
scalar_t* data_or_null(const Tensor& t) {
  return t.defined() ? t.mutable_data_ptr<scalar_t>() : nullptr;
}

// The log-det (and with grads, its gradients for a unit upstream gradient) over the batch.
template <class Launcher>
std::tuple<Tensor, Tensor, Tensor> kfac(const Launcher& launch, const Tensor& a, const Tensor& g, double c, double tau,
                                        Method method, bool bias, bool grads) {
  const auto A = math::plan_side(a.size(1), a.size(2), bias), G = math::plan_side(g.size(1), g.size(2), false);
  const int64_t B = a.size(0);
  auto out = at::empty({B}, a.options());
  Tensor grad_a, grad_g;
  if (grads) {
    grad_a = at::empty(a.sizes(), a.options());
    grad_g = at::empty(g.sizes(), g.options());
  }
  const Plan plan{B, math::maxi(A.n, G.n), math::kfac_task_matrices(A, G, method), math::kfac_task_rows(A, G)};
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "fastlaplace_kfac_fused", [&] {
    // One line per operand (its pointer, strides and span), so clang-format is off here.
    // clang-format off
    const KfacTask<scalar_t> task{a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), a.stride(2), span(a),
                                  g.const_data_ptr<scalar_t>(), g.stride(0), g.stride(1), g.stride(2), span(g),
                                  A, G, method, c, tau, grads, B, out.mutable_data_ptr<scalar_t>(),
                                  data_or_null<scalar_t>(grad_a), data_or_null<scalar_t>(grad_g)};
    // clang-format on
    launch(plan, task);
  });
  return {out, grad_a, grad_g};
}

template <class Launcher>
std::tuple<Tensor, Tensor, Tensor> kron(const Launcher& launch, const Tensor& A, const Tensor& G, double c, double tau,
                                        Method method, bool grads) {
  const int64_t B = A.size(0), dA = A.size(1), dG = G.size(1);
  auto out = at::empty({B}, A.options());
  Tensor grad_A, grad_G;
  if (grads) {
    grad_A = at::empty(A.sizes(), A.options());
    grad_G = at::empty(G.sizes(), G.options());
  }
  const Plan plan{B, math::maxi(dA, dG), math::kron_task_matrices(dA, dG, method), 0};
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "fastlaplace_kron_fused", [&] {
    // clang-format off
    const KronTask<scalar_t> task{A.const_data_ptr<scalar_t>(), A.stride(0), A.stride(1), A.stride(2), span(A),
                                  G.const_data_ptr<scalar_t>(), G.stride(0), G.stride(1), G.stride(2), span(G),
                                  dA, dG, method, c, tau, grads, B, out.mutable_data_ptr<scalar_t>(),
                                  data_or_null<scalar_t>(grad_A), data_or_null<scalar_t>(grad_G)};
    // clang-format on
    launch(plan, task);
  });
  return {out, grad_A, grad_G};
}

// An op with its checks: fused where the layer fits the launcher's thresholds, composite above.
template <class Launcher>
std::tuple<Tensor, Tensor, Tensor> kron_op(const Launcher& launch, const Tensor& A, const Tensor& G, double scale,
                                           double tau, const std::string& method, bool grads) {
  check_factors(A, G);
  check_scale_tau(scale, tau);
  const Method m = parse_method(method);
  if (!orders_fit(launch.thresholds(), m, A.size(1), G.size(1)))
    return kron_logdet_composite(A, G, scale, tau, m, grads);
  return kron(launch, A, G, scale, tau, m, grads);
}

template <class Launcher>
std::tuple<Tensor, Tensor, Tensor> kfac_op(const Launcher& launch, const Tensor& a, const Tensor& g, double scale,
                                           double tau, const std::string& method, bool bias, bool grads) {
  check_layer(a, g, bias);
  check_scale_tau(scale, tau);
  const Method m = parse_method(method);
  if (!kfac_fits(launch.thresholds(), m, math::plan_side(a.size(1), a.size(2), bias),
                 math::plan_side(g.size(1), g.size(2), false)))
    return kfac_logdet_composite(a, g, scale, tau, m, bias, grads);
  return kfac(launch, a, g, scale, tau, m, bias, grads);
}

// The four op kernels of a backend whose Launcher is made from an input tensor.
template <class Launcher>
struct Ops {
  static Tensor kron_logdet(const Tensor& A, const Tensor& G, double scale, double tau, const std::string& method) {
    return std::get<0>(kron_op(Launcher(A), A, G, scale, tau, method, false));
  }
  static std::tuple<Tensor, Tensor, Tensor> kron_logdet_and_grad(const Tensor& A, const Tensor& G, double scale,
                                                                 double tau, const std::string& method) {
    return kron_op(Launcher(A), A, G, scale, tau, method, true);
  }
  static Tensor kfac_logdet(const Tensor& a, const Tensor& g, double scale, double tau, const std::string& method,
                            bool bias) {
    return std::get<0>(kfac_op(Launcher(a), a, g, scale, tau, method, bias, false));
  }
  static std::tuple<Tensor, Tensor, Tensor> kfac_logdet_and_grad(const Tensor& a, const Tensor& g, double scale,
                                                                 double tau, const std::string& method, bool bias) {
    return kfac_op(Launcher(a), a, g, scale, tau, method, bias, true);
  }
};

}  // namespace fastlaplace::fused
