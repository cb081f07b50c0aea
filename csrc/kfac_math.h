// The per-task math of the fused log-det kernels, written once for the CPU and the GPU:
// every function is __host__ __device__ and works on caller-provided double buffers (no
// allocation, no std:: containers). The CPU kernels call it from one thread per task
// (csrc/cpu/logdet.cpp), the CUDA kernels likewise (csrc/cuda/logdet.cu), so the CPU
// tests exercise the arithmetic that the GPU runs. Row-major n×n buffers throughout.
// The same formulas in PyTorch, for the reference the tests compare against and for the
// posterior: fastlaplace/kfac_math.py. The composite path (csrc/composite.cpp, orders
// above 64) still writes them a third time, with ATen.
#pragma once
#include <math.h>

#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define FL_HD __host__ __device__
#else
#define FL_HD
#endif

namespace fastlaplace::math {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kEps = 2.220446049250313e-16;

FL_HD inline bool finite(double x) { return x - x == 0; }  // false for ±Inf and NaN
FL_HD inline double maxd(double x, double y) { return x > y ? x : y; }
FL_HD inline int64_t maxi(int64_t x, int64_t y) { return x > y ? x : y; }

// Four independent partial sums: without -ffast-math the compiler may not reorder a
// floating-point reduction, and one accumulator would serialise on the add latency.
FL_HD inline double dot(const double* x, const double* y, int64_t n) {
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

// ---------------------------------------------------------------------------------------
// Dense building blocks.

// K = x̄ᵀx̄ / R (D×D, full) from the rows x̄ (R×D, row-major), as R rank-1 updates of
// the lower triangle: contiguous multiply-adds the compiler vectorises.
FL_HD inline void syrk_rows(const double* rows, int64_t R, int64_t D, double* K) {
  for (int64_t i = 0; i < D * D; ++i) K[i] = 0;
  for (int64_t r = 0; r < R; ++r) {
    const double* x = rows + r * D;
    for (int64_t i = 0; i < D; ++i) {
      const double xi = x[i];
      double* Ki = K + i * D;
      for (int64_t j = 0; j <= i; ++j) Ki[j] += xi * x[j];
    }
  }
  for (int64_t i = 0; i < D; ++i)
    for (int64_t j = 0; j <= i; ++j) K[j * D + i] = K[i * D + j] = K[i * D + j] / R;
}

// The Gram matrix x̄x̄ᵀ / R (R×R) of the rows x̄ (R×D).
FL_HD inline void gram_rows(const double* rows, int64_t R, int64_t D, double* K) {
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j <= i; ++j) K[i * R + j] = K[j * R + i] = dot(rows + i * D, rows + j * D, D) / R;
}

// In place: S (n×n, symmetric; only the upper triangle is read) becomes U, upper
// triangular with UᵀU = S + damping·I (so L = Uᵀ), lower triangle zeroed; logdet receives
// log det(S + damping·I). Right-looking, so every update runs along a contiguous row.
// Returns 0, or j ≥ 1 when the leading minor of order j is not positive definite (or not finite).
FL_HD inline int64_t cholesky_upper(double* S, int64_t n, double damping, double* logdet) {
  double ld = 0;
  for (int64_t j = 0; j < n; ++j) {
    double* Uj = S + j * n;
    const double djj = Uj[j] + damping;
    if (!(djj > 0) || !finite(djj)) return j + 1;
    const double u = sqrt(djj), inv = 1 / u;
    ld += log(djj);
    Uj[j] = u;
    for (int64_t k = j + 1; k < n; ++k) Uj[k] *= inv;
    for (int64_t i = j + 1; i < n; ++i) {
      const double uji = Uj[i];
      double* Si = S + i * n;
      for (int64_t k = i; k < n; ++k) Si[k] -= uji * Uj[k];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) S[i * n + j] = 0;
  *logdet = ld;
  return 0;
}

// out = (UᵀU)⁻¹ = L⁻ᵀL⁻¹ with L = Uᵀ. X (n×n scratch) = L⁻¹ is built row by row by forward
// substitution in axpy form (column k of L is row k of U), then out = Σ_k X[k]ᵀX[k].
FL_HD inline void inverse_from_upper(const double* U, int64_t n, double* out, double* X) {
  for (int64_t i = 0; i < n * n; ++i) X[i] = 0;
  for (int64_t i = 0; i < n; ++i) X[i * n + i] = 1;
  for (int64_t k = 0; k < n; ++k) {
    double* Xk = X + k * n;
    const double inv = 1 / U[k * n + k];
    for (int64_t m = 0; m <= k; ++m) Xk[m] *= inv;
    for (int64_t i = k + 1; i < n; ++i) {
      const double lik = U[k * n + i];
      double* Xi = X + i * n;
      for (int64_t m = 0; m <= k; ++m) Xi[m] -= lik * Xk[m];
    }
  }
  for (int64_t i = 0; i < n * n; ++i) out[i] = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double* Xk = X + k * n;
    for (int64_t i = 0; i <= k; ++i) {
      const double xki = Xk[i];
      double* oi = out + i * n;
      for (int64_t j = 0; j <= i; ++j) oi[j] += xki * Xk[j];
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < i; ++j) out[j * n + i] = out[i * n + j];
}

// Symmetric eigendecomposition: Householder reduction to tridiagonal form, then the
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
FL_HD inline bool eigh(double* V, int64_t n, double* w, bool vectors, double* e) {
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

// P = V diag(ψ) Vᵀ (n×n) for eigenvectors V (columns).
FL_HD inline void spectral(const double* V, const double* psi, int64_t n, double* P) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k <= i; ++k) {
      double v = 0;
      for (int64_t m = 0; m < n; ++m) v += V[i * n + m] * psi[m] * V[k * n + m];
      P[i * n + k] = P[k * n + i] = v;
    }
}

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

FL_HD inline double guarded(double logdet, double err, int64_t terms) {
  return err <= kGuardTolerance * (fabs(logdet) + static_cast<double>(terms)) ? logdet : kNaN;  // NaN err: NaN
}

// Σ_j M_jj / p_j over the pivots p_j = U_jj² of a Cholesky factor of M = scale·K + damping·I:
// pivot j's rounding is about ε·M_jj, so kRounding·ε times this estimates the error of the
// log-det from the factorisation (a pivot that cancelled down from a large diagonal entry).
FL_HD inline double pivot_ratios(const double* K, const double* U, int64_t n, double scale, double damping) {
  double s = 0;
  for (int64_t j = 0; j < n; ++j) s += (scale * K[j * n + j] + damping) / (U[j * n + j] * U[j * n + j]);
  return s;
}

// The rounding of a computed eigenvalue of K (a backward-stable eigensolver): kRounding·ε·‖K‖.
FL_HD inline double rounding_level(const double* w, int64_t n) {
  double norm = 0;
  for (int64_t i = 0; i < n; ++i) norm = maxd(norm, fabs(w[i]));
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

FL_HD inline int64_t exact_workspace(int64_t ns, int64_t nb) {
  return 2 * ns + ns * ns + maxi(ns, nb) + 2 * nb + 4 * nb * nb;
}

FL_HD inline double exact_logdet(const double* Ks, int64_t ns, int64_t ds, const double* Kb, int64_t nb, int64_t db,
                                 double c, double tau, bool grads, double* Ps, double* Pb, double* ws) {
  double* w = ws;
  double* psi = w + ns;
  double* V = psi + ns;
  double* e = V + ns * ns;
  double* wb = e + maxi(ns, nb);
  double* psib = wb + nb;
  double* S = psib + nb;  // also K_b's eigenvectors
  double* Minv = S + nb * nb;
  double* X = Minv + nb * nb;
  for (int64_t i = 0; i < ns * ns; ++i) V[i] = Ks[i];
  if (!eigh(V, ns, w, grads, e)) return kNaN;
  // The guard's error estimate: each eigenvalue s_i is known to ±δ_s, which moves the value
  // by δ_s·|dL/ds_i|; each Cholesky adds its pivots' rounding.
  const double deltaS = rounding_level(w, ns);
  double trB = 0;
  for (int64_t i = 0; i < nb; ++i) trB += Kb[i * nb + i];
  double err = 0;
  // Pairs with a zero eigenvalue on either side contribute log τ each.
  double logdet = static_cast<double>(ds * db - ns * nb) * log(tau);
  for (int64_t j = 0; j < ns; ++j) psi[j] = 0;
  if (ns <= kCholeskyPerEigenvalueUpTo || !grads) {
    if (grads)
      for (int64_t i = 0; i < nb * nb; ++i) Pb[i] = 0;
    for (int64_t j = 0; j < ns; ++j) {
      const double cs = c * w[j];
      for (int64_t i = 0; i < nb * nb; ++i) S[i] = cs * Kb[i];
      double ld = 0;
      if (cholesky_upper(S, nb, tau, &ld) != 0) return kNaN;
      logdet += ld;
      err += kRounding * kEps * pivot_ratios(Kb, S, nb, fabs(cs), tau);
      if (!grads) {
        err += deltaS * psi_bound(w[j], c, trB, nb, tau);
        continue;
      }
      inverse_from_upper(S, nb, Minv, X);
      for (int64_t i = 0; i < nb * nb; ++i) {
        Pb[i] += cs * Minv[i];
        psi[j] += Kb[i] * Minv[i];  // tr(K M⁻¹) of two symmetric matrices
      }
      psi[j] *= c;
      err += deltaS * fabs(psi[j]);
    }
  } else {
    double* Vb = S;
    for (int64_t i = 0; i < nb * nb; ++i) Vb[i] = Kb[i];
    if (!eigh(Vb, nb, wb, true, e)) return kNaN;
    for (int64_t j = 0; j < nb; ++j) psib[j] = 0;
    for (int64_t i = 0; i < ns; ++i)
      for (int64_t j = 0; j < nb; ++j) {
        const double denom = c * w[i] * wb[j] + tau;
        logdet += log(denom);
        psi[i] += c * wb[j] / denom;
        psib[j] += c * w[i] / denom;
      }
    const double deltaB = rounding_level(wb, nb);
    for (int64_t i = 0; i < ns; ++i) err += deltaS * fabs(psi[i]);
    for (int64_t j = 0; j < nb; ++j) err += deltaB * fabs(psib[j]);
    spectral(Vb, psib, nb, Pb);
  }
  if (grads) spectral(V, psi, ns, Ps);
  return guarded(logdet, err, ds * db);
}

// Factored: d_G·logdet(A + λ_A I) + d_A·logdet(G + λ_G I) + d_A·d_G·log c, with
// λ_A = π√τ/√c and λ_G = √τ/(π√c) (π-corrected damping of Martens & Grosse 2015). When K
// is a Gram matrix (n < d), the factor's other d − n eigenvalues are zero:
// logdet(A + λI) = logdet(K + λI) + (d − n)·log λ, and by the push-through identity
// x̄(A + λI)⁻¹ = (K + λI)⁻¹x̄, so every matrix stays n×n. The gradient
// dL/dK_A = d_G·(K_A + λ_A I)⁻¹ + κ_A I, where κ carries π's dependence on the traces.
FL_HD inline int64_t factored_workspace(int64_t nA, int64_t nG) {
  const int64_t n = maxi(nA, nG);
  return nA * nA + nG * nG + n * n;
}

FL_HD inline double factored_logdet(const double* KA, int64_t nA, int64_t dA, const double* KG, int64_t nG, int64_t dG,
                                    double c, double tau, bool grads, double* PA, double* PG, double* ws) {
  double* UA = ws;
  double* UG = UA + nA * nA;
  double* X = UG + nG * nG;
  double trA = 0, trG = 0;
  for (int64_t i = 0; i < nA; ++i) trA += KA[i * nA + i];
  for (int64_t i = 0; i < nG; ++i) trG += KG[i * nG + i];
  const bool valid = trA > 0 && trG > 0;
  const double pi = valid ? sqrt((trA / dA) / (trG / dG)) : 1.0;
  const double sc = sqrt(c), st = sqrt(tau);
  const double lamA = pi * st / sc, lamG = st / (pi * sc);
  for (int64_t i = 0; i < nA * nA; ++i) UA[i] = KA[i];
  for (int64_t i = 0; i < nG * nG; ++i) UG[i] = KG[i];
  double ldA = 0, ldG = 0;
  if (cholesky_upper(UA, nA, lamA, &ldA) != 0 || cholesky_upper(UG, nG, lamG, &ldG) != 0) return kNaN;
  const double err =
      kRounding * kEps * (dG * pivot_ratios(KA, UA, nA, 1, lamA) + dA * pivot_ratios(KG, UG, nG, 1, lamG));
  ldA += (dA - nA) * log(lamA);
  ldG += (dG - nG) * log(lamG);
  const double logdet = guarded(dG * ldA + dA * ldG + static_cast<double>(dA * dG) * log(c), err, dA * dG);
  if (grads && finite(logdet)) {
    inverse_from_upper(UA, nA, PA, X);
    inverse_from_upper(UG, nG, PG, X);
    // π's share: dL/dπ·π = d_G·λ_A·tr(A + λ_A I)⁻¹ − d_A·λ_G·tr(G + λ_G I)⁻¹, and λ·tr(F + λI)⁻¹
    // = d − t with t = tr(K (K + λI)⁻¹) = Σ a/(a + λ) (zero eigenvalues add nothing), so it is
    // d_A·t_G − d_G·t_A: the two d_A·d_G terms cancel in closed form instead of in rounding,
    // which lost all digits when τ ≫ c·‖A‖·‖G‖ (both traces then ≈ d/λ; dπ·π/(2 tr) ≈ 1e52).
    double tA = 0, tG = 0;
    for (int64_t i = 0; i < nA * nA; ++i) tA += KA[i] * PA[i];
    for (int64_t i = 0; i < nG * nG; ++i) tG += KG[i] * PG[i];
    const double x = dA * tG - dG * tA;
    const double kA = valid ? x / (2 * trA) : 0.0;
    const double kG = valid ? -x / (2 * trG) : 0.0;
    for (int64_t i = 0; i < nA * nA; ++i) PA[i] *= dG;
    for (int64_t i = 0; i < nG * nG; ++i) PG[i] *= dA;
    for (int64_t i = 0; i < nA; ++i) PA[i * nA + i] += kA;
    for (int64_t i = 0; i < nG; ++i) PG[i * nG + i] += kG;
  }
  return logdet;
}

// Either method, from K_A (n_A, full dimension d_A) and K_G; the exact method puts the
// carrier with fewer eigenvalues first.
FL_HD inline int64_t task_workspace(bool exact, int64_t nA, int64_t nG) {
  return exact ? exact_workspace(nA < nG ? nA : nG, nA < nG ? nG : nA) : factored_workspace(nA, nG);
}

FL_HD inline double task_logdet(bool exact, const double* KA, int64_t nA, int64_t dA, const double* KG, int64_t nG,
                                int64_t dG, double c, double tau, bool grads, double* PA, double* PG, double* ws) {
  if (!exact) return factored_logdet(KA, nA, dA, KG, nG, dG, c, tau, grads, PA, PG, ws);
  if (nA <= nG) return exact_logdet(KA, nA, dA, KG, nG, dG, c, tau, grads, PA, PG, ws);
  return exact_logdet(KG, nG, dG, KA, nA, dA, c, tau, grads, PG, PA, ws);
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

template <typename scalar_t>
FL_HD void load_side(const Side& s, const scalar_t* x, int64_t sR, int64_t sD, double* rows, double* K) {
  for (int64_t r = 0; r < s.R; ++r) {
    for (int64_t i = 0; i < s.d; ++i) rows[r * s.D + i] = static_cast<double>(x[r * sR + i * sD]);
    if (s.bias) rows[r * s.D + s.d] = 1.0;
  }
  if (s.gram)
    gram_rows(rows, s.R, s.D, K);
  else
    syrk_rows(rows, s.R, s.D, K);
}

// dL/dx (R × d, contiguous) for dL/dK = P (symmetric): the first d columns of (2/R)·x̄P
// (factor) or (2/R)·P x̄ (Gram), each output row built as a sum of scaled rows; acc: D doubles.
template <typename scalar_t>
FL_HD void side_rows_grad(const Side& s, const double* rows, const double* P, scalar_t* out, double* acc) {
  const double scale = 2.0 / s.R;
  const int64_t terms = s.gram ? s.R : s.D;
  for (int64_t r = 0; r < s.R; ++r) {
    for (int64_t k = 0; k < s.D; ++k) acc[k] = 0;
    for (int64_t m = 0; m < terms; ++m) {
      const double coef = s.gram ? P[r * s.R + m] : rows[r * s.D + m];
      const double* src = s.gram ? rows + m * s.D : P + m * s.D;
      for (int64_t k = 0; k < s.d; ++k) acc[k] += coef * src[k];
    }
    for (int64_t k = 0; k < s.d; ++k) out[r * s.d + k] = static_cast<scalar_t>(scale * acc[k]);
  }
}

// kfac_logdet of one task, from the rows a (R × d_in) and g (R × d_out) straight to the
// log-det and, with grads, dL/da and dL/dg (contiguous R × d). Returns NaN (and NaN
// gradients) when a damped matrix is not positive definite or an input is not finite.
FL_HD inline int64_t kfac_task_workspace(const Side& A, const Side& G, bool exact) {
  return A.R * A.D + G.R * G.D + 2 * (A.n * A.n + G.n * G.n) + maxi(A.D, G.D) + task_workspace(exact, A.n, G.n);
}

template <typename scalar_t>
FL_HD double kfac_task(const Side& A, const Side& G, bool exact, double c, double tau, const scalar_t* a, int64_t saR,
                       int64_t saD, const scalar_t* g, int64_t sgR, int64_t sgD, bool grads, scalar_t* grad_a,
                       scalar_t* grad_g, double* ws) {
  double* rowsA = ws;
  double* rowsG = rowsA + A.R * A.D;
  double* KA = rowsG + G.R * G.D;
  double* KG = KA + A.n * A.n;
  double* PA = KG + G.n * G.n;
  double* PG = PA + A.n * A.n;
  double* acc = PG + G.n * G.n;
  double* rest = acc + maxi(A.D, G.D);
  load_side(A, a, saR, saD, rowsA, KA);
  load_side(G, g, sgR, sgD, rowsG, KG);
  const double logdet = task_logdet(exact, KA, A.n, A.D, KG, G.n, G.D, c, tau, grads, PA, PG, rest);
  if (!grads) return logdet;
  if (!finite(logdet)) {
    for (int64_t i = 0; i < A.R * A.d; ++i) grad_a[i] = static_cast<scalar_t>(kNaN);
    for (int64_t i = 0; i < G.R * G.d; ++i) grad_g[i] = static_cast<scalar_t>(kNaN);
    return logdet;
  }
  side_rows_grad(A, rowsA, PA, grad_a, acc);
  side_rows_grad(G, rowsG, PG, grad_g, acc);
  return logdet;
}

// kron_logdet of one task from the factors A (d_A × d_A) and G (any strides; the lower
// triangles are read), with grads also dL/dA and dL/dG (contiguous).
FL_HD inline int64_t kron_task_workspace(int64_t dA, int64_t dG, bool exact) {
  return 2 * (dA * dA + dG * dG) + task_workspace(exact, dA, dG);
}

template <typename scalar_t>
FL_HD double kron_task(int64_t dA, int64_t dG, bool exact, double c, double tau, const scalar_t* A, int64_t sAi,
                       int64_t sAj, const scalar_t* G, int64_t sGi, int64_t sGj, bool grads, scalar_t* grad_A,
                       scalar_t* grad_G, double* ws) {
  double* KA = ws;
  double* KG = KA + dA * dA;
  double* PA = KG + dG * dG;
  double* PG = PA + dA * dA;
  double* rest = PG + dG * dG;
  for (int64_t i = 0; i < dA; ++i)
    for (int64_t j = 0; j <= i; ++j) KA[i * dA + j] = KA[j * dA + i] = static_cast<double>(A[i * sAi + j * sAj]);
  for (int64_t i = 0; i < dG; ++i)
    for (int64_t j = 0; j <= i; ++j) KG[i * dG + j] = KG[j * dG + i] = static_cast<double>(G[i * sGi + j * sGj]);
  const double logdet = task_logdet(exact, KA, dA, dA, KG, dG, dG, c, tau, grads, PA, PG, rest);
  if (!grads) return logdet;
  const bool ok = finite(logdet);
  for (int64_t i = 0; i < dA * dA; ++i) grad_A[i] = static_cast<scalar_t>(ok ? PA[i] : kNaN);
  for (int64_t i = 0; i < dG * dG; ++i) grad_G[i] = static_cast<scalar_t>(ok ? PG[i] : kNaN);
  return logdet;
}

}  // namespace fastlaplace::math
