#include "kernels/cpu/kv_scoring.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "kernels/cpu/paged_attention.h"
#include "kernels/cpu/tile_internal.h"

namespace morphserve::kernels {
namespace {

constexpr int64_t kRowsPerPass = 4;

MORPHSERVE_SIMD_CLONES
void ExpLoop(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = internal::ExpApprox(x[i]);
}

// Up to kRowsPerPass query rows against one transposed tile of keys
// kt[d][internal::kTile]: out[r][j] = scale * sum_d q_r[d] kt[d][j].
MORPHSERVE_SIMD_CLONES
void TileLogitsImpl(const float* kt, int64_t head_dim, const float* q, int64_t q_stride,
                int64_t rows, float scale, float* out, int64_t ld, int64_t width) {
  for (int64_t r0 = 0; r0 < rows; r0 += kRowsPerPass) {
    const int64_t nr = std::min(kRowsPerPass, rows - r0);
    float acc[kRowsPerPass][internal::kTile] = {};
    for (int64_t d = 0; d < head_dim; ++d) {
      const float* krow = kt + d * internal::kTile;
      for (int64_t r = 0; r < nr; ++r) {
        const float qv = q[(r0 + r) * q_stride + d];
#pragma omp simd
        for (int64_t j = 0; j < internal::kTile; ++j) acc[r][j] += qv * krow[j];
      }
    }
    for (int64_t r = 0; r < nr; ++r) {
      for (int64_t j = 0; j < width; ++j) out[(r0 + r) * ld + j] = acc[r][j] * scale;
    }
  }
}

MORPHSERVE_SIMD_CLONES
float MaxOver(const float* x, const uint8_t* mask, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) {
    m = std::max(m, mask == nullptr || mask[j] ? x[j] : -std::numeric_limits<float>::infinity());
  }
  return m;
}

// x[j] = mask[j] ? exp(x[j] - m) : 0; returns the sum.
MORPHSERVE_SIMD_CLONES
float ExpShiftMasked(float* x, const uint8_t* mask, float m, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e = internal::ExpApprox(x[j] - m);
    const float v = mask == nullptr || mask[j] ? e : 0.0f;
    x[j] = v;
    sum += v;
  }
  return sum;
}

MORPHSERVE_SIMD_CLONES
void Scale(float* x, float s, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) x[j] *= s;
}

MORPHSERVE_SIMD_CLONES
void MaxInto(float* acc, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] = std::max(acc[j], x[j]);
}

MORPHSERVE_SIMD_CLONES
void AddInto(float* acc, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) acc[j] += x[j];
}

}  // namespace

namespace internal {

namespace {

// Keys [j0, j0 + 8) and dims [d0, d1) of the tile, one element at a time.
void TransposeScalar(const float* k, int64_t width, int64_t head_dim, int64_t j0, int64_t d0,
                     int64_t d1, float* kt) {
  for (int64_t j = j0; j < j0 + 8; ++j) {
    const float* kj = k + j * head_dim;
    for (int64_t d = d0; d < d1; ++d) kt[d * kTile + j] = j < width ? kj[d] : 0.0f;
  }
}

#if defined(__x86_64__)
// The tile as 8x8 blocks transposed in registers: about a third of the
// instructions of the scalar copy, whose stores are all strided.
__attribute__((target("avx"))) void TransposeAvx(const float* k, int64_t width,
                                                 int64_t head_dim, float* kt) {
  for (int64_t j0 = 0; j0 < kTile; j0 += 8) {
    int64_t d = 0;
    for (; d + 8 <= head_dim; d += 8) {
      __m256 r[8];
      for (int64_t j = 0; j < 8; ++j) {
        r[j] = j0 + j < width ? _mm256_loadu_ps(k + (j0 + j) * head_dim + d) : _mm256_setzero_ps();
      }
      // Pairs of rows interleaved, then quads, then the 128-bit halves.
      __m256 t[8];
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      __m256 u[8];
      for (int i = 0; i < 2; ++i) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(kt + (d + i) * kTile + j0, _mm256_permute2f128_ps(u[i], u[4 + i], 0x20));
        _mm256_storeu_ps(kt + (d + 4 + i) * kTile + j0,
                         _mm256_permute2f128_ps(u[i], u[4 + i], 0x31));
      }
    }
    TransposeScalar(k, width, head_dim, j0, d, head_dim, kt);
  }
}
#endif

}  // namespace

static_assert(kTile % 8 == 0, "TransposeTile works in 8x8 blocks");

void TransposeTile(const float* k, int64_t width, int64_t head_dim, float* kt) {
#if defined(__x86_64__)
  static const bool kAvx = __builtin_cpu_supports("avx");
  if (kAvx) return TransposeAvx(k, width, head_dim, kt);
#endif
  for (int64_t j0 = 0; j0 < kTile; j0 += 8) TransposeScalar(k, width, head_dim, j0, 0, head_dim, kt);
}

void TileLogits(const float* kt, int64_t head_dim, const float* q, int64_t q_stride,
                int64_t rows, float scale, float* out, int64_t ld, int64_t width) {
  TileLogitsImpl(kt, head_dim, q, q_stride, rows, scale, out, ld, width);
}

}  // namespace internal

void Exp(const float* x, float* y, int64_t n) { ExpLoop(x, y, n); }

void PagedKeyLogits(const PagedKeys& keys, const float* q, int64_t q_stride, int64_t num_rows,
                    float scale, float* logits, int64_t ld) {
  const int64_t hd = keys.head_dim;
  alignas(64) float kt[kMaxHeadDim * internal::kTile];
  for (int64_t start = 0; start < keys.num_slots; start += keys.block_size) {
    const int64_t n = std::min(keys.block_size, keys.num_slots - start);
    const int64_t block = keys.block_table[start / keys.block_size];
    const float* k =
        keys.k_cache + ((block * keys.num_kv_heads + keys.kv_head) * keys.block_size) * hd;
    for (int64_t t0 = 0; t0 < n; t0 += internal::kTile) {
      const int64_t width = std::min(internal::kTile, n - t0);
      // Transposed, the inner loop runs over keys, with no horizontal sums.
      internal::TransposeTile(k + t0 * hd, width, hd, kt);
      TileLogitsImpl(kt, hd, q, q_stride, num_rows, scale, logits + start + t0, ld, width);
    }
  }
}

void MaskedSoftmaxRows(float* logits, int64_t num_rows, int64_t n, int64_t ld,
                       const uint8_t* mask, const int64_t* row_len) {
  for (int64_t r = 0; r < num_rows; ++r) {
    float* x = logits + r * ld;
    const int64_t len = row_len == nullptr ? n : std::clamp<int64_t>(row_len[r], 0, n);
    std::fill(x + len, x + n, 0.0f);
    const float m = MaxOver(x, mask, len);
    if (m == -std::numeric_limits<float>::infinity()) {
      std::fill(x, x + len, 0.0f);
      continue;
    }
    const float sum = ExpShiftMasked(x, mask, m, len);
    Scale(x, 1.0f / sum, len);
  }
}

void FuseRows(const float* rows, int64_t num_rows, int64_t group, int64_t n, int64_t ld,
              bool max_fusion, float* scores) {
  std::fill(scores, scores + n, 0.0f);
  // Probabilities are >= 0, so 0 is the identity of both max and sum here;
  // `group_max` holds one group's reduction.
  alignas(64) float group_max[256];
  for (int64_t j0 = 0; j0 < n; j0 += 256) {
    const int64_t w = std::min<int64_t>(256, n - j0);
    for (int64_t g = 0; g < num_rows; g += group) {
      std::memcpy(group_max, rows + g * ld + j0, w * sizeof(float));
      for (int64_t r = g + 1; r < std::min(g + group, num_rows); ++r) {
        MaxInto(group_max, rows + r * ld + j0, w);
      }
      if (max_fusion) {
        MaxInto(scores + j0, group_max, w);
      } else {
        AddInto(scores + j0, group_max, w);
      }
    }
  }
}

}  // namespace morphserve::kernels
