// The CUDA launch of a fused task (csrc/cuda/launch.h): a block of fused::block_threads
// threads per task, the per-task math of csrc/kfac_math.h run cooperatively by the block.
// Memory, as fused::layout and fused::task_buffers lay it out (the emulator of
// csrc/testing/emulator.h reproduces it): in dynamic shared memory the block sum's scratch
// and, where they fit under the device's opt-in per-block limit, the task's matrices
// (opted in above the default 48 KiB); in one global workspace, per task, its rows (and the
// matrices otherwise). No host synchronisation: the workspace comes from the caching
// allocator, and the launch is checked with C10_CUDA_KERNEL_LAUNCH_CHECK.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "cuda/launch.h"

namespace fastlaplace {

// csrc/block.h's interface on a CUDA block. __host__ __device__ so that the __host__
// __device__ math may call it; only the device side ever runs.
struct CudaBlock {
  static constexpr bool kSerial = false;
  double* scratch;
#ifdef __CUDA_ARCH__
  __device__ int64_t tid() const { return threadIdx.x; }
  __device__ int64_t size() const { return blockDim.x; }
  __device__ void sync() const { __syncthreads(); }
#else
  __host__ int64_t tid() const { return 0; }
  __host__ int64_t size() const { return 1; }
  __host__ void sync() const {}
#endif
  FL_HD double sum(double v) const { return block::cooperative_sum(*this, scratch, v); }
  template <class T>
  FL_HD T* view(T* p, int64_t) const {
    return p;
  }
};

template <class Task>
__global__ void fused_tasks(Task task, bool in_shared, int64_t matrices, int64_t global_per_task, double* workspace) {
  extern __shared__ double shared[];
  const auto buf = fused::task_buffers(in_shared, blockDim.x, matrices, global_per_task, shared, workspace, blockIdx.x);
  task(CudaBlock{buf.scratch}, blockIdx.x, buf.mats, buf.rows);
}

template <class Task>
void CudaLauncher::operator()(const fused::Plan& plan, const Task& task) const {
  const c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK_VALUE(plan.tasks <= INT_MAX, "fastlaplace: at most ", INT_MAX, " tasks per call, got ", plan.tasks);
  const int64_t threads = fused::block_threads(plan.order);
  const auto limit = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
  const fused::Layout L = fused::layout(plan, threads, limit);
  const auto shared_bytes = static_cast<size_t>(L.shared) * sizeof(double);
  auto kernel = fused_tasks<Task>;
  if (shared_bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
  // Freed at the end of this call; the caching allocator keeps it until the stream is past it.
  auto workspace = at::empty({plan.tasks * L.global + 1}, at::TensorOptions().dtype(at::kDouble).device(device));
  kernel<<<static_cast<unsigned>(plan.tasks), static_cast<unsigned>(threads), shared_bytes,
           at::cuda::getCurrentCUDAStream()>>>(task, L.in_shared, plan.matrices, L.global,
                                               workspace.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastlaplace
