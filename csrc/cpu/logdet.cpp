// CPU kernels of kron_logdet, kfac_logdet and their _and_grad variants: the fused path of
// csrc/fused.h (a serial block per task, tasks split over threads, from rows to log-det in
// double precision with no intermediate tensors) for layers whose matrices have order
// ≤ 64; the composite path (BLAS and LAPACK, csrc/composite.cpp) above.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "fused.h"

namespace fastlaplace {
namespace {

// Runs a task over the batch with a serial block, one workspace per thread.
struct CpuLauncher {
  explicit CpuLauncher(const at::Tensor&) {}

  static fused::Thresholds thresholds() { return fused::kCpuThresholds; }

  template <class Task>
  void operator()(const fused::Plan& plan, const Task& task) const {
    at::parallel_for(0, plan.tasks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<double> buffer(plan.matrices + plan.rows);
      for (int64_t b = b0; b < b1; ++b) task(block::Serial{}, b, buffer.data(), buffer.data() + plan.matrices);
    });
  }
};

using CpuOps = fused::Ops<CpuLauncher>;

}  // namespace

TORCH_LIBRARY_IMPL(fastlaplace, CPU, m) {
  m.impl("kron_logdet", &CpuOps::kron_logdet);
  m.impl("kron_logdet_and_grad", &CpuOps::kron_logdet_and_grad);
  m.impl("kfac_logdet", &CpuOps::kfac_logdet);
  m.impl("kfac_logdet_and_grad", &CpuOps::kfac_logdet_and_grad);
}

}  // namespace fastlaplace
