// The GPU side of the KV policies other than MorphKV's per-step scoring
// (kv_scoring.h), for a batch of sequences and one layer per call: what
// KvSequence (engine/kv/kv_sequence.h) does on the CPU with
// kernels/cpu/kv_scoring.h.
//
//   - H2oAccumulate: H2O's running score, the step's attention
//     probabilities added per cache slot;
//   - SelectLowestCandidates: the steady-state victim of H2O (its running
//     score) and of streaming (no score: the oldest candidate);
//   - SnapKvScores: SnapKV's pooled prompt scores;
//   - SelectKeepLists and CompactKv: the first selection of every dropping
//     policy (MorphKV, H2O and streaming after a long prompt, SnapKV once),
//     ranked on the device, then the kept tokens gathered into the lowest
//     slots;
//   - PushQueryRing: the query ring that MorphKV and SnapKV score with.
//
// Per (sequence, KV head): sequence s's cache slot i lives in block
// block_tables[s * block_table_stride + i / block_size]; one layer's cache is
// [block][kv_head][slot][head_dim] bf16. Every KV head of a sequence holds
// the same number of slots, but (after the first selection) different
// tokens: positions, when given, are int32 [num_seqs][num_kv_heads]
// [positions_stride], the original position of each slot's token, and null
// means slot == position (before the first selection). Candidates, where a
// kernel has them, are as in KvSequence::BuildCandidateMask: the slots
// j < num_slots[s] whose position p has sinks <= p < recent_from[s].
// Ties between scores go the way KvSequence breaks them: the older token is
// evicted first, the newer one kept.
//
// Per policy, at the end of a step that leaves t tokens written (C, W, S as
// in KvPolicyConfig; "victims" feed the next step's slot mapping):
//   H2O, every step: H2oAccumulate (reset_slots: the victims the step's
//     token overwrote, or null), then once t >= C+1 and the prompt is
//     complete either SelectKeepLists (first time: recent_from t - W, keep
//     C+1-W, scores the running scores) and CompactKv (with the scores), or
//     SelectLowestCandidates (after: same recent_from and scores);
//   streaming: the same without scores, keep C+1-W-S, sinks S;
//   MorphKV's first selection: SelectKeepLists on MorphKvSelectVictims'
//     scores (keep C+1-W), then CompactKv;
//   SnapKV, once after the prompt if L > C: SnapKvScores, SelectKeepLists
//     (recent_from L - kSnapKvObservationWindow, keep C -
//     kSnapKvObservationWindow; its victims unused), CompactKv.
// The query ring that PushQueryRing fills is also the q of
// MorphKvSelectVictims (q_seq_stride = ring_seq_stride, q_row_stride =
// ring_row_stride, ring_size = W): its fusions ignore the row order.
//
// Device pointers; work is queued on `stream` and the returned status covers
// argument checks and the launches. Sizes that set a launch shape or the
// scratch (max_slots, max_tokens) are host-side bounds; device-side counts
// above them are cut to them. No call allocates; the engine thread owns the
// scratch.
#ifndef MORPHSERVE_KERNELS_CUDA_KV_POLICY_H_
#define MORPHSERVE_KERNELS_CUDA_KV_POLICY_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "common/kv_policy.h"

namespace morphserve::kernels::cuda {

// Cache slots handled by one thread block of the softmax kernels.
inline constexpr int64_t kPolicyPartitionSize = 256;

// ---------------------------------------------------------------------------
// H2O.

struct H2oAccumulateArgs {
  // One layer's key cache, 16-byte aligned.
  const __nv_bfloat16* k_cache = nullptr;
  const int32_t* block_tables = nullptr;  // int32 [num_seqs][block_table_stride]
  int64_t block_table_stride = 0;
  // int32 [num_seqs]: the slots sequence s holds once this step's tokens are
  // written (KvSequence::ContextSlots of the step's last token); 0 for a
  // sequence to leave alone.
  const int32_t* num_slots = nullptr;
  // int32 [num_seqs + 1]: sequence s's n_s = query_start[s + 1] -
  // query_start[s] tokens of this step are rows query_start[s] .. of q.
  const int32_t* query_start = nullptr;
  // int32 [num_seqs][num_kv_heads], or null: the slot whose score restarts
  // from 0 before this step's probabilities are added (the victim that this
  // step's token overwrote; -1 for none).
  const int32_t* reset_slots = nullptr;
  int64_t max_slots = 0;   // bound on num_slots
  int64_t max_tokens = 0;  // bound on n_s; sets the scratch
  int64_t num_seqs = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // divides num_heads
  int64_t head_dim = 0;      // 64, 128 or 256
  float scale = 1.0f;
};

// Device scratch for these sizes (never 0).
size_t H2oAccumulateScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t max_tokens,
                                 int64_t max_slots);

// For sequence s and KV head h with G = num_heads / num_kv_heads, token i of
// the step (i < n_s) and query head g of h's group: the row
// softmax_j(scale * q_{i,g} . K_j) over the slots j < row_len_i =
// num_slots[s] - n_s + i + 1 (causal while a prompt is written, every slot
// for a decode token), 0 past it. These n_s * G rows are summed per slot
// and ADDED to scores[(s * num_kv_heads + h) * scores_stride + j] for
// j < num_slots[s] (after zeroing the reset slot); other entries are left
// alone. q: bf16, token i of sequence s is [num_heads][head_dim] at
// q + (query_start[s] + i) * q_stride (a slice of a fused QKV product is
// fine). scratch: H2oAccumulateScratchBytes() bytes, 16-byte aligned.
absl::Status H2oAccumulate(const H2oAccumulateArgs& args, const __nv_bfloat16* q, int64_t q_stride,
                           float* scores, int64_t scores_stride, void* scratch,
                           cudaStream_t stream);

// ---------------------------------------------------------------------------
// Candidates: the steady-state victim, and the first selection's ranking.

struct CandidateArgs {
  // int32 [num_seqs]: slots [0, num_slots[s]) are held. num_slots[s] <= 0:
  // the sequence is left alone; nothing of it is written, except
  // SelectKeepLists' keep_counts -1. So one launch may serve some
  // sequences of a batch and another launch the rest, into the same
  // victims.
  const int32_t* num_slots = nullptr;
  // int32 [num_seqs]: the first position of the recent window, which is
  // never a candidate (t - W for the next token t; SnapKV: L - its window).
  const int32_t* recent_from = nullptr;
  const int32_t* positions = nullptr;  // see the top; null: slot == position
  int64_t positions_stride = 0;
  int64_t sinks = 0;  // positions below are never candidates (streaming's S)
  int64_t max_slots = 0;
  int64_t num_seqs = 0;
  int64_t num_kv_heads = 0;
};

// victims[s * num_kv_heads + h]: the candidate slot with the lowest score,
// the smaller position on a tie; -1 when sequence s has slots but no
// candidate; left as it was when num_slots[s] <= 0. scores: f32
// [num_seqs][num_kv_heads][scores_stride], or null for all-equal scores (the
// oldest candidate goes: streaming).
absl::Status SelectLowestCandidates(const CandidateArgs& args, const float* scores,
                                    int64_t scores_stride, int32_t* victims, cudaStream_t stream);

// The first selection for sequence s and KV head h: of the candidates, the
// best keep[s] are kept (higher score first, the larger position on a tie),
// and every non-candidate (the recent window, sinks) is kept too.
//   keep_lists[(s * num_kv_heads + h) * keep_stride + i], i < keep_counts[s *
//     num_kv_heads + h]: the kept slots, ascending;
//   victims (may be null): the index in that list of the lowest kept
//     candidate, which is the slot the next token overwrites; -1 when no
//     candidate is kept.
// A sequence with num_slots[s] <= 0 gets keep_counts -1 (CompactKv skips
// it) and nothing else: its victims and keep lists are left as they were.
// Scores as in SelectLowestCandidates (null ranks by position: streaming
// keeps its newest candidates). The ranking is exact (a radix select on
// (score, position)), one thread block per (s, h).
absl::Status SelectKeepLists(const CandidateArgs& args, const int32_t* keep, const float* scores,
                             int64_t scores_stride, int32_t* keep_lists, int64_t keep_stride,
                             int32_t* keep_counts, int32_t* victims, cudaStream_t stream);

struct CompactKvArgs {
  // One layer's caches, 16-byte aligned.
  __nv_bfloat16* k_cache = nullptr;
  __nv_bfloat16* v_cache = nullptr;
  const int32_t* block_tables = nullptr;
  int64_t block_table_stride = 0;
  int64_t max_slots = 0;  // bound on keep counts; sets what is cleared
  int64_t num_seqs = 0;
  int64_t block_size = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;  // a multiple of 8
};

// KvSequence::Compact for every (s, h) with keep_counts[s][h] = n >= 0
// (a negative count leaves it alone): K and V of slot keep_lists[..][i] move
// to slot i for i < n, in place in the same block table; positions_out[i]
// becomes the position of the token moved (positions_in, or the slot when
// positions_in is null; positions_in may equal positions_out) and -1 for
// n <= i < max_slots; when `scores` is not null (H2O's running score,
// [s][h][scores_stride]) it moves with the tokens and becomes 0 for
// n <= i < max_slots. Keep lists are strictly ascending, so a row only
// moves down; one thread block per (s, h) moves them in rounds that read
// every source before writing any destination, and a later round's
// sources lie above every earlier destination. Nothing past slot n - 1 of
// the cache is written: the caller frees the blocks beyond.
absl::Status CompactKv(const CompactKvArgs& args, const int32_t* keep_lists, int64_t keep_stride,
                       const int32_t* keep_counts, const int32_t* positions_in,
                       int32_t* positions_out, int64_t positions_stride, float* scores,
                       int64_t scores_stride, cudaStream_t stream);

// ---------------------------------------------------------------------------
// SnapKV and the query ring.

struct SnapKvScoresArgs {
  // One layer's key cache, 16-byte aligned; the prompt is held whole, slot
  // == position.
  const __nv_bfloat16* k_cache = nullptr;
  const int32_t* block_tables = nullptr;
  int64_t block_table_stride = 0;
  // int32 [num_seqs]: the prompt length L_s; a sequence with L_s <= window
  // is left alone.
  const int32_t* num_tokens = nullptr;
  int64_t max_slots = 0;  // bound on L_s
  int64_t num_seqs = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;                   // divides num_heads
  int64_t head_dim = 0;                       // 64, 128 or 256
  int64_t window = kSnapKvObservationWindow;  // at most the ring's size
  int64_t ring_size = kSnapKvObservationWindow;
  float scale = 1.0f;
};

// Device scratch for these sizes (never 0).
size_t SnapKvScoresScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                int64_t window, int64_t max_slots);

// KvSequence::SnapKvSelect's scores, for sequence s and KV head h: the query
// rows of positions p = L - window .. L - 1 (every head of h's group; held in
// the ring at ring + s * ring_seq_stride + (p % ring_size) * ring_row_stride,
// [num_heads][head_dim] bf16) against keys [0, p + 1), softmax per row,
// summed over rows and heads into a per-slot score; then the average pool
// (kSnapKvPoolKernel wide, stride 1, zero padding counted) over the prefix
// [0, L - window): pooled[(s * num_kv_heads + h) * pooled_stride + j] for
// j < L - window, the rest left alone. Rank them with SelectKeepLists
// (recent_from = L - window, keep = C - window). scratch:
// SnapKvScoresScratchBytes() bytes, 16-byte aligned.
absl::Status SnapKvScores(const SnapKvScoresArgs& args, const __nv_bfloat16* ring,
                          int64_t ring_seq_stride, int64_t ring_row_stride, float* pooled,
                          int64_t pooled_stride, void* scratch, cudaStream_t stream);

// Copies this step's query rows into each sequence's ring: token i of
// sequence s (row query_start[s] + i of q, q_stride apart; n_s as in
// H2oAccumulateArgs), at position num_tokens[s] + i, goes to
// ring + s * ring_seq_stride + ((num_tokens[s] + i) % ring_size) *
// ring_row_stride, num_heads * head_dim bf16; only the last ring_size tokens
// of a step are copied (the earlier ones would be overwritten).
// num_tokens: int32 [num_seqs], the position of each sequence's first token
// this step. Pointers 16-byte aligned, strides and the row multiples of 8.
absl::Status PushQueryRing(const __nv_bfloat16* q, int64_t q_stride, const int32_t* query_start,
                           const int32_t* num_tokens, int64_t num_seqs, int64_t max_tokens,
                           int64_t row_elems, __nv_bfloat16* ring, int64_t ring_seq_stride,
                           int64_t ring_row_stride, int64_t ring_size, cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_KV_POLICY_H_
