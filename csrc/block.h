// The block interface of the per-task device code (csrc/kfac_math.h): a thread index, a
// thread count, a barrier and a block-wide sum. The same functions run
//   - serially on the CPU (SerialBlock: one "thread", no barrier; the compiler folds the
//     strided loops into plain ones),
//   - on CUDA as one block per task (CudaBlock, csrc/cuda/launch.cuh),
//   - under the emulator of the launch (csrc/testing/emulator.h), which runs every thread of
//     a block in turn between barriers and checks races and bounds.
// A block also says how device code sees a buffer: view(p, n) is p itself, except under the
// emulator, where it is a checked pointer to the n elements at p.
// Rules for device code written against it: every thread reaches every barrier (a branch
// around sync() depends only on values all threads share), and within a phase (between two
// barriers) no thread reads or writes what another thread writes.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__
#else
#define FL_HD
#endif

// for (i = begin + tid; i < end; i += threads): the indices of [begin, end) this thread owns.
#define FL_BLOCK_FOR(blk, i, begin, end) for (int64_t i = (begin) + (blk).tid(); i < (end); i += (blk).size())

namespace fastlaplace::block {

// One thread doing the work of the whole block: the CPU kernels.
struct Serial {
  static constexpr bool kSerial = true;
  FL_HD static constexpr int64_t tid() { return 0; }
  FL_HD static constexpr int64_t size() { return 1; }
  FL_HD static void sync() {}
  FL_HD static double sum(double v) { return v; }
  template <class T>
  FL_HD static T* view(T* p, int64_t) {
    return p;
  }
};

// Doubles of shared scratch a cooperative block's sum() needs (one per thread).
FL_HD inline int64_t reduce_scratch(int64_t threads) { return threads; }

// The block-wide sum of a cooperative block, in terms of its own tid/size/sync and
// `threads` doubles of shared scratch: each thread posts its part, then every thread adds
// all parts in the same order (so all get the same value, bit for bit, without a
// broadcast), and a second barrier keeps the next sum from overwriting parts still read.
template <class Blk, class P>
FL_HD double cooperative_sum(const Blk& blk, P scratch, double v) {
  scratch[blk.tid()] = v;
  blk.sync();
  double s = 0;
  for (int64_t t = 0; t < blk.size(); ++t) s += scratch[t];
  blk.sync();
  return s;
}

}  // namespace fastlaplace::block
