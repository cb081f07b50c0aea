// The per-task math of the fused log-det kernels, written once for the CPU and the GPU
// against the block interface of csrc/block.h: every function takes the block (thread
// index, thread count, barrier, sum) first and works on caller-provided double buffers (no
// allocation, no std:: containers). The CPU kernels run it with a serial block, a task per
// CPU thread (csrc/cpu/logdet.cpp); CUDA runs it as one block per task, the task's matrices
// in shared memory (csrc/cuda/launch.cuh); the emulator of that launch runs it on the CPU
// under the GPU's thread mapping and checks races and bounds (csrc/testing/emulator.h).
// Buffers are of a pointer type P (double* except under the emulator); row-major n×n.
// Every block function ends with a barrier (or a sum), so its results are visible to all
// threads when it returns, and every value it returns is the same on all threads.
// The same formulas in PyTorch, for the reference the tests compare against and for the
// posterior: fastlaplace/kfac_math.py; the composite path (orders above 64) takes the
// scalar formulas it shares with this file from formulas.h.
#pragma once
#include <math.h>

#include <cstdint>

#include "block.h"
#include "formulas.h"

namespace fastlaplace::math {

FL_HD inline int64_t maxi(int64_t x, int64_t y) { return x > y ? x : y; }
FL_HD inline int64_t mini(int64_t x, int64_t y) { return x < y ? x : y; }

// Four independent partial sums: without -ffast-math the compiler may not reorder a
// floating-point reduction, and one accumulator would serialise on the add latency.
template <class P>
FL_HD double dot(P x, P y, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t k = 0;
  for (; k + 4 <= n; k += 4) {
    s0 += x[k] * y[k];
    s1 += x[k + 1] * y[k + 1];
    s2 += x[k + 2] * y[k + 2];
    s3 += x[k + 3] * y[k + 3];
  }
  for (; k < n; ++k) s0 += x[k] * y[k];
  return (s0 + s1) + (s2 + s3);
}

template <class P>
FL_HD double trace(P K, int64_t n) {  // read by every thread: n ≤ 64 loads beat a barrier
  double t = 0;
  for (int64_t i = 0; i < n; ++i) t += K[i * n + i];
  return t;
}

template <class Blk, class P>
FL_HD void copy(const Blk& blk, P src, int64_t size, P dst) {
  FL_BLOCK_FOR(blk, i, 0, size) dst[i] = src[i];
  blk.sync();
}

// ---------------------------------------------------------------------------------------
// Dense building blocks. A thread owns rows (or columns) of the output; inner loops run
// along contiguous rows, as the serial CPU code wants.

// K = x̄ᵀx̄ / R (D×D, full) from the rows x̄ (R×D, row-major): thread i builds row i's lower
// part as R multiply-adds along the row, and mirrors it into column i.
template <class Blk, class P>
FL_HD void syrk_rows(const Blk& blk, P rows, int64_t R, int64_t D, P K) {
  const double inv = 1.0 / R;
  FL_BLOCK_FOR(blk, i, 0, D) {
    P Ki = K + i * D;
    for (int64_t j = 0; j <= i; ++j) Ki[j] = 0;
    for (int64_t r = 0; r < R; ++r) {
      P x = rows + r * D;
      const double xi = x[i];
      for (int64_t j = 0; j <= i; ++j) Ki[j] += xi * x[j];
    }
    for (int64_t j = 0; j <= i; ++j) K[j * D + i] = Ki[j] = Ki[j] * inv;
  }
  blk.sync();
}

// The Gram matrix x̄x̄ᵀ / R (R×R) of the rows x̄ (R×D).
template <class Blk, class P>
FL_HD void gram_rows(const Blk& blk, P rows, int64_t R, int64_t D, P K) {
  FL_BLOCK_FOR(blk, i, 0, R)
  for (int64_t j = 0; j <= i; ++j) K[i * R + j] = K[j * R + i] = dot(rows + i * D, rows + j * D, D) / R;
  blk.sync();
}

// In place: S (n×n, symmetric; only the upper triangle is read) becomes U, upper
// triangular with UᵀU = S + damping·I (so L = Uᵀ), lower triangle zeroed. Right-looking,
// a column per phase: every thread reads the pivot, the owner of each row below updates
// it from the unscaled pivot row (which nobody writes in that phase); the rows are scaled
// at the end. status: 0, or j ≥ 1 when the leading minor of order j is not positive
// definite (or not finite); logdet: log det(S + damping·I).
struct Factor {
  int64_t status;
  double logdet;
};

template <class Blk, class P>
FL_HD Factor cholesky_upper(const Blk& blk, P S, int64_t n, double damping) {
  for (int64_t j = 0; j < n; ++j) {
    P Sj = S + j * n;
    const double djj = Sj[j] + damping;
    if (!(djj > 0) || !finite(djj)) {
      blk.sync();
      return {j + 1, 0.0};
    }
    const double inv = 1 / djj;
    FL_BLOCK_FOR(blk, i, j + 1, n) {
      const double coef = Sj[i] * inv;
      P Si = S + i * n;
      for (int64_t k = i; k < n; ++k) Si[k] -= coef * Sj[k];
    }
    blk.sync();
  }
  double ld = 0;
  FL_BLOCK_FOR(blk, j, 0, n) {
    P Sj = S + j * n;
    const double djj = Sj[j] + damping;
    const double u = sqrt(djj), inv = 1 / u;
    ld += log(djj);
    for (int64_t k = 0; k < j; ++k) Sj[k] = 0;
    Sj[j] = u;
    for (int64_t k = j + 1; k < n; ++k) Sj[k] *= inv;
  }
  return {0, blk.sum(ld)};
}

// out = (UᵀU)⁻¹ = L⁻ᵀL⁻¹ with L = Uᵀ. Thread m solves L y = e_m by forward substitution in
// axpy form (column k of L is row k of U) into row m of X (so X = L⁻ᵀ, row-major), then
// out_ij = Σ_{k ≥ max(i,j)} X_ik X_jk, a dot product of two contiguous rows.
template <class Blk, class P>
FL_HD void inverse_from_upper(const Blk& blk, P U, int64_t n, P out, P X) {
  P inv = out;  // 1/U_kk, until out is written: a multiply, not a divide, per step
  FL_BLOCK_FOR(blk, k, 0, n) inv[k] = 1 / U[k * n + k];
  blk.sync();
  FL_BLOCK_FOR(blk, m, 0, n) {
    P y = X + m * n;
    for (int64_t k = 0; k < n; ++k) y[k] = 0;
    y[m] = 1;
    for (int64_t k = m; k < n; ++k) {
      P Uk = U + k * n;
      const double yk = y[k] * inv[k];
      y[k] = yk;
      for (int64_t i = k + 1; i < n; ++i) y[i] -= Uk[i] * yk;
    }
  }
  blk.sync();
  FL_BLOCK_FOR(blk, i, 0, n)
  for (int64_t j = 0; j <= i; ++j) out[i * n + j] = out[j * n + i] = dot(X + i * n + i, X + j * n + i, n - i);
  blk.sync();
}

// Symmetric eigendecomposition, serial (the CPU): Householder reduction to tridiagonal form, then the
// implicit QL method (EISPACK's tred2 and tql2, as in the public-domain JAMA library).
// V holds the symmetric matrix on entry (n×n, row-major) and its eigenvectors as columns
// on exit (meaningful only when vectors is true); w receives the eigenvalues, unsorted;
// e is n doubles of scratch. Returns false if the input is not finite or QL did not
// converge; w is then NaN.
//
// Two safeguards beyond JAMA: the matrix is scaled to a largest entry of 1 (eigenvalues
// scaled back at the end), and a row whose off-diagonal part is below ε² of that is taken
// as exactly zero. Without them, a matrix of low rank (a constant one, say) reduced its
// numerically-zero remainder down to denormal numbers, and the Householder vectors built
// from those were no longer orthogonal (eigenvectors off by O(1) from order 56 on).
FL_HD inline bool ql_eigh(double* V, int64_t n, double* w, bool vectors, double* e) {
  if (n == 0) return true;
  double anorm = 0;
  for (int64_t i = 0; i < n * n; ++i) anorm = finite(V[i]) ? maxd(anorm, fabs(V[i])) : V[i];
  if (!finite(anorm)) {
    for (int64_t k = 0; k < n; ++k) w[k] = kNaN;
    return false;
  }
  if (anorm > 0)
    for (int64_t i = 0; i < n * n; ++i) V[i] /= anorm;
  double* d = w;
  for (int64_t k = 0; k < n; ++k) e[k] = 0;
  auto at = [V, n](int64_t i, int64_t j) -> double& { return V[i * n + j]; };
  for (int64_t j = 0; j < n; ++j) d[j] = at(n - 1, j);
  for (int64_t i = n - 1; i > 0; --i) {  // tred2
    double scale = 0, h = 0;
    for (int64_t k = 0; k < i; ++k) scale += fabs(d[k]);
    if (scale <= kEps * kEps) {
      e[i] = d[i - 1];
      for (int64_t j = 0; j < i; ++j) {
        d[j] = at(i - 1, j);
        at(i, j) = 0;
        at(j, i) = 0;
      }
    } else {
      for (int64_t k = 0; k < i; ++k) {
        d[k] /= scale;
        h += d[k] * d[k];
      }
      double f = d[i - 1];
      double g = sqrt(h);
      if (f > 0) g = -g;
      e[i] = scale * g;
      h -= f * g;
      d[i - 1] = f - g;
      for (int64_t j = 0; j < i; ++j) e[j] = 0;
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        at(j, i) = f;
        g = e[j] + at(j, j) * f;
        for (int64_t k = j + 1; k <= i - 1; ++k) {
          g += at(k, j) * d[k];
          e[k] += at(k, j) * f;
        }
        e[j] = g;
      }
      f = 0;
      for (int64_t j = 0; j < i; ++j) {
        e[j] /= h;
        f += e[j] * d[j];
      }
      const double hh = f / (h + h);
      for (int64_t j = 0; j < i; ++j) e[j] -= hh * d[j];
      for (int64_t j = 0; j < i; ++j) {
        f = d[j];
        g = e[j];
        for (int64_t k = j; k <= i - 1; ++k) at(k, j) -= (f * e[k] + g * d[k]);
        d[j] = at(i - 1, j);
        at(i, j) = 0;
      }
    }
    d[i] = h;
  }
  for (int64_t i = 0; i < n - 1; ++i) {  // accumulate the transformations
    at(n - 1, i) = at(i, i);
    at(i, i) = 1;
    const double h = d[i + 1];
    if (h != 0) {
      for (int64_t k = 0; k <= i; ++k) d[k] = at(k, i + 1) / h;
      for (int64_t j = 0; j <= i; ++j) {
        double g = 0;
        for (int64_t k = 0; k <= i; ++k) g += at(k, i + 1) * at(k, j);
        for (int64_t k = 0; k <= i; ++k) at(k, j) -= g * d[k];
      }
    }
    for (int64_t k = 0; k <= i; ++k) at(k, i + 1) = 0;
  }
  for (int64_t j = 0; j < n; ++j) {
    d[j] = at(n - 1, j);
    at(n - 1, j) = 0;
  }
  at(n - 1, n - 1) = 1;
  e[0] = 0;

  for (int64_t i = 1; i < n; ++i) e[i - 1] = e[i];  // tql2
  e[n - 1] = 0;
  double f = 0, tst1 = 0;
  for (int64_t l = 0; l < n; ++l) {
    tst1 = maxd(tst1, fabs(d[l]) + fabs(e[l]));
    int64_t m = l;
    while (m < n - 1 && !(fabs(e[m]) <= kEps * tst1)) ++m;
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > 60) {
          for (int64_t k = 0; k < n; ++k) d[k] = kNaN;
          return false;
        }
        double g = d[l];
        double p = (d[l + 1] - g) / (2 * e[l]);
        double r = hypot(p, 1.0);
        if (p < 0) r = -r;
        d[l] = e[l] / (p + r);
        d[l + 1] = e[l] * (p + r);
        const double dl1 = d[l + 1];
        double h = g - d[l];
        for (int64_t i = l + 2; i < n; ++i) d[i] -= h;
        f += h;
        p = d[m];
        double c = 1, c2 = 1, c3 = 1, s = 0, s2 = 0;
        const double el1 = e[l + 1];
        for (int64_t i = m - 1; i >= l; --i) {
          c3 = c2;
          c2 = c;
          s2 = s;
          g = c * e[i];
          h = c * p;
          r = hypot(p, e[i]);
          e[i + 1] = s * r;
          s = e[i] / r;
          c = p / r;
          p = c * d[i] - s * g;
          d[i + 1] = h + s * (c * g + s * d[i]);
          if (vectors)
            for (int64_t k = 0; k < n; ++k) {
              h = at(k, i + 1);
              at(k, i + 1) = s * at(k, i) + c * h;
              at(k, i) = c * at(k, i) - s * h;
            }
        }
        p = -s * s2 * c3 * el1 * e[l] / dl1;
        e[l] = s * p;
        d[l] = c * p;
      } while (fabs(e[l]) > kEps * tst1);
    }
    d[l] += f;
    e[l] = 0;
  }
  if (anorm > 0)
    for (int64_t k = 0; k < n; ++k) d[k] *= anorm;
  return true;
}

// Symmetric eigendecomposition, cooperative (a GPU block): cyclic Jacobi with the
// round-robin ordering, n/2 disjoint rotations per round (pairs of a tournament of m = n
// rounded up to even players; the pairs of a padding player are skipped), a round in three
// phases: the rotations from the current pivots, then the rows, then the columns (and the
// eigenvectors). After each sweep (m − 1 rounds) the off-diagonal mass is summed on the
// device, and the sweeps stop at its rounding floor. The matrix is scaled by its entry sum
// first (no overflow of the squares; eigenvalues scaled back). Same contract as ql_eigh;
// scratch: n² + m doubles (the rotating matrix, then c and s per pair).
constexpr int64_t kJacobiMaxSweeps = 40;

FL_HD inline void round_robin(int64_t round, int64_t k, int64_t m, int64_t* p, int64_t* q) {
  const int64_t M = m - 1;
  const int64_t a = k == 0 ? 0 : 1 + (round + k) % M, b = k == 0 ? 1 + round : 1 + (round - k + M) % M;
  *p = a < b ? a : b;
  *q = a < b ? b : a;
}

// (M_p, M_q) ← (c·M_p − s·M_q, s·M_p + c·M_q): a plane rotation of two entries.
template <class P>
FL_HD void rotate(P M, int64_t ip, int64_t iq, double c, double s) {
  const double xp = M[ip], xq = M[iq];
  M[ip] = c * xp - s * xq;
  M[iq] = s * xp + c * xq;
}

template <class Blk, class P>
FL_HD bool jacobi_eigh(const Blk& blk, P V, int64_t n, P w, bool vectors, P scratch) {
  const int64_t m = n + (n & 1), pairs = m / 2;
  P A = scratch;
  P cs = scratch + n * n;  // c of pair k at k, s at pairs + k
  double part = 0;
  FL_BLOCK_FOR(blk, i, 0, n * n) part += fabs(static_cast<double>(V[i]));
  const double scale = blk.sum(part);
  if (!finite(scale)) {
    FL_BLOCK_FOR(blk, i, 0, n) w[i] = kNaN;
    blk.sync();
    return false;
  }
  const double inv = scale > 0 ? 1 / scale : 1.0;
  part = 0;
  FL_BLOCK_FOR(blk, i, 0, n * n) {
    const double a = V[i] * inv;
    A[i] = a;
    part += a * a;
    V[i] = i % (n + 1) == 0 ? 1.0 : 0.0;
  }
  const double fro2 = blk.sum(part);
  // Converged: the off-diagonal mass below its rounding floor (entries of ~ε·‖K‖ each), or
  // no longer falling once small (at that floor).
  const double floor = (4 * n * kEps) * (4 * n * kEps) * fro2, small = 1e-20 * fro2;
  bool converged = false;
  double last = kInf;
  for (int64_t sweep = 0; sweep < kJacobiMaxSweeps && !converged; ++sweep) {
    part = 0;
    FL_BLOCK_FOR(blk, i, 0, n) for (int64_t j = 0; j < n; ++j) if (j != i) part += A[i * n + j] * A[i * n + j];
    const double off = blk.sum(part);
    converged = off <= floor || (off <= small && off > 0.25 * last);
    last = off;
    for (int64_t round = 0; round < m - 1 && !converged; ++round) {
      FL_BLOCK_FOR(blk, k, 0, pairs) {
        int64_t p, q;
        round_robin(round, k, m, &p, &q);
        double c = 1, s = 0;
        const double apq = q < n ? static_cast<double>(A[p * n + q]) : 0.0;
        if (apq != 0) {
          const double theta = (A[q * n + q] - A[p * n + p]) / (2 * apq);
          const double t = (theta >= 0 ? 1 : -1) / (fabs(theta) + sqrt(theta * theta + 1));
          c = 1 / sqrt(t * t + 1);
          s = t * c;
        }
        cs[k] = c;
        cs[pairs + k] = s;
      }
      blk.sync();
      FL_BLOCK_FOR(blk, x, 0, pairs * n) {  // rows p and q: A ← JᵀA
        const int64_t k = x / n, j = x % n;
        int64_t p, q;
        round_robin(round, k, m, &p, &q);
        if (q < n) rotate(A, p * n + j, q * n + j, cs[k], cs[pairs + k]);
      }
      blk.sync();
      FL_BLOCK_FOR(blk, x, 0, pairs * n) {  // columns p and q: A ← AJ, V ← VJ
        const int64_t k = x % pairs, i = x / pairs;
        int64_t p, q;
        round_robin(round, k, m, &p, &q);
        if (q >= n) continue;
        const double c = cs[k], s = cs[pairs + k];
        rotate(A, i * n + p, i * n + q, c, s);
        if (vectors) rotate(V, i * n + p, i * n + q, c, s);
      }
      blk.sync();
    }
  }
  FL_BLOCK_FOR(blk, i, 0, n) w[i] = converged ? A[i * n + i] * scale : kNaN;
  blk.sync();
  return converged;
}

// Eigenvalues w (unsorted) and, with vectors, eigenvectors (the columns of V, which holds
// the symmetric matrix on entry). e: n doubles (serial); scratch: n² + n + 1 (cooperative).
template <class Blk, class P>
FL_HD bool eigh(const Blk& blk, P V, int64_t n, P w, bool vectors, P e, P scratch) {
  if constexpr (Blk::kSerial)
    return ql_eigh(V, n, w, vectors, e);  // fewer operations; measured faster on the CPU
  else
    return jacobi_eigh(blk, V, n, w, vectors, scratch);
}

// P = V diag(ψ) Vᵀ (n×n) for eigenvectors V (columns).
template <class Blk, class P>
FL_HD void spectral(const Blk& blk, P V, P psi, int64_t n, P out) {
  FL_BLOCK_FOR(blk, i, 0, n)
  for (int64_t k = 0; k <= i; ++k) {
    double v = 0;
    for (int64_t m = 0; m < n; ++m) v += V[i * n + m] * psi[m] * V[k * n + m];
    out[i * n + k] = out[k * n + i] = v;
  }
  blk.sync();
}

// ---------------------------------------------------------------------------------------
// The guard's error estimates (kRounding, kGuardTolerance: formulas.h).

// Σ_j M_jj / p_j over the pivots p_j = U_jj² of a Cholesky factor of M = scale·K + damping·I:
// pivot j's rounding is about ε·M_jj, so kRounding·ε times this estimates the error of the
// log-det from the factorisation (a pivot that cancelled down from a large diagonal entry).
template <class P>
FL_HD double pivot_ratios(P K, P U, int64_t n, double scale, double damping) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += (scale * K[j * n + j] + damping) / (U[j * n + j] * U[j * n + j]);
  return s;
}

// The rounding of a computed eigenvalue of K (a backward-stable eigensolver): kRounding·ε·‖K‖.
template <class P>
FL_HD double rounding_level(P w, int64_t n) {
  double norm = 0;
  for (int64_t i = 0; i < n; ++i) norm = maxd(norm, fabs(static_cast<double>(w[i])));
  return kRounding * kEps * norm;
}

// ---------------------------------------------------------------------------------------
// The log-det of one task. Each factor is represented by the matrix K (n × n) that carries
// its nonzero spectrum: the factor itself (n = d), or with fewer rows R than columns its
// R×R Gram matrix (docs/design.md §2). With grads, P receives dL/dK for a unit upstream
// gradient. Buffers: see the workspace sizes below.

// Exact: log det(c·A⊗G + τI) = Σ_ij log(c·s_i·b_j + τ) + (zero pairs)·log τ over the
// eigenvalues s_i of the smaller carrier K_s and b_j of the larger K_b. For the value
// alone, or when K_s has few eigenvalues (the sinusoid's first and last layers: 1 or 2),
// Σ_i log det(c·s_i·K_b + τI) — one Cholesky of K_b per s_i — avoids decomposing K_b
// (measured faster at n = 10), and its gradient needs no eigenvectors of K_b:
//   dL/dK_b = Σ_i c·s_i (c·s_i·K_b + τI)⁻¹,  dL/ds_i = c·tr(K_b (c·s_i·K_b + τI)⁻¹).
// With gradients and more eigenvalues, both sides are decomposed (cheaper than an inverse
// per eigenvalue): dL/ds_i = Σ_j c·b_j / (c·s_i·b_j + τ) and likewise.
// In both, dL/dK = V diag(dL/ds) Vᵀ for a decomposed side.
constexpr int64_t kCholeskyPerEigenvalueUpTo = 4;

// An upper bound of dL/ds = Σ_j c·b_j / (c·s·b_j + τ) for the value alone (no K_b spectrum):
// at most c·tr K_b/τ and n_b/s for s > 0; for s ≤ 0 (rounding), c·tr K_b/(τ − c·|s|·tr K_b).
FL_HD inline double psi_bound(double s, double c, double trB, int64_t nb, double tau) {
  if (s > 0) {
    const double a = c * trB / tau, b = nb / s;
    return a < b ? a : b;
  }
  const double denom = tau + c * s * trB;
  return denom > 0 ? c * trB / denom : kInf;
}

// The eigensolvers' scratch is Minv and X (2·n_b² ≥ n² + n + 1 for n ≤ n_b, n_b ≥ 2; +2 for n_b = 1).
FL_HD inline int64_t exact_workspace(int64_t ns, int64_t nb) {
  return 2 * ns + ns * ns + maxi(ns, nb) + 2 * nb + 4 * nb * nb + 2;
}

template <class Blk, class P>
FL_HD double exact_logdet(const Blk& blk, P Ks, int64_t ns, int64_t ds, P Kb, int64_t nb, int64_t db, double c,
                          double tau, bool grads, P Ps, P Pb, P ws) {
  P w = ws;
  P psi = w + ns;
  P V = psi + ns;
  P e = V + ns * ns;
  P wb = e + maxi(ns, nb);
  P psib = wb + nb;
  P S = psib + nb;  // also K_b's eigenvectors
  P Minv = S + nb * nb;
  P X = Minv + nb * nb;
  copy(blk, Ks, ns * ns, V);
  if (!eigh(blk, V, ns, w, grads, e, Minv)) return kNaN;
  // The guard's error estimate: each eigenvalue s_i is known to ±δ_s, which moves the value
  // by δ_s·|dL/ds_i|; each Cholesky adds its pivots' rounding.
  const double deltaS = rounding_level(w, ns);
  const double trB = trace(Kb, nb);
  double err = 0;
  double logdet = zero_pairs_logdet(ds, db, ns, nb, tau);  // pairs with a zero eigenvalue: log τ each
  if (ns <= kCholeskyPerEigenvalueUpTo || !grads) {
    for (int64_t j = 0; j < ns; ++j) {
      const double cs = c * w[j];
      FL_BLOCK_FOR(blk, i, 0, nb * nb) S[i] = cs * Kb[i];
      blk.sync();
      const Factor f = cholesky_upper(blk, S, nb, tau);
      if (f.status != 0) return kNaN;
      logdet += f.logdet;
      err += kRounding * kEps * pivot_ratios(Kb, S, nb, fabs(cs), tau);
      blk.sync();  // the pivots read before S is next written
      if (!grads) {
        err += deltaS * psi_bound(w[j], c, trB, nb, tau);
        continue;
      }
      inverse_from_upper(blk, S, nb, Minv, X);
      double part = 0;
      FL_BLOCK_FOR(blk, i, 0, nb * nb) {
        const double mi = Minv[i];
        Pb[i] = (j == 0 ? 0.0 : static_cast<double>(Pb[i])) + cs * mi;
        part += Kb[i] * mi;  // tr(K M⁻¹) of two symmetric matrices
      }
      const double psi_j = c * blk.sum(part);
      if (blk.tid() == 0) psi[j] = psi_j;
      err += deltaS * fabs(psi_j);
    }
    blk.sync();  // psi[j] and the last pivots read
  } else {
    P Vb = S;
    copy(blk, Kb, nb * nb, Vb);
    if (!eigh(blk, Vb, nb, wb, true, e, Minv)) return kNaN;
    const double deltaB = rounding_level(wb, nb);
    double part = 0, part_err = 0;
    FL_BLOCK_FOR(blk, i, 0, ns) {
      double p = 0;
      for (int64_t j = 0; j < nb; ++j) {
        const double denom = c * w[i] * wb[j] + tau;
        part += log(denom);
        p += c * wb[j] / denom;
      }
      psi[i] = p;
      part_err += deltaS * fabs(p);
    }
    FL_BLOCK_FOR(blk, j, 0, nb) {
      double p = 0;
      for (int64_t i = 0; i < ns; ++i) p += c * w[i] / (c * w[i] * wb[j] + tau);
      psib[j] = p;
      part_err += deltaB * fabs(p);
    }
    logdet += blk.sum(part);
    err += blk.sum(part_err);
    spectral(blk, Vb, psib, nb, Pb);
  }
  if (grads) spectral(blk, V, psi, ns, Ps);
  return guarded(logdet, err, ds * db);
}

// Factored (formulas.h: the dampings and π's share). When K is a Gram matrix (n < d), the
// factor's other d − n eigenvalues are zero: logdet(A + λI) = logdet(K + λI) + (d − n)·log λ,
// and by the push-through identity x̄(A + λI)⁻¹ = (K + λI)⁻¹x̄, so every matrix stays n×n.
// The gradient dL/dK_A = d_G·(K_A + λ_A I)⁻¹ + κ_A I.
FL_HD inline int64_t factored_workspace(int64_t nA, int64_t nG) {
  const int64_t n = maxi(nA, nG);
  return nA * nA + nG * nG + n * n;
}

// M ← s·M + κ·I (n×n), a row per thread.
template <class Blk, class P>
FL_HD void scale_add_diagonal(const Blk& blk, P M, int64_t n, double s, double kappa) {
  FL_BLOCK_FOR(blk, i, 0, n) {
    P Mi = M + i * n;
    for (int64_t j = 0; j < n; ++j) Mi[j] *= s;
    Mi[i] += kappa;
  }
}

template <class Blk, class P>
FL_HD double factored_logdet(const Blk& blk, P KA, int64_t nA, int64_t dA, P KG, int64_t nG, int64_t dG, double c,
                             double tau, bool grads, P PA, P PG, P ws) {
  P UA = ws;
  P UG = UA + nA * nA;
  P X = UG + nG * nG;
  const double trA = trace(KA, nA), trG = trace(KG, nG);
  const Dampings<double> f = factored_dampings(trA, dA, trG, dG, c, tau);
  FL_BLOCK_FOR(blk, i, 0, nA * nA) UA[i] = KA[i];
  copy(blk, KG, nG * nG, UG);
  const Factor fA = cholesky_upper(blk, UA, nA, f.lamA);
  if (fA.status != 0) return kNaN;
  const Factor fG = cholesky_upper(blk, UG, nG, f.lamG);
  if (fG.status != 0) return kNaN;
  const double err =
      kRounding * kEps * (dG * pivot_ratios(KA, UA, nA, 1, f.lamA) + dA * pivot_ratios(KG, UG, nG, 1, f.lamG));
  const double ldA = fA.logdet + (dA - nA) * log(f.lamA), ldG = fG.logdet + (dG - nG) * log(f.lamG);
  const double logdet = guarded(dG * ldA + dA * ldG + static_cast<double>(dA * dG) * log(c), err, dA * dG);
  if (grads && finite(logdet)) {
    inverse_from_upper(blk, UA, nA, PA, X);
    inverse_from_upper(blk, UG, nG, PG, X);
    double pA = 0, pG = 0;
    FL_BLOCK_FOR(blk, i, 0, nA * nA) pA += KA[i] * PA[i];
    FL_BLOCK_FOR(blk, i, 0, nG * nG) pG += KG[i] * PG[i];
    const double tA = blk.sum(pA), tG = blk.sum(pG);
    const PiShare<double> k = pi_share(f, tA, tG, trA, trG, dA, dG);
    scale_add_diagonal(blk, PA, nA, dG, k.kA);
    scale_add_diagonal(blk, PG, nG, dA, k.kG);
    blk.sync();
  }
  return logdet;
}

// Either method, from K_A (n_A, full dimension d_A) and K_G; the exact method puts the
// carrier with fewer eigenvalues first.
FL_HD inline int64_t task_workspace(Method method, int64_t nA, int64_t nG) {
  return method == Method::Exact ? exact_workspace(mini(nA, nG), maxi(nA, nG)) : factored_workspace(nA, nG);
}

template <class Blk, class P>
FL_HD double task_logdet(const Blk& blk, Method method, P KA, int64_t nA, int64_t dA, P KG, int64_t nG, int64_t dG,
                         double c, double tau, bool grads, P PA, P PG, P ws) {
  if (method == Method::Factored) return factored_logdet(blk, KA, nA, dA, KG, nG, dG, c, tau, grads, PA, PG, ws);
  if (nA <= nG) return exact_logdet(blk, KA, nA, dA, KG, nG, dG, c, tau, grads, PA, PG, ws);
  return exact_logdet(blk, KG, nG, dG, KA, nA, dA, c, tau, grads, PG, PA, ws);
}

// ---------------------------------------------------------------------------------------
// A layer's side for one task: rows x (R × d, any strides) with a bias column when asked,
// and the matrix K that carries its spectrum: the factor x̄ᵀx̄/R (D×D) or, with fewer rows
// than columns, the Gram x̄x̄ᵀ/R (R×R).
struct Side {
  int64_t R, d, D, n;
  bool bias, gram;
};

FL_HD inline Side plan_side(int64_t R, int64_t d, bool bias) {
  const int64_t D = d + (bias ? 1 : 0);
  return Side{R, d, D, R < D ? R : D, bias, R < D};
}

// The rows x̄ (R×D, contiguous, double) from x; then K. Threads share each row (coalesced on
// the GPU; a plain loop on the CPU).
template <class Blk, class X, class P>
FL_HD void load_side(const Blk& blk, const Side& s, X x, int64_t sR, int64_t sD, P rows, P K) {
  for (int64_t r = 0; r < s.R; ++r) FL_BLOCK_FOR(blk, i, 0, s.D) {
      rows[r * s.D + i] = i < s.d ? static_cast<double>(x[r * sR + i * sD]) : 1.0;
    }
  blk.sync();
  if (s.gram)
    gram_rows(blk, rows, s.R, s.D, K);
  else
    syrk_rows(blk, rows, s.R, s.D, K);
}

// dL/dx (R × d, contiguous) for dL/dK = P (symmetric): the first d columns of (2/R)·x̄P
// (factor) or (2/R)·P x̄ (Gram), each output row a sum of scaled rows accumulated in acc
// (d doubles); threads share each row (coalesced on the GPU, contiguous axpys on the CPU),
// each owning the same columns of acc and of the row throughout, so no barrier is needed.
template <class Blk, class P, class Y>
FL_HD void side_rows_grad(const Blk& blk, const Side& s, P rows, P Pm, Y out, P acc) {
  const double scale = 2.0 / s.R;
  const int64_t terms = s.gram ? s.R : s.D;
  for (int64_t r = 0; r < s.R; ++r) {
    FL_BLOCK_FOR(blk, k, 0, s.d) acc[k] = 0;
    for (int64_t m = 0; m < terms; ++m) {
      const double coef = s.gram ? Pm[r * s.R + m] : rows[r * s.D + m];
      P src = s.gram ? rows + m * s.D : Pm + m * s.D;
      FL_BLOCK_FOR(blk, k, 0, s.d) acc[k] += coef * src[k];
    }
    FL_BLOCK_FOR(blk, k, 0, s.d) out[r * s.d + k] = scale * acc[k];
  }
}

// kfac_logdet of one task, from the rows a (R × d_in) and g (R × d_out) straight to the
// log-det and, with grads, dL/da and dL/dg (contiguous R × d). Returns NaN (and NaN
// gradients) when a damped matrix is not positive definite or an input is not finite.
// mats: the task's matrices (shared memory on the GPU); rows: its rows (global memory).
FL_HD inline int64_t kfac_task_matrices(const Side& A, const Side& G, Method method) {
  return 2 * (A.n * A.n + G.n * G.n) + task_workspace(method, A.n, G.n);
}
FL_HD inline int64_t kfac_task_rows(const Side& A, const Side& G) { return A.R * A.D + G.R * G.D + 8 + maxi(A.d, G.d); }

template <class Blk, class P, class X, class Y>
FL_HD double kfac_task(const Blk& blk, const Side& A, const Side& G, Method method, double c, double tau, X a,
                       int64_t saR, int64_t saD, X g, int64_t sgR, int64_t sgD, bool grads, Y grad_a, Y grad_g, P mats,
                       P rows) {
  P rowsA = rows;
  P rowsG = rowsA + A.R * A.D;
  P acc = rowsG + G.R * G.D + 8;  // a gap: flush against the rows, side_rows_grad ran 1.3x slower (measured)
  P KA = mats;
  P KG = KA + A.n * A.n;
  P PA = KG + G.n * G.n;
  P PG = PA + A.n * A.n;
  P rest = PG + G.n * G.n;
  load_side(blk, A, a, saR, saD, rowsA, KA);
  load_side(blk, G, g, sgR, sgD, rowsG, KG);
  const double logdet = task_logdet(blk, method, KA, A.n, A.D, KG, G.n, G.D, c, tau, grads, PA, PG, rest);
  if (!grads) return logdet;
  if (!finite(logdet)) {
    FL_BLOCK_FOR(blk, i, 0, A.R * A.d) grad_a[i] = kNaN;
    FL_BLOCK_FOR(blk, i, 0, G.R * G.d) grad_g[i] = kNaN;
    return logdet;
  }
  side_rows_grad(blk, A, rowsA, PA, grad_a, acc);
  side_rows_grad(blk, G, rowsG, PG, grad_g, acc);
  return logdet;
}

// kron_logdet of one task from the factors A (d_A × d_A) and G (any strides; the lower
// triangles are read), with grads also dL/dA and dL/dG (contiguous). All in mats.
FL_HD inline int64_t kron_task_matrices(int64_t dA, int64_t dG, Method method) {
  return 2 * (dA * dA + dG * dG) + task_workspace(method, dA, dG);
}

template <class Blk, class X, class P>
FL_HD void load_lower(const Blk& blk, X M, int64_t d, int64_t si, int64_t sj, P K) {
  for (int64_t i = 0; i < d; ++i)
    FL_BLOCK_FOR(blk, j, 0, d) K[i * d + j] = static_cast<double>(i >= j ? M[i * si + j * sj] : M[j * si + i * sj]);
  blk.sync();
}

template <class Blk, class P, class X, class Y>
FL_HD double kron_task(const Blk& blk, int64_t dA, int64_t dG, Method method, double c, double tau, X A, int64_t sAi,
                       int64_t sAj, X G, int64_t sGi, int64_t sGj, bool grads, Y grad_A, Y grad_G, P mats) {
  P KA = mats;
  P KG = KA + dA * dA;
  P PA = KG + dG * dG;
  P PG = PA + dA * dA;
  P rest = PG + dG * dG;
  load_lower(blk, A, dA, sAi, sAj, KA);
  load_lower(blk, G, dG, sGi, sGj, KG);
  const double logdet = task_logdet(blk, method, KA, dA, dA, KG, dG, dG, c, tau, grads, PA, PG, rest);
  if (!grads) return logdet;
  const bool ok = finite(logdet);
  FL_BLOCK_FOR(blk, i, 0, dA * dA) grad_A[i] = ok ? static_cast<double>(PA[i]) : kNaN;
  FL_BLOCK_FOR(blk, i, 0, dG * dG) grad_G[i] = ok ? static_cast<double>(PG[i]) : kNaN;
  return logdet;
}

}  // namespace fastlaplace::math
