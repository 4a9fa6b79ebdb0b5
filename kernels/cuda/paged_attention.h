// Decode attention on the GPU: one query token per sequence over that
// sequence's paged K/V cache, for a batch of sequences.
//
// Cache layout as on the CPU (kernels/cpu/paged_attention.h), in bf16:
// [block][kv_head][slot][head_dim], addressed through each sequence's block
// table. Scores, softmax and the weighted sum are f32. A context longer than
// one partition (kPartitionSize slots) is split into partitions scored by
// separate thread blocks, whose results a second kernel combines with their
// softmax statistics; when every context fits one partition a single kernel
// writes the output.
//
// With MorphKvFusedStats it also runs the first pass of MorphKV's scoring
// (kv_scoring.h) for the sequences given a scoring index, each thread block
// over the keys of the partition it has just attended to, so that the
// victims need only MorphKvSelectVictimsFromStats afterwards.
//
// Device pointers; work is queued on `stream` and the returned status covers
// argument checks and the launches. The engine thread owns the scratch.
#ifndef MORPHSERVE_KERNELS_CUDA_PAGED_ATTENTION_H_
#define MORPHSERVE_KERNELS_CUDA_PAGED_ATTENTION_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/kv_scoring.h"

namespace morphserve::kernels::cuda {

// Cache slots scored by one thread block.
inline constexpr int64_t kPartitionSize = 512;

struct PagedAttentionArgs {
  // One layer's caches, 16-byte aligned.
  const __nv_bfloat16* k_cache = nullptr;
  const __nv_bfloat16* v_cache = nullptr;
  // int32 [num_seqs][block_table_stride]: sequence s's slot i lives in block
  // block_tables[s * block_table_stride + i / block_size]. The caller checks
  // that the blocks its contexts reach lie in the pool.
  const int32_t* block_tables = nullptr;
  int64_t block_table_stride = 0;
  // int32 [num_seqs]: sequence s attends to its slots [0, context_lens[s]).
  const int32_t* context_lens = nullptr;
  // Host-side bound on context_lens (longer contexts are cut to it); it sets
  // the launch shape, so passing the largest context the pool allows keeps
  // that shape fixed from step to step (partitions past a sequence's
  // context return at once).
  int64_t max_context_len = 0;
  int64_t num_seqs = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // divides num_heads
  int64_t head_dim = 0;      // 64, 128 or 256
  float scale = 1.0f;
};

// Device scratch the split path needs for these sizes; 0 when
// max_context_len fits one partition.
size_t PagedAttentionScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t head_dim,
                                  int64_t max_context_len);

// out[s][h] = softmax(q[s][h] . K_s^T * scale) V_s for every sequence s and
// query head h, whose KV head is h / (num_heads / num_kv_heads). An empty
// context gives zeros. q: bf16, sequence s's [num_heads][head_dim] at
// q + s * q_stride (a slice of a fused QKV product is fine); out: bf16
// [num_seqs][num_heads][head_dim]; scratch: PagedAttentionScratchBytes()
// bytes of device memory, 16-byte aligned (null when that is 0). stats, when
// not null: MorphKV's pass a for the sequences it scores, with the
// attention's scale, into stats->stats; the attention output is the same
// with or without it.
absl::Status PagedAttention(const PagedAttentionArgs& args, const __nv_bfloat16* q,
                            int64_t q_stride, __nv_bfloat16* out, void* scratch,
                            cudaStream_t stream, const MorphKvFusedStats* stats = nullptr);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_PAGED_ATTENTION_H_
