// Device-generic implementations of the log-det ops, written with ATen and the
// fastlaplace primitives (kron_factors, damped_cholesky) called through the dispatcher,
// so that each backend's own primitive kernels run underneath. CUDA registers these
// directly; the CPU uses them above the sizes its fused small-matrix path serves.
// The formulas (π-corrected damping, exact eigenvalue sum, Gram or factor) are those of
// csrc/kfac_math.h and fastlaplace/kfac_math.py, written here with ATen on whole batches.
#pragma once
#include <ATen/core/Tensor.h>
#include <string>
#include <tuple>

namespace fastlaplace {

std::tuple<at::Tensor, at::Tensor> call_kron_factors(const at::Tensor& a, const at::Tensor& g, bool bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> call_damped_cholesky(const at::Tensor& M, const at::Tensor& damping);

// damped_cholesky by the backend's library (LAPACK's potrf, cuSOLVER), for orders where a
// blocked factorisation wins; failures as NaN and info, with no host synchronisation.
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky_library(const at::Tensor& M, const at::Tensor& damping);

at::Tensor kron_logdet_composite(const at::Tensor& A, const at::Tensor& G, double scale, double tau,
                                 const std::string& method);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_logdet_and_grad_composite(const at::Tensor& A, const at::Tensor& G,
                                                                              double scale, double tau,
                                                                              const std::string& method);
at::Tensor kfac_logdet_composite(const at::Tensor& a, const at::Tensor& g, double scale, double tau,
                                 const std::string& method, bool bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> kfac_logdet_and_grad_composite(const at::Tensor& a, const at::Tensor& g,
                                                                              double scale, double tau,
                                                                              const std::string& method, bool bias);

}  // namespace fastlaplace
