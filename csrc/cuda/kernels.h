// Host entry points of the CUDA kernels (defined in the .cu files of this folder).
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

namespace fastlaplace {
std::tuple<at::Tensor, at::Tensor> kron_factors_cuda(const at::Tensor& a, const at::Tensor& g, bool bias);
std::tuple<at::Tensor, at::Tensor, at::Tensor> damped_cholesky_cuda(const at::Tensor& M, const at::Tensor& damping);
// Eigenvalues [B, n] and eigenvectors (columns) of symmetric K [B, n, n] (lower triangle
// read), without a host synchronisation; NaN eigenvalues where cuSOLVER failed.
std::tuple<at::Tensor, at::Tensor> symmetric_eigh_cuda(const at::Tensor& K, bool vectors);
}  // namespace fastlaplace
