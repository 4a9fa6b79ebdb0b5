#include "kernels/cpu/paged_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace morphserve::kernels {
namespace {

// The inner loops are written for the vectorizer (`omp simd` needs only
// -fopenmp-simd, no OpenMP runtime); target_clones compiles AVX-512, AVX2 and
// baseline versions and picks one at load time.
#define MORPHSERVE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2,fma", "default")))

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

}  // namespace

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
