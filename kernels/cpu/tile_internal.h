// Building blocks shared by the CPU attention, KV-scoring and elementwise
// kernels. Not a public interface.
#ifndef MORPHSERVE_KERNELS_CPU_TILE_INTERNAL_H_
#define MORPHSERVE_KERNELS_CPU_TILE_INTERNAL_H_

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

// Loops written for the vectorizer (`omp simd` needs only -fopenmp-simd, no
// OpenMP runtime) go in functions marked with this: target_clones compiles
// AVX-512, AVX2 and baseline versions and picks one at load time.
#define MORPHSERVE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))

namespace morphserve::kernels::internal {

// Keys per transposed tile.
inline constexpr int64_t kTile = 16;

// exp(x) as 2^k * p(y): k = round(x log2 e), y = x - k ln2, p a degree-6
// Taylor polynomial of e^y on |y| <= ln2/2; about 2e-7 relative error, 0
// below -87. Branch-free, so that loops over it vectorize.
#pragma omp declare simd notinbranch
inline float ExpApprox(float x) {
  const float clamped = std::min(std::max(x, -87.0f), 88.0f);
  const float k = std::floor(clamped * 1.44269504f + 0.5f);
  // x - k ln2 with ln2 split in two (Cody-Waite), exact enough at |x| ~ 87.
  const float y = (clamped - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  const float r = p * std::bit_cast<float>(bits);
  return x < -87.0f ? 0.0f : r;
}

// Copies `width` (<= kTile) keys of head_dim floats, `k` apart by head_dim,
// into kt[d][kTile], zero-filling the missing columns.
void TransposeTile(const float* k, int64_t width, int64_t head_dim, float* kt);

// out[r * ld + j] = scale * sum_d q_r[d] kt[d][j] for r < rows, j < width,
// where q_r = q + r * q_stride.
void TileLogits(const float* kt, int64_t head_dim, const float* q, int64_t q_stride,
                int64_t rows, float scale, float* out, int64_t ld, int64_t width);

}  // namespace morphserve::kernels::internal

#endif  // MORPHSERVE_KERNELS_CPU_TILE_INTERNAL_H_
