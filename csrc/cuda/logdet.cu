// CUDA kernels of kron_logdet, kfac_logdet and their _and_grad variants: the fused path of
// csrc/fused.h in one launch for the whole batch, a thread per task running the same
// per-task math as the CPU (csrc/kfac_math.h) on a double workspace in global memory;
// the composite path (csrc/composite.cpp) for larger layers.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fused.h"

namespace fastlaplace {
namespace {

template <class Task>
__global__ void each_task(int64_t B, int64_t workspace, double* buffer, Task task) {
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b < B) task(b, buffer + b * workspace);
}

struct CudaLauncher {
  at::Device device;
  explicit CudaLauncher(const at::Tensor& t) : device(t.device()) {}

  template <class Task>
  void operator()(int64_t B, int64_t workspace, const Task& task) const {
    const c10::cuda::CUDAGuard guard(device);
    // Freed at the end of this call; the caching allocator keeps it until the stream is past it.
    auto buffer = at::empty({B * workspace}, at::TensorOptions().dtype(at::kDouble).device(device));
    constexpr int kThreads = 32;
    const auto blocks = static_cast<unsigned>((B + kThreads - 1) / kThreads);
    each_task<<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(B, workspace, buffer.data_ptr<double>(), task);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

using CudaOps = fused::Ops<CudaLauncher>;

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, CUDA, m) {
  m.impl("kron_logdet", &CudaOps::kron_logdet);
  m.impl("kron_logdet_and_grad", &CudaOps::kron_logdet_and_grad);
  m.impl("kfac_logdet", &CudaOps::kfac_logdet);
  m.impl("kfac_logdet_and_grad", &CudaOps::kfac_logdet_and_grad);
}

}  // namespace fastlaplace
