// Prefill attention on the GPU: causal attention of a batch of prompt
// chunks, several query tokens per sequence, over each sequence's paged K/V
// cache.
//
// A step's chunk of sequence s holds the query tokens at cache slots
// chunk_starts[s], chunk_starts[s] + 1, ...; their keys and values are
// already in the cache (WritePagedKv runs first), so query token i of the
// chunk attends to slots [0, chunk_starts[s] + i + 1): the earlier chunks
// of its prompt and its own chunk up to itself.
//
// Cache layout as on the CPU (kernels/cpu/paged_attention.h), in bf16:
// [block][kv_head][slot][head_dim], addressed through each sequence's block
// table. Tiled in the manner of FlashAttention: a thread block takes 64
// query rows of one sequence and KV head (the rows of a chunk are its tokens
// times the query heads sharing that KV head, so each key and value tile is
// read once for the whole group) and streams the keys up to its last token
// through shared memory, with tensor-core products in f32 and an online
// softmax; key tiles past a row's own token are masked, and past the tile's
// last token never read.
//
// Device pointers; work is queued on `stream` and the returned status covers
// argument checks and the launch. No scratch memory.
#ifndef MORPHSERVE_KERNELS_CUDA_PREFILL_ATTENTION_H_
#define MORPHSERVE_KERNELS_CUDA_PREFILL_ATTENTION_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"

namespace morphserve::kernels::cuda {

struct PrefillAttentionArgs {
  // One layer's caches, 16-byte aligned.
  const __nv_bfloat16* k_cache = nullptr;
  const __nv_bfloat16* v_cache = nullptr;
  // int32 [num_seqs][block_table_stride]: sequence s's slot i lives in block
  // block_tables[s * block_table_stride + i / block_size]. The caller checks
  // that the blocks its chunks reach lie in the pool.
  const int32_t* block_tables = nullptr;
  int64_t block_table_stride = 0;
  // int32 [num_seqs + 1], non-decreasing: sequence s's query tokens are rows
  // [query_offsets[s], query_offsets[s + 1]) of q and out.
  const int32_t* query_offsets = nullptr;
  // int32 [num_seqs], >= 0: the cache slot of sequence s's first query token
  // (how many of its tokens earlier steps cached).
  const int32_t* chunk_starts = nullptr;
  // Host-side bound on the chunk lengths (longer chunks are cut to it: their
  // later tokens are left unwritten); it sets the launch shape, so passing
  // the step's token budget keeps that shape fixed from step to step (tiles
  // past a sequence's chunk return at once).
  int64_t max_query_len = 0;
  int64_t num_seqs = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // divides num_heads
  int64_t head_dim = 0;      // 64, 128 or 256
  float scale = 1.0f;
};

// out[t][h] = softmax(q[t][h] . K^T * scale) V over the slots query token t
// attends to, for every query token t of every sequence and query head h,
// whose KV head is h / (num_heads / num_kv_heads). q: bf16, token t's
// [num_heads][head_dim] at q + t * q_stride (a slice of a fused QKV product
// is fine), 16-byte aligned with q_stride a multiple of 8; out: bf16
// [query_offsets[num_seqs]][num_heads][head_dim], 4-byte aligned.
absl::Status PrefillAttention(const PrefillAttentionArgs& args, const __nv_bfloat16* q,
                              int64_t q_stride, __nv_bfloat16* out, cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_PREFILL_ATTENTION_H_
