// Kernels that KV eviction policies score cached tokens with: query-key
// logits against one KV head's paged keys, softmax restricted to a set of
// slots, and the fusion of several rows into one score per slot.
//
// Layout as in paged_attention.h: per layer [block][kv_head][slot][head_dim],
// f32, addressed through a block table.
#ifndef MORPHSERVE_KERNELS_CPU_KV_SCORING_H_
#define MORPHSERVE_KERNELS_CPU_KV_SCORING_H_

#include <cstdint>

namespace morphserve::kernels {

struct PagedKeys {
  const float* k_cache = nullptr;
  const int32_t* block_table = nullptr;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t kv_head = 0;
  int64_t head_dim = 0;  // at most kMaxHeadDim
  int64_t num_slots = 0;  // slots [0, num_slots) are read
};

// logits[r * ld + j] = scale * q_r . key(slot j) for r < num_rows and
// j < num_slots, where q_r = q + r * q_stride.
void PagedKeyLogits(const PagedKeys& keys, const float* q, int64_t q_stride, int64_t num_rows,
                    float scale, float* logits, int64_t ld);

// For each row r: replaces logits[r * ld + j] by the softmax over the slots j
// with mask[j] != 0 and j < row_len[r] (all of [0, n) when row_len is null);
// every other entry becomes 0. A row with no such slot becomes all 0.
void MaskedSoftmaxRows(float* logits, int64_t num_rows, int64_t n, int64_t ld,
                       const uint8_t* mask, const int64_t* row_len);

// Reduces rows to one score per slot. Rows come in consecutive groups of
// `group` (>= 1) which are first reduced by max; the group results are then
// combined by sum (max_fusion false) or max. scores has n entries.
void FuseRows(const float* rows, int64_t num_rows, int64_t group, int64_t n, int64_t ld,
              bool max_fusion, float* scores);

// y[i] = exp(x[i]) to about 2e-7 relative error; 0 below -87.
void Exp(const float* x, float* y, int64_t n);

}  // namespace morphserve::kernels

#endif  // MORPHSERVE_KERNELS_CPU_KV_SCORING_H_
