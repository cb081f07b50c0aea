// CUDA registrations: the primitive kernels are CUDA's own; the log-det ops are the
// device-generic composites, which call those primitives (and cuSOLVER's eigh) on the
// current stream.
#include <torch/library.h>

#include "composite.h"
#include "cuda/kernels.h"

namespace fastlaplace {
TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_factors", &kron_factors_cuda);
  m.impl("damped_cholesky", &damped_cholesky_cuda);
  m.impl("kron_logdet", &kron_logdet_composite);
  m.impl("kron_logdet_and_grad", &kron_logdet_and_grad_composite);
  m.impl("kfac_logdet", &kfac_logdet_composite);
  m.impl("kfac_logdet_and_grad", &kfac_logdet_and_grad_composite);
}
}  // namespace fastlaplace
