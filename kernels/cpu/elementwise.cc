// Per-token vector operations. Written as plain loops over independent lanes
// so the compiler can vectorize them without -ffast-math.
#include "kernels/cpu/elementwise.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace morphserve::kernels {
namespace {

constexpr int kLanes = 8;

// exp(x) within 2 ulp for x in [-87, 88]; 0 below, +inf above (both beyond
// what the callers can tell apart). Branch-free so that loops vectorize,
// unlike calls to std::exp.
inline float Exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;  // ln 2 split so n * kLn2Hi is exact
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
  float xc = x < -87.0f ? -87.0f : x;
  xc = xc > 88.0f ? 88.0f : xc;
  const float n = (xc * kLog2e + kRound) - kRound;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  // Minimax polynomial for exp on [-ln2/2, ln2/2] (Cephes expf).
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float result = p * scale;
  result = x < -87.0f ? 0.0f : result;
  result = x > 88.0f ? std::numeric_limits<float>::infinity() : result;
  return result;
}

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

// Sum of exp(x[i] - max), in double partial sums: the normaliser of a
// 50k-entry vocabulary stays exact to float precision. kStore also writes
// each exp to out (which may alias x).
template <bool kStore>
double ExpSum(const float* x, float max, int64_t n, float* out) {
  double lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float e = Exp(x[i + l] - max);
      if constexpr (kStore) out[i + l] = e;
      lanes[l] += e;
    }
  }
  for (; i < n; ++i) {
    const float e = Exp(x[i] - max);
    if constexpr (kStore) out[i] = e;
    lanes[0] += e;
  }
  double sum = 0.0;
  for (double s : lanes) sum += s;
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

void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    out[i] = g / (1.0f + Exp(-g)) * up[i];
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
  const double sum = ExpSum<true>(x, max, n, x);
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = 0; j < n; ++j) x[j] *= inv;
  return max + static_cast<float>(std::log(sum));
}

float LogSumExp(const float* x, int64_t n) {
  const float max = Max(x, n);
  if (!std::isfinite(max)) return max;
  return max + static_cast<float>(std::log(ExpSum<false>(x, max, n, nullptr)));
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
