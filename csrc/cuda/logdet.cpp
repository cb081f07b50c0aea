// CUDA kernels of kron_logdet, kfac_logdet and their _and_grad variants: the fused path of
// csrc/fused.h, one launch for the whole batch (csrc/cuda/launch.h), below the GPU's
// thresholds; the composite path (csrc/composite.cpp) above them.
#include <torch/library.h>

#include "cuda/launch.h"

namespace fastlaplace {

using CudaOps = fused::Ops<CudaLauncher>;

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_logdet", &CudaOps::kron_logdet);
  m.impl("kron_logdet_and_grad", &CudaOps::kron_logdet_and_grad);
  m.impl("kfac_logdet", &CudaOps::kfac_logdet);
  m.impl("kfac_logdet_and_grad", &CudaOps::kfac_logdet_and_grad);
}

}  // namespace fastlaplace
