// An emulator of the CUDA launch of the fused ops (csrc/cuda/launch.cuh), on the CPU, for
// tests: it runs the device code of csrc/kfac_math.h over the same grid (a block per task,
// the launcher's block shape and memory layout, fused::layout and fused::task_buffers), each
// thread a fiber that runs until its next barrier, the threads of a block in turn, phase by
// phase. Shared memory and the global workspace start filled with NaN, as uninitialised
// memory might be. Every access goes through a checked pointer that records, per phase,
// which thread wrote and read each element: two threads writing one element in a phase, or
// one reading what another writes in it, is a data race; an index outside its buffer (the
// workspace of the block's own task, its shared memory, or a tensor's span) is an error;
// so is a block whose threads do not all reach the same barriers. The first error fails
// the launch with a message naming the block, phase, buffer, index and threads.
// It also counts what a GPU model needs: phases, memory references, and the critical path
// (per phase, the references of the busiest thread).
#pragma once
#include <c10/util/Exception.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "fused.h"

namespace fastlaplace::emulator {

struct Shadow {
  uint64_t phase = 0;
  int32_t writer = -1, reader = -1;  // thread ids; reader -2: several threads
};

struct Region {
  std::string name;
  int64_t size;
  bool shared;
  std::vector<Shadow> shadow;
  Region(std::string n, int64_t s, bool sh) : name(std::move(n)), size(s), shared(sh), shadow(s > 0 ? s : 0) {}
};

struct Counts {
  int64_t launches = 0, blocks = 0, phases = 0, shared_refs = 0, global_refs = 0, critical_refs = 0;
};

class Grid;

template <class T>
struct Ref {
  T* base;
  int64_t i;
  Region* region;
  Grid* grid;
  operator double() const;
  Ref& operator=(double v);
  Ref& operator=(const Ref& o) { return *this = static_cast<double>(o); }
  Ref& operator+=(double v) { return *this = static_cast<double>(*this) + v; }
  Ref& operator-=(double v) { return *this = static_cast<double>(*this) - v; }
  Ref& operator*=(double v) { return *this = static_cast<double>(*this) * v; }
};

// A checked pointer: base + off, into region (whose element 0 is at base).
template <class T>
struct Ptr {
  T* base;
  int64_t off;
  Region* region;
  Grid* grid;
  Ptr operator+(int64_t k) const { return {base, off + k, region, grid}; }
  Ref<T> operator[](int64_t i) const { return {base, off + i, region, grid}; }
};

// What to plant in the device code, to show that the checker catches it.
struct Plant {
  int64_t drop_barrier = -1;   // ≥ 0: every thread skips its barrier of this number (a race)
  bool short_buffers = false;  // every tensor view one element short (an out-of-bounds index)
};

class Grid {
 public:
  explicit Grid(Plant plant) : plant_(plant) {}

  // Runs body(t) for t in [0, threads) as one block, phase by phase.
  void run_block(int64_t threads, int64_t block, const std::function<void(int64_t)>& body) {
    constexpr size_t kStack = 256 * 1024;
    body_ = &body;
    block_ = block;
    fibers_.resize(threads);
    for (int64_t t = 0; t < threads; ++t) {
      Fiber& f = fibers_[t];
      f.stack.resize(kStack);
      f.done = false;
      f.barriers = 0;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.data();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &scheduler_;
      const auto self = reinterpret_cast<uintptr_t>(this);
      makecontext(&f.ctx, reinterpret_cast<void (*)()>(&Grid::entry), 2, static_cast<unsigned>(self >> 32),
                  static_cast<unsigned>(self & 0xffffffffu));
    }
    ++counts.blocks;
    for (int64_t phase_in_block = 0;; ++phase_in_block) {
      refs_.assign(threads, 0);
      int64_t waiting = 0, returned = 0;
      for (int64_t t = 0; t < threads; ++t) {
        if (fibers_[t].done) continue;
        current_ = static_cast<int32_t>(t);
        swapcontext(&scheduler_, &fibers_[t].ctx);
        (fibers_[t].done ? returned : waiting) += 1;
      }
      ++counts.phases;
      counts.critical_refs += *std::max_element(refs_.begin(), refs_.end());
      ++phase_;
      phase_in_block_ = phase_in_block + 1;
      if (waiting > 0 && returned > 0)
        fail("divergent barrier: " + std::to_string(returned) + " thread(s) returned while " + std::to_string(waiting) +
             " wait at a barrier");
      if (waiting == 0) break;
    }
  }

  void barrier() {
    Fiber& f = fibers_[current_];
    if (f.barriers++ == plant_.drop_barrier) return;
    swapcontext(&f.ctx, &scheduler_);
  }

  // False (and an error) when i is outside the region.
  bool access(Region* r, int64_t i, bool write) {
    ++refs_[current_];
    ++(r->shared ? counts.shared_refs : counts.global_refs);
    const char* what = write ? "writes" : "reads";
    if (i < 0 || i >= r->size) {
      fail("out of bounds: thread " + std::to_string(current_) + " " + what + " " + r->name + "[" + std::to_string(i) +
           "], outside its " + std::to_string(r->size) + " elements");
      return false;
    }
    Shadow& s = r->shadow[i];
    if (s.phase != phase_) s = Shadow{phase_, -1, -1};
    const int32_t t = current_;
    const std::string where = r->name + "[" + std::to_string(i) + "]";
    if (s.writer >= 0 && s.writer != t)
      fail("data race: thread " + std::to_string(t) + " " + what + " " + where + ", which thread " +
           std::to_string(s.writer) + " writes in the same phase");
    else if (write && (s.reader == -2 || (s.reader >= 0 && s.reader != t)))
      fail("data race: thread " + std::to_string(t) + " writes " + where + ", which " +
           (s.reader == -2 ? std::string("other threads read") : "thread " + std::to_string(s.reader) + " reads") +
           " in the same phase");
    if (write)
      s.writer = t;
    else
      s.reader = (s.reader == -1 || s.reader == t) ? t : -2;
    return true;
  }

  // The region of a tensor's data (one per pointer and launch).
  Region* global(const void* p, int64_t n) {
    auto& r = globals_[p];
    if (!r) {
      if (plant_.short_buffers && n > 0) --n;
      r = std::make_unique<Region>("tensor " + std::to_string(globals_.size()), n, false);
    }
    return r.get();
  }

  const std::string& error() const { return error_; }
  Counts counts;

 private:
  struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done;
    int64_t barriers;
  };

  static void entry(unsigned hi, unsigned lo) {
    auto* grid = reinterpret_cast<Grid*>((static_cast<uintptr_t>(hi) << 32) | lo);
    const int32_t t = grid->current_;
    (*grid->body_)(t);
    grid->fibers_[t].done = true;  // then back to the scheduler through uc_link
  }

  void fail(const std::string& message) {
    if (error_.empty())
      error_ = "block " + std::to_string(block_) + ", phase " + std::to_string(phase_in_block_) + ": " + message;
  }

  Plant plant_;
  ucontext_t scheduler_;
  std::vector<Fiber> fibers_;
  const std::function<void(int64_t)>* body_ = nullptr;
  int64_t block_ = 0, phase_in_block_ = 0;
  uint64_t phase_ = 1;
  int32_t current_ = 0;
  std::vector<int64_t> refs_;
  std::map<const void*, std::unique_ptr<Region>> globals_;
  std::string error_;
};

template <class T>
Ref<T>::operator double() const {
  return grid->access(region, i, false) ? static_cast<double>(base[i]) : std::nan("");
}

template <class T>
Ref<T>& Ref<T>::operator=(double v) {
  if (grid->access(region, i, true)) base[i] = static_cast<T>(v);
  return *this;
}

// A thread of an emulated block: the block interface of csrc/block.h.
struct Block {
  static constexpr bool kSerial = false;
  Grid* grid;
  int64_t t, threads;
  Ptr<double> scratch;
  int64_t tid() const { return t; }
  int64_t size() const { return threads; }
  void sync() const { grid->barrier(); }
  double sum(double v) const { return block::cooperative_sum(*this, scratch, v); }
  template <class T>
  Ptr<T> view(T* p, int64_t n) const {
    return {p, 0, grid->global(p, n), grid};
  }
};

// The per-block shared memory limit of an H200 (227 KiB, opted in).
constexpr int64_t kSharedLimitBytes = 227 * 1024;

// A fused::Ops launcher: the CUDA launch, emulated. threads 0: the launcher's own choice
// (fused::block_threads); placement "auto" (as the launcher), "shared" or "global".
struct Launcher {
  int64_t threads = 0;
  std::string placement = "auto";
  Plant plant;
  Counts* counts;
  fused::Layout* last_layout;

  fused::Thresholds thresholds() const { return fused::cuda_thresholds(); }

  template <class Task>
  void operator()(const fused::Plan& plan, const Task& task) const {
    const int64_t T = threads > 0 ? threads : fused::block_threads(plan.order);
    const int64_t limit = placement == "shared" ? INT64_MAX : placement == "global" ? 0 : kSharedLimitBytes;
    const fused::Layout L = fused::layout(plan, T, limit);
    *last_layout = L;
    Grid grid(plant);
    std::vector<double> workspace(plan.tasks * L.global, std::nan(""));
    for (int64_t b = 0; b < plan.tasks; ++b) {
      std::vector<double> shared(L.shared, std::nan(""));
      Region shared_region("shared", L.shared, true);
      Region ws_region("workspace of task " + std::to_string(b), L.global, false);
      const Ptr<double> sp{shared.data(), 0, &shared_region, &grid};
      const Ptr<double> gp{workspace.data() + b * L.global, -b * L.global, &ws_region, &grid};
      const auto buf = fused::task_buffers(L.in_shared, T, plan.matrices, L.global, sp, gp, b);
      grid.run_block(T, b, [&](int64_t t) { task(Block{&grid, t, T, buf.scratch}, b, buf.mats, buf.rows); });
      TORCH_CHECK(grid.error().empty(), "fastlaplace emulator: ", grid.error());
    }
    grid.counts.launches = 1;
    counts->launches += 1;
    counts->blocks += grid.counts.blocks;
    counts->phases += grid.counts.phases;
    counts->shared_refs += grid.counts.shared_refs;
    counts->global_refs += grid.counts.global_refs;
    counts->critical_refs += grid.counts.critical_refs;
  }
};

}  // namespace fastlaplace::emulator
