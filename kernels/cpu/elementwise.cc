// Per-token vector operations. Written as plain loops over independent lanes,
// or `omp simd` loops, so the compiler can vectorize them without
// -ffast-math.
#include "kernels/cpu/elementwise.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kernels/cpu/tile_internal.h"

namespace morphserve::kernels {
namespace {

constexpr int kLanes = 8;

float SumOfSquares(const float* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += x[i + l] * x[i + l];
  }
  for (; i < n; ++i) acc[0] += x[i] * x[i];
  float sum = 0.0f;
  for (float a : acc) sum += a;
  return sum;
}

// The largest of x[0, n), ignoring NaN; -inf when there is none.
float Max(const float* x, int64_t n) {
  float lanes[kLanes];
  for (float& m : lanes) m = -std::numeric_limits<float>::infinity();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] = x[i + l] > lanes[l] ? x[i + l] : lanes[l];
  }
  for (; i < n; ++i) lanes[0] = x[i] > lanes[0] ? x[i] : lanes[0];
  float max = lanes[0];
  for (float m : lanes) max = m > max ? m : max;
  return max;
}

// out[i] = exp(x[i] - shift); out may alias x.
MORPHSERVE_SIMD_CLONES
void ExpShifted(const float* x, float shift, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = internal::ExpApprox(x[i] - shift);
}

// Sum of exp(x[i] - shift), in double: the normaliser of a 50k-entry
// vocabulary stays exact to float precision.
MORPHSERVE_SIMD_CLONES
double SumExpShifted(const float* x, float shift, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += internal::ExpApprox(x[i] - shift);
  return sum;
}

MORPHSERVE_SIMD_CLONES
double Sum(const float* x, int64_t n) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

}  // namespace

void RmsNorm(const float* x, const float* weight, float eps, int64_t n, float* out) {
  const float scale = 1.0f / std::sqrt(SumOfSquares(x, n) / static_cast<float>(n) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = x[i] * scale * weight[i];
}

void AddRmsNorm(float* residual, const float* delta, const float* weight, float eps, int64_t n,
                float* out) {
  Add(residual, delta, n);
  RmsNorm(residual, weight, eps, n, out);
}

MORPHSERVE_SIMD_CLONES
void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + internal::ExpApprox(-g)) * up[i];
  }
}

void Add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

float SoftmaxInPlace(float* x, int64_t n) {
  const float max = Max(x, n);
  if (max == -std::numeric_limits<float>::infinity()) {
    // Every entry is -inf: no distribution; fall back to uniform.
    for (int64_t j = 0; j < n; ++j) x[j] = 1.0f / static_cast<float>(n);
    return max;
  }
  ExpShifted(x, max, n, x);
  const double sum = Sum(x, n);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  return max + static_cast<float>(std::log(sum));
}

float LogSumExp(const float* x, int64_t n) {
  const float max = Max(x, n);
  if (!std::isfinite(max)) return max;
  return max + static_cast<float>(std::log(SumExpShifted(x, max, n)));
}

int64_t ArgMax(const float* x, int64_t n) {
  const float max = Max(x, n);
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == max) return i;
  }
  return 0;  // empty, or nothing but NaN
}

void ApplyRope(float* x, int64_t n_heads, int64_t head_dim, int64_t rot_dim, int64_t pos,
               const float* inv_freq, RopeStyle style) {
  const int64_t half = rot_dim / 2;
  // (a, b) pairs: adjacent elements, or elements half the rotation apart.
  const int64_t pair_step = style == RopeStyle::kAdjacent ? 2 : 1;
  const int64_t partner = style == RopeStyle::kAdjacent ? 1 : half;
  for (int64_t i = 0; i < half; ++i) {
    // The angle is formed in f32, as the reference implementations do.
    const float theta = static_cast<float>(pos) * inv_freq[i];
    const float c = std::cos(theta);
    const float s = std::sin(theta);
    for (int64_t h = 0; h < n_heads; ++h) {
      float* a = x + h * head_dim + i * pair_step;
      float* b = a + partner;
      const float xa = *a;
      const float xb = *b;
      *a = xa * c - xb * s;
      *b = xa * s + xb * c;
    }
  }
}

}  // namespace morphserve::kernels
