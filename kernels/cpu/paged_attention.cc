#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/cpu/tile_internal.h"

namespace morphserve::kernels {
namespace {

MORPHSERVE_SIMD_CLONES
float Dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

MORPHSERVE_SIMD_CLONES
void ScaleAdd(float* acc, float scale, const float* v, float p, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] = acc[i] * scale + p * v[i];
}

// acc[g] = acc[g] * correction[g] + sum_j p[g][j] v_j over a tile of
// `width` values (v_j = v + j * head_dim).
MORPHSERVE_SIMD_CLONES
void AccumulateTile(float* acc, const float* correction, const float* p, int64_t group,
                    const float* v, int64_t width, int64_t head_dim) {
  for (int64_t g = 0; g < group; ++g) {
    float* a = acc + g * head_dim;
    const float c = correction[g];
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) a[d] *= c;
    for (int64_t j = 0; j < width; ++j) {
      const float pj = p[g * internal::kTile + j];
      const float* vj = v + j * head_dim;
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) a[d] += pj * vj[d];
    }
  }
}

// s[j] = exp(s[j] - m) for the tile's `width` entries; returns their sum.
MORPHSERVE_SIMD_CLONES
float ExpTile(float* s, float m, int64_t width) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < internal::kTile; ++j) {
    const float e = j < width ? internal::ExpApprox(s[j] - m) : 0.0f;
    s[j] = e;
    sum += e;
  }
  return sum;
}

}  // namespace

void PagedAttentionGroup(const PagedAttentionArgs& a, const float* q, int64_t kv_head,
                         float* out) {
  constexpr int64_t kMaxGroup = 16;
  const int64_t hd = a.head_dim;
  const int64_t group = a.num_heads / a.num_kv_heads;
  if (group > kMaxGroup) {
    for (int64_t g = 0; g < group; ++g) {
      PagedAttentionHead(a, q + g * hd, kv_head * group + g, out + g * hd);
    }
    return;
  }
  alignas(64) float kt[kMaxHeadDim * internal::kTile];
  alignas(64) float s[kMaxGroup * internal::kTile];
  float acc[kMaxGroup * kMaxHeadDim];
  float running_max[kMaxGroup], running_sum[kMaxGroup], correction[kMaxGroup];
  std::fill(acc, acc + group * hd, 0.0f);
  std::fill(running_max, running_max + group, -std::numeric_limits<float>::infinity());
  std::fill(running_sum, running_sum + group, 0.0f);
  for (int64_t start = 0; start < a.context_len; start += a.block_size) {
    const int64_t n = std::min(a.block_size, a.context_len - start);
    const int64_t block = a.block_table[start / a.block_size];
    const int64_t base = ((block * a.num_kv_heads + kv_head) * a.block_size) * hd;
    for (int64_t t0 = 0; t0 < n; t0 += internal::kTile) {
      const int64_t width = std::min(internal::kTile, n - t0);
      internal::TransposeTile(a.k_cache + base + t0 * hd, width, hd, kt);
      internal::TileLogits(kt, hd, q, hd, group, a.scale, s, internal::kTile, width);
      for (int64_t g = 0; g < group; ++g) {
        float* sg = s + g * internal::kTile;
        float tile_max = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < width; ++j) tile_max = std::max(tile_max, sg[j]);
        const float new_max = std::max(running_max[g], tile_max);
        correction[g] = std::exp(running_max[g] - new_max);
        running_sum[g] = running_sum[g] * correction[g] + ExpTile(sg, new_max, width);
        running_max[g] = new_max;
      }
      AccumulateTile(acc, correction, s, group, a.v_cache + base + t0 * hd, width, hd);
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    const float inv = running_sum[g] > 0.0f ? 1.0f / running_sum[g] : 0.0f;
    for (int64_t d = 0; d < hd; ++d) out[g * hd + d] = acc[g * hd + d] * inv;
  }
}

void PagedAttentionHead(const PagedAttentionArgs& a, const float* q, int64_t head, float* out) {
  const int64_t hd = a.head_dim;
  const int64_t kv_head = head / (a.num_heads / a.num_kv_heads);
  float acc[kMaxHeadDim];
  float scores[256];
  std::fill(acc, acc + hd, 0.0f);
  float running_max = -std::numeric_limits<float>::infinity();
  float running_sum = 0.0f;

  for (int64_t start = 0; start < a.context_len; start += a.block_size) {
    const int64_t n = std::min(a.block_size, a.context_len - start);
    const int64_t block = a.block_table[start / a.block_size];
    const int64_t base = ((block * a.num_kv_heads + kv_head) * a.block_size) * hd;
    const float* k = a.k_cache + base;
    const float* v = a.v_cache + base;
    // Blocks larger than the scores buffer are taken in chunks of 256.
    for (int64_t c0 = 0; c0 < n; c0 += 256) {
      const int64_t cn = std::min<int64_t>(256, n - c0);
      float chunk_max = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < cn; ++j) {
        scores[j] = Dot(q, k + (c0 + j) * hd, hd) * a.scale;
        chunk_max = std::max(chunk_max, scores[j]);
      }
      const float new_max = std::max(running_max, chunk_max);
      // Rescale what was accumulated under the old maximum once per chunk.
      float correction = std::exp(running_max - new_max);
      running_sum *= correction;
      for (int64_t j = 0; j < cn; ++j) {
        const float p = std::exp(scores[j] - new_max);
        running_sum += p;
        ScaleAdd(acc, correction, v + (c0 + j) * hd, p, hd);
        correction = 1.0f;
      }
      running_max = new_max;
    }
  }
  const float inv = running_sum > 0.0f ? 1.0f / running_sum : 0.0f;
  for (int64_t d = 0; d < hd; ++d) out[d] = acc[d] * inv;
}

}  // namespace morphserve::kernels
