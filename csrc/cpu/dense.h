// Small dense linear algebra in double precision on row-major n×n buffers: the CPU
// kernels' per-task building blocks. Below ~64 rows these beat LAPACK calls, whose
// per-call overhead dominates at the sizes of the sinusoid and output layers.
#pragma once
#include <cmath>
#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace fastlaplace::dense {

// Four independent partial sums: without -ffast-math the compiler may not reorder a
// floating-point reduction, and one accumulator would serialise on the add latency.
inline double dot(const double* x, const double* y, int64_t n) {
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

// K = x̄ᵀx̄ / R (D×D, full) from the rows x̄ (R×D, row-major), as R rank-1 updates of
// the lower triangle: contiguous multiply-adds the compiler vectorises.
inline void syrk_rows(const double* rows, int64_t R, int64_t D, double* K) {
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

// In place: S (n×n, symmetric; only the upper triangle is read) becomes U, upper
// triangular with UᵀU = S + damping·I (so L = Uᵀ), lower triangle zeroed; logdet receives
// log det(S + damping·I). Right-looking, so every update runs along a contiguous row.
// Returns 0, or j ≥ 1 when the leading minor of order j is not positive definite.
inline int64_t cholesky_upper(double* S, int64_t n, double damping, double* logdet) {
  double ld = 0;
  for (int64_t j = 0; j < n; ++j) {
    double* Uj = S + j * n;
    const double djj = Uj[j] + damping;
    if (!(djj > 0) || !std::isfinite(djj)) return j + 1;
    const double u = std::sqrt(djj), inv = 1 / u;
    ld += std::log(djj);
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

// out = (UᵀU)⁻¹ = L⁻ᵀL⁻¹ with L = Uᵀ. X = L⁻¹ is built row by row by forward substitution
// in axpy form (column k of L is row k of U), then out = Σ_k X[k]ᵀX[k], also as axpys.
inline void inverse_from_upper(const double* U, int64_t n, double* out, std::vector<double>& X) {
  X.assign(n * n, 0.0);
  for (int64_t i = 0; i < n; ++i) X[i * n + i] = 1;
  for (int64_t k = 0; k < n; ++k) {
    double* Xk = X.data() + k * n;
    const double inv = 1 / U[k * n + k];
    for (int64_t m = 0; m <= k; ++m) Xk[m] *= inv;
    for (int64_t i = k + 1; i < n; ++i) {
      const double lik = U[k * n + i];
      double* Xi = X.data() + i * n;
      for (int64_t m = 0; m <= k; ++m) Xi[m] -= lik * Xk[m];
    }
  }
  for (int64_t i = 0; i < n * n; ++i) out[i] = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double* Xk = X.data() + k * n;
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
// on exit (meaningful only when vectors is true); w receives the eigenvalues, unsorted.
// Returns false if QL did not converge (non-finite input); w is then NaN.
//
// Two safeguards beyond JAMA: the matrix is scaled to a largest entry of 1 (eigenvalues
// scaled back at the end), and a row whose off-diagonal part is below ε² of that is taken
// as exactly zero. Without them, a matrix of low rank (a constant one, say) reduced its
// numerically-zero remainder down to denormal numbers, and the Householder vectors built
// from those were no longer orthogonal (eigenvectors off by O(1) from order 56 on).
inline bool eigh(double* V, int64_t n, double* w, bool vectors, std::vector<double>& work) {
  if (n == 0) return true;
  double anorm = 0;
  for (int64_t i = 0; i < n * n; ++i) anorm = std::isfinite(V[i]) ? std::max(anorm, std::abs(V[i])) : V[i];
  if (!std::isfinite(anorm)) {
    for (int64_t k = 0; k < n; ++k) w[k] = std::numeric_limits<double>::quiet_NaN();
    return false;
  }
  if (anorm > 0)
    for (int64_t i = 0; i < n * n; ++i) V[i] /= anorm;
  constexpr double kNegligible = 2.220446049250313e-16 * 2.220446049250313e-16;
  work.assign(n, 0.0);
  double* d = w;
  double* e = work.data();
  auto at = [&](int64_t i, int64_t j) -> double& { return V[i * n + j]; };
  for (int64_t j = 0; j < n; ++j) d[j] = at(n - 1, j);
  for (int64_t i = n - 1; i > 0; --i) {  // tred2
    double scale = 0, h = 0;
    for (int64_t k = 0; k < i; ++k) scale += std::abs(d[k]);
    if (scale <= kNegligible) {
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
      double g = std::sqrt(h);
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
  const double eps = 2.220446049250313e-16;
  for (int64_t l = 0; l < n; ++l) {
    tst1 = std::max(tst1, std::abs(d[l]) + std::abs(e[l]));
    int64_t m = l;
    while (m < n - 1 && !(std::abs(e[m]) <= eps * tst1)) ++m;
    if (m > l) {
      int iter = 0;
      do {
        if (++iter > 60) {
          for (int64_t k = 0; k < n; ++k) d[k] = std::numeric_limits<double>::quiet_NaN();
          return false;
        }
        double g = d[l];
        double p = (d[l + 1] - g) / (2 * e[l]);
        double r = std::hypot(p, 1.0);
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
          r = std::hypot(p, e[i]);
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
      } while (std::abs(e[l]) > eps * tst1);
    }
    d[l] += f;
    e[l] = 0;
  }
  if (anorm > 0)
    for (int64_t k = 0; k < n; ++k) d[k] *= anorm;
  return true;
}

}  // namespace fastlaplace::dense
