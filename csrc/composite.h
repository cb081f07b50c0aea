// Device-generic implementations of the log-det ops, written with ATen and the
// fastlaplace primitives (kron_factors, damped_cholesky) called through the dispatcher,
// so that each backend's own primitive kernels run underneath. CUDA registers these
// directly; the CPU uses them above the sizes its fused small-matrix path serves.
// The scalar formulas (π-corrected damping and its gradient share, the precision guard)
// come from csrc/formulas.h, shared with the fused path; the rest is written with ATen on
// whole batches.
#pragma once
#include <ATen/core/Tensor.h>
#include <string>
#include <tuple>

#include "formulas.h"  // Method

namespace fastlaplace {

std::tuple<at::Tensor, at::Tensor> call_kron_factors(const at::Tensor& a, const at::Tensor& g, bool bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_damped_cholesky(const at::Tensor& M, const at::Tensor& damping);

// damped_cholesky by the backend's library (LAPACK's potrf, cuSOLVER), for orders where a
// blocked factorisation wins; failures as NaN and info, with no host synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky_library(const at::Tensor& M, const at::Tensor& damping);

// The log-det ops above the fused path's thresholds (csrc/fused.h): the log-det and, with
// grads, its gradients for a unit upstream gradient (undefined tensors without).
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_logdet_composite(const at::Tensor& A, const at::Tensor& G,
                                                                     double scale, double tau, Method method,
                                                                     bool grads);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kfac_logdet_composite(const at::Tensor& a, const at::Tensor& g,
                                                                     double scale, double tau, Method method, bool bias,
                                                                     bool grads);

}  // namespace fastlaplace
