// Attention of one query token over a sequence's paged K/V cache.
//
// Cache layout per layer: [block][kv_head][slot][head_dim] (f32), addressed
// through the sequence's block table. Computed with an online softmax one
// block at a time, so no buffer grows with the context.
#ifndef MORPHSERVE_KERNELS_CPU_PAGED_ATTENTION_H_
#define MORPHSERVE_KERNELS_CPU_PAGED_ATTENTION_H_

#include <cstdint>

namespace morphserve::kernels {

struct PagedAttentionArgs {
  const float* k_cache = nullptr;
  const float* v_cache = nullptr;
  const int32_t* block_table = nullptr;
  int64_t context_len = 0;  // attend to cache slots [0, context_len)
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // at most kMaxHeadDim
  float scale = 1.0f;
};

inline constexpr int64_t kMaxHeadDim = 512;

// out[head_dim] = softmax(q . K^T * scale) V for query head `head`, whose KV
// head is head / (num_heads / num_kv_heads).
void PagedAttentionHead(const PagedAttentionArgs& args, const float* q, int64_t head,
                        float* out);

// The same for all query heads of KV head `kv_head` at once (the group of
// num_heads / num_kv_heads heads starting at kv_head * group): q and out are
// [group][head_dim]. Each key and value is read once for the group, and 16
// keys at a time are scored with vectorised multiply-adds and exp.
void PagedAttentionGroup(const PagedAttentionArgs& args, const float* q, int64_t kv_head,
                         float* out);

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_PAGED_ATTENTION_H_
