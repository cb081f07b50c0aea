// The scalar K-FAC formulas that the fused per-task math (csrc/kfac_math.h, on doubles) and
// the composite path (csrc/composite.cpp, on batched tensors) share: written once, for a
// value type T that is double or at::Tensor, with the few operations that differ between
// the two (a select, a square root, an absolute value) supplied by overloads. The same
// formulas in PyTorch: fastlaplace/kfac_math.py. docs/design.md §2 derives them.
#pragma once
#include <math.h>

#include <cstdint>
#include <limits>

#include "block.h"

namespace fastlaplace {
// The log-det methods of docs/design.md §2, as the op schemas' strings name them.
enum class Method { Exact, Factored };
}  // namespace fastlaplace

namespace fastlaplace::math {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kEps = 2.220446049250313e-16;

FL_HD inline bool finite(double x) { return x - x == 0; }  // false for ±Inf and NaN
FL_HD inline double maxd(double x, double y) { return x > y ? x : y; }

// The operations whose spelling differs between double and at::Tensor (whose
// specialisation is in csrc/composite.cpp).
template <class T>
struct Arith;

template <>
struct Arith<double> {
  FL_HD static double select(bool cond, double x, double y) { return cond ? x : y; }
  FL_HD static double abs(double x) { return fabs(x); }
  FL_HD static double sqrt(double x) { return ::sqrt(x); }
  FL_HD static double full_like(double, double value) { return value; }
};

// ---------------------------------------------------------------------------------------
// The precision guard (docs/design.md §2). Every path takes the log-det of double carriers
// K. Rounding moves a computed eigenvalue of K by about ε·‖K‖, and a Cholesky pivot p_j by
// about ε·M_jj (its diagonal entry before elimination), so a term log(a + λ) moves by
// ε·‖K‖/(a + λ): when the damping falls below that level (a rank-deficient carrier at an
// extreme scale, λ < ~ε·‖K‖), the arithmetic cannot resolve the value, and the ops return
// NaN (an error under check=True) rather than a finite wrong number. err, the sum of those
// first-order moves, is accepted up to kGuardTolerance·(|L| + d_A·d_G).
constexpr double kGuardTolerance = 1e-6;
constexpr double kRounding = 4;  // rounding of a pivot or an eigenvalue, in units of ε·(its scale)

template <class T>
FL_HD T guarded(const T& logdet, const T& err, int64_t terms) {  // NaN err: NaN
  using A = Arith<T>;
  return A::select(err <= (A::abs(logdet) + static_cast<double>(terms)) * kGuardTolerance, logdet,
                   A::full_like(logdet, kNaN));
}

// ---------------------------------------------------------------------------------------
// Factored: d_G·logdet(A + λ_A I) + d_A·logdet(G + λ_G I) + d_A·d_G·log c, with
// λ_A = π√τ/√c and λ_G = √τ/(π√c) (π-corrected damping of Martens & Grosse 2015), π = 1
// where a factor has zero trace. tr K = tr A also for a Gram carrier.
template <class T>
struct Dampings {
  T valid, pi, lamA, lamG;
};

template <class T>
FL_HD Dampings<T> factored_dampings(const T& trA, int64_t dA, const T& trG, int64_t dG, double c, double tau) {
  using A = Arith<T>;
  const T valid = (trA > 0) & (trG > 0);  // a bool as T
  const T pi = A::select(valid, A::sqrt((trA / static_cast<double>(dA)) / (trG / static_cast<double>(dG))),
                         A::full_like(trA, 1.0));
  const double st = sqrt(tau) / sqrt(c);
  return {valid, pi, pi * st, st / pi};
}

// π's share of dL/dK: κ_A I and κ_G I. dL/dπ·π = d_G·λ_A·tr(A + λ_A I)⁻¹ − d_A·λ_G·tr(G + λ_G I)⁻¹,
// and λ·tr(F + λI)⁻¹ = d − t with t = tr(K (K + λI)⁻¹) (zero eigenvalues add nothing), so
// it is d_A·t_G − d_G·t_A: the two d_A·d_G terms cancel in closed form instead of in
// rounding, which lost all digits when τ ≫ c·‖A‖·‖G‖ (dπ·π/(2 tr) ≈ 1e52).
template <class T>
struct PiShare {
  T kA, kG;
};

template <class T>
FL_HD PiShare<T> pi_share(const Dampings<T>& f, const T& tA, const T& tG, const T& trA, const T& trG, int64_t dA,
                          int64_t dG) {
  const T x = tG * static_cast<double>(dA) - tA * static_cast<double>(dG);
  using A = Arith<T>;
  return {A::select(f.valid, x / (trA * 2.0), A::full_like(x, 0.0)),
          A::select(f.valid, -x / (trG * 2.0), A::full_like(x, 0.0))};
}

// Exact: log det(c·A⊗G + τI) = Σ_ij log(c·s_i·b_j + τ) + (zero pairs)·log τ; a pair's
// derivative with respect to s_i is c·b_j/(c·s_i·b_j + τ).
FL_HD inline double zero_pairs_logdet(int64_t ds, int64_t db, int64_t ns, int64_t nb, double tau) {
  return static_cast<double>(ds * db - ns * nb) * log(tau);
}

}  // namespace fastlaplace::math
