// Small dense linear algebra in double precision on row-major n×n buffers: the CPU
// kernels' per-task building blocks. Below ~64 rows these beat LAPACK calls, whose
// per-call overhead dominates at the sizes of the sinusoid and output layers.
#pragma once
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastlaplace::dense {

inline double dot(const double* x, const double* y, int64_t n) {
  double s = 0;
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
}

// In place: the lower triangle of S (n×n, symmetric; only the lower triangle is read)
// becomes the Cholesky factor of S + damping·I, the upper triangle is zeroed, and
// logdet receives log det(S + damping·I). Returns 0, or j ≥ 1 when the leading minor of
// order j is not positive definite (S is then partly overwritten).
inline int64_t cholesky(double* S, int64_t n, double damping, double* logdet) {
  double ld = 0;
  for (int64_t j = 0; j < n; ++j) {
    double* Lj = S + j * n;
    const double djj = Lj[j] + damping - dot(Lj, Lj, j);
    if (!(djj > 0) || !std::isfinite(djj)) return j + 1;
    const double l = std::sqrt(djj);
    Lj[j] = l;
    ld += std::log(djj);
    for (int64_t i = j + 1; i < n; ++i) {
      double* Li = S + i * n;
      Li[j] = (Li[j] - dot(Li, Lj, j)) / l;
    }
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = i + 1; j < n; ++j) S[i * n + j] = 0;
  *logdet = ld;
  return 0;
}

// out = (L Lᵀ)⁻¹ for a lower Cholesky factor L. U holds L⁻ᵀ row by row (row j of U is
// column j of L⁻¹), so every inner product below runs over contiguous memory.
inline void cholesky_inverse(const double* L, int64_t n, double* out, std::vector<double>& U) {
  U.assign(n * n, 0.0);
  std::vector<double> x(n);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t i = j; i < n; ++i) {
      const double* Li = L + i * n;
      double s = (i == j) ? 1.0 : 0.0;
      for (int64_t k = j; k < i; ++k) s -= Li[k] * x[k];
      x[i] = s / Li[i];
    }
    for (int64_t i = j; i < n; ++i) U[j * n + i] = x[i];
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j <= i; ++j) {
      const int64_t k0 = i;  // U[i, k] = 0 for k < i and U[j, k] = 0 for k < j ≤ i
      out[i * n + j] = out[j * n + i] = dot(U.data() + i * n + k0, U.data() + j * n + k0, n - k0);
    }
}

// Symmetric eigendecomposition by cyclic Jacobi rotations: S (n×n, destroyed) becomes
// nearly diagonal; w receives the eigenvalues, V (row-major) the eigenvectors as columns.
inline void jacobi_eigh(double* S, int64_t n, double* w, double* V) {
  for (int64_t i = 0; i < n * n; ++i) V[i] = 0;
  for (int64_t i = 0; i < n; ++i) V[i * n + i] = 1;
  for (int sweep = 0; sweep < 60; ++sweep) {
    double off = 0, diag = 0;
    for (int64_t p = 0; p < n; ++p) {
      diag += S[p * n + p] * S[p * n + p];
      for (int64_t q = p + 1; q < n; ++q) off += S[p * n + q] * S[p * n + q];
    }
    if (!(off > 1e-30 * diag) || !std::isfinite(off)) break;  // converged (or NaN input: stop)
    for (int64_t p = 0; p < n; ++p)
      for (int64_t q = p + 1; q < n; ++q) {
        const double apq = S[p * n + q];
        if (apq == 0) continue;
        const double theta = (S[q * n + q] - S[p * n + p]) / (2 * apq);
        const double t = (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (int64_t k = 0; k < n; ++k) {  // columns p, q
          const double skp = S[k * n + p], skq = S[k * n + q];
          S[k * n + p] = c * skp - s * skq;
          S[k * n + q] = s * skp + c * skq;
        }
        for (int64_t k = 0; k < n; ++k) {  // rows p, q
          const double spk = S[p * n + k], sqk = S[q * n + k];
          S[p * n + k] = c * spk - s * sqk;
          S[q * n + k] = s * spk + c * sqk;
        }
        for (int64_t k = 0; k < n; ++k) {
          const double vkp = V[k * n + p], vkq = V[k * n + q];
          V[k * n + p] = c * vkp - s * vkq;
          V[k * n + q] = s * vkp + c * vkq;
        }
      }
  }
  for (int64_t i = 0; i < n; ++i) w[i] = S[i * n + i];
}

}  // namespace fastlaplace::dense
