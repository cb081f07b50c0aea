// Every fastlaplace op schema, in one place. Kernels register per backend:
// csrc/cpu/*.cpp (CPU), csrc/cuda/register.cpp (CUDA). Fake (meta) implementations, and
// the autograd of kron_factors and damped_cholesky, live beside the typed wrappers in
// fastlaplace/ops.py; the autograd of the log-det ops is csrc/autograd.cpp.
#include <torch/library.h>

TORCH_LIBRARY(fastlaplace, m) {
  // A = [a, 1]ᵀ[a, 1] / R (bias) or aᵀa / R, and G = gᵀg / R, per task.
  m.def("kron_factors(Tensor a, Tensor g, bool bias) -> (Tensor, Tensor)");
  // Lower Cholesky factor of M + damping·I, its log-determinant, and a per-task status
  // (0: positive definite; j > 0: the leading minor of order j is not).
  m.def("damped_cholesky(Tensor M, Tensor damping) -> (Tensor, Tensor, Tensor)");
  // log det(scale·A⊗G + tau·I) by method "exact" or "factored" (docs/design.md §2).
  m.def("kron_logdet(Tensor A, Tensor G, float scale, float tau, str method) -> Tensor");
  // The log-det and its gradients for a unit upstream gradient, from one pass. The autograd
  // kernel of kron_logdet (csrc/autograd.cpp) runs it in the forward whenever a gradient
  // will be needed and saves the gradients; its backward only scales them. Not
  // differentiable itself.
  m.def("kron_logdet_and_grad(Tensor A, Tensor G, float scale, float tau, str method) -> (Tensor, Tensor, Tensor)");
  // The same log-determinant straight from a layer's rows a, g (the LLAMA hot path).
  m.def("kfac_logdet(Tensor a, Tensor g, float scale, float tau, str method, bool bias) -> Tensor");
  m.def(
      "kfac_logdet_and_grad(Tensor a, Tensor g, float scale, float tau, str method, bool bias) -> (Tensor, Tensor, "
      "Tensor)");
}
