// Test-only ops, in their own namespace torch.ops.fastlaplace_testing (nothing in the
// package calls them): the fused ops run through the emulator of the CUDA launch
// (csrc/testing/emulator.h), and the small-matrix eigensolvers of the fused kernels.
#include <torch/library.h>

#include <string>
#include <tuple>

#include "fused.h"
#include "testing/emulator.h"

namespace fastlaplace {
namespace {

using at::Tensor;

// The launch statistics, as float64: launches, threads, shared bytes per block, global
// doubles per task, matrices in shared memory (1/0), and per task: phases, shared and global
// references, references on the critical path.
Tensor stats(const emulator::Counts& c, const fused::Layout& L) {
  const double blocks = c.blocks > 0 ? static_cast<double>(c.blocks) : 1.0;
  return at::tensor(
      {static_cast<double>(c.launches), static_cast<double>(L.threads), static_cast<double>(L.shared * sizeof(double)),
       static_cast<double>(L.global), L.in_shared ? 1.0 : 0.0, c.phases / blocks, c.shared_refs / blocks,
       c.global_refs / blocks, c.critical_refs / blocks},
      at::kDouble);
}

emulator::Plant parse_plant(const std::string& plant) {
  emulator::Plant p;
  if (plant == "bounds")
    p.short_buffers = true;
  else if (plant.rfind("race:", 0) == 0)
    p.drop_barrier = std::stoll(plant.substr(5));
  else
    TORCH_CHECK_VALUE(plant == "none", "plant must be 'none', 'bounds' or 'race:K', got '", plant, "'");
  return p;
}

Tensor or_empty(const Tensor& t, const Tensor& like) { return t.defined() ? t : at::empty({0}, like.options()); }

template <class Op>
std::tuple<Tensor, Tensor, Tensor, Tensor> emulate(int64_t threads, const std::string& placement,
                                                   const std::string& plant, const Tensor& like, const Op& op) {
  TORCH_CHECK_VALUE(placement == "auto" || placement == "shared" || placement == "global",
                    "placement must be 'auto', 'shared' or 'global', got '", placement, "'");
  emulator::Counts counts;
  fused::Layout layout{0, false, 0, 0};
  const emulator::Launcher launch{threads, placement, parse_plant(plant), &counts, &layout};
  auto [value, ga, gg] = op(launch);
  return {value, or_empty(ga, like), or_empty(gg, like), stats(counts, layout)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> emulate_kfac(const Tensor& a, const Tensor& g, double scale, double tau,
                                                        const std::string& method, bool bias, bool grads,
                                                        int64_t threads, const std::string& placement,
                                                        const std::string& plant) {
  return emulate(threads, placement, plant, a, [&](const emulator::Launcher& launch) {
    return fused::kfac_op(launch, a, g, scale, tau, method, bias, grads);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> emulate_kron(const Tensor& A, const Tensor& G, double scale, double tau,
                                                        const std::string& method, bool grads, int64_t threads,
                                                        const std::string& placement, const std::string& plant) {
  return emulate(threads, placement, plant, A, [&](const emulator::Launcher& launch) {
    return fused::kron_op(launch, A, G, scale, tau, method, grads);
  });
}

// Eigenvalues and eigenvectors (columns) of one symmetric K [n, n] (float64) by the fused
// kernels' solver: the CPU's (threads = 0) or a block of `threads` (Jacobi, emulated).
std::tuple<Tensor, Tensor> dense_eigh(const Tensor& K, int64_t threads) {
  TORCH_CHECK_VALUE(K.dim() == 2 && K.size(0) == K.size(1) && K.scalar_type() == at::kDouble,
                    "K must be a square float64 matrix");
  const int64_t n = K.size(0);
  auto V = K.contiguous().clone();
  auto w = at::empty({n}, K.options());
  std::vector<double> scratch(n * n + n + 1 + n);
  bool ok = true;
  if (threads == 0) {
    ok = math::eigh(block::Serial{}, V.data_ptr<double>(), n, w.data_ptr<double>(), true, scratch.data(),
                    scratch.data());
  } else {
    emulator::Grid grid(emulator::Plant{});
    std::vector<double> shared(threads, std::nan(""));
    emulator::Region sr("shared", threads, true), vr("V", n * n, false), wr("w", n, false),
        xr("scratch", n * n + n + 1, false);
    const emulator::Ptr<double> sp{shared.data(), 0, &sr, &grid}, vp{V.data_ptr<double>(), 0, &vr, &grid},
        wp{w.data_ptr<double>(), 0, &wr, &grid}, xp{scratch.data(), 0, &xr, &grid};
    grid.run_block(threads, 0, [&](int64_t t) {
      const bool r = math::eigh(emulator::Block{&grid, t, threads, sp}, vp, n, wp, true, xp, xp);
      if (t == 0) ok = r;
    });
    TORCH_CHECK(grid.error().empty(), "fastlaplace emulator: ", grid.error());
  }
  TORCH_CHECK(ok, "the eigensolver did not converge");
  return {w, V};
}

}  // namespace

TORCH_LIBRARY(fastlaplace_testing, m) {
  m.def(
      "emulate_kfac(Tensor a, Tensor g, float scale, float tau, str method, bool bias, bool grads, int threads, "
      "str placement, str plant) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "emulate_kron(Tensor A, Tensor G, float scale, float tau, str method, bool grads, int threads, str placement, "
      "str plant) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("dense_eigh(Tensor K, int threads) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlaplace_testing, CPU, m) {
  m.impl("emulate_kfac", &emulate_kfac);
  m.impl("emulate_kron", &emulate_kron);
  m.impl("dense_eigh", &dense_eigh);
}

}  // namespace fastlaplace
