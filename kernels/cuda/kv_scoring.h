// MorphKV's per-step victim choice on the GPU, for a batch of sequences and
// every KV head of one layer: the GPU counterpart of what the CPU path does
// with kernels/cpu/kv_scoring.h in KvSequence (MorphKvRows, MorphKvFuse),
// for either aggregation of a KV group's G = num_heads / num_kv_heads query
// heads.
//
// For sequence s and KV head h, with the next token at t = recent_from[s] +
// W and the window's queries in a ring of W rows (position p in row p % W,
// so the ring holds t-W .. t-1):
//   1. the score rows:
//      group-logit-sum (default): W rows, one per ring row, each with the
//        query Q_r = sum of the G query heads of h (bf16, summed in f32), so
//        its logit against slot j is scale * Q_r . K_j, the sum of the
//        group's logits;
//      group-max-prob: (W-1) * G rows, one per query head of h in each of
//        the newest W-1 ring rows (t-W+1 .. t-1; the ring row of t-W is
//        never read), each with that head's own query q, so its logit is
//        scale * q . K_j;
//   2. a softmax per row over the candidate slots only: j < num_slots[s]
//      whose position p has sinks <= p < recent_from[s];
//   3. group-max-prob only: per ring row, the largest of its G heads'
//      probabilities;
//   4. the (ring) rows fused per candidate by sum or max;
//   5. the victim is the candidate with the lowest fused score, the smaller
//      position on a tie (the older token goes first).
// That victim is the steady-state choice, one eviction per step; the first
// selection, which keeps the best C+1-W candidates at once, ranks the
// scores instead. Both fusions are symmetric in the rows, so their order
// does not matter. With W = 1, group-max-prob has no rows: every candidate
// scores 0 and the oldest goes.
//
// Slots are split into partitions of kScoringPartitionSize, each scored by
// its own thread block, in three kernels:
//   a. per partition and score row: the largest logit and the sum of
//      exp(logit - that maximum) over the partition's candidates;
//   b. per partition: the global per-row maximum M_r and denominator
//      Z_r = sum over partitions of sum_p * exp(max_p - M_r), from a's
//      results; then the logits again (keys re-read, mostly from L2, rather
//      than a logit per row and slot kept in memory), probabilities
//      exp(logit - M_r) / Z_r, for group-max-prob reduced by max over each
//      ring row's heads, fused over the rows, and the partition's lowest
//      candidate;
//   c. per (sequence, KV head): the lowest of the partitions' candidates.
// A softmax row needs every partition's denominator before any probability
// is final, hence the split between a and b.
//
// In steady state pass a runs inside the decode attention instead
// (PagedAttention with MorphKvFusedStats, paged_attention.h): the
// attention's thread blocks stream exactly the keys pass a reads, so each
// block scores its partition right after attending over it, with the keys
// still in the caches, and MorphKvSelectVictimsFromStats runs b and c on
// what it left. That saves one of the three passes over the keys per step
// and a launch per layer.
//
// Device pointers; work is queued on `stream` and the returned status covers
// argument checks and the launches. The engine thread owns the scratch.
#ifndef MORPHSERVE_KERNELS_CUDA_KV_SCORING_H_
#define MORPHSERVE_KERNELS_CUDA_KV_SCORING_H_

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace morphserve::kernels::cuda {

// Cache slots scored by one thread block.
inline constexpr int64_t kScoringPartitionSize = 256;

struct MorphKvScoringArgs {
  // One layer's key cache, [block][kv_head][slot][head_dim] bf16, 16-byte
  // aligned.
  const __nv_bfloat16* k_cache = nullptr;
  // int32 [num_seqs][block_table_stride], as in PagedAttentionArgs.
  const int32_t* block_tables = nullptr;
  int64_t block_table_stride = 0;
  // int32 [num_seqs]: sequence s holds slots [0, num_slots[s]) (cut to
  // max_slots). num_slots[s] <= 0: the sequence is left alone (it evicts
  // nothing in this launch); nothing of it is written, neither victims nor
  // scores, so another launch may fill its entries of the same arrays.
  const int32_t* num_slots = nullptr;
  // int32 [num_seqs]: the first position of the recent window, t - W for
  // the next token t; it and later positions are never candidates.
  const int32_t* recent_from = nullptr;
  // int32 [num_seqs][num_kv_heads][positions_stride]: the position of the
  // token in each slot; null while positions equal slots (before the first
  // eviction).
  const int32_t* positions = nullptr;
  int64_t positions_stride = 0;
  // Positions below this are never candidates (0 for MorphKV).
  int64_t sinks = 0;
  // Host-side bound on num_slots; it sets the launch shape and the scratch.
  int64_t max_slots = 0;
  int64_t num_seqs = 0;
  int64_t block_size = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;  // divides num_heads
  int64_t head_dim = 0;      // 64, 128 or 256
  int64_t window = 0;        // W, the query rows per sequence
  bool max_fusion = false;   // fuse rows by max instead of sum
  // The group-max-prob aggregation (per-head rows of the newest W-1 ring
  // rows, max over the group) instead of group-logit-sum; (W-1) * G must
  // not exceed 2^20.
  bool group_max_prob = false;
  float scale = 1.0f;
};

// The score rows per (sequence, KV head): W for group-logit-sum, (W-1) * G
// for group-max-prob.
int64_t MorphKvScoreRows(int64_t num_heads, int64_t num_kv_heads, int64_t window,
                         bool group_max_prob);

// Device scratch for these sizes (never 0), as in MorphKvScoringArgs: it
// grows with the score rows per (sequence, KV head), W for group-logit-sum
// and (W-1) * num_heads / num_kv_heads for group-max-prob.
size_t MorphKvScoringScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t window, int64_t max_slots, bool group_max_prob);
// The same for group-logit-sum, which needs no head count.
size_t MorphKvScoringScratchBytes(int64_t num_seqs, int64_t num_kv_heads, int64_t window,
                                  int64_t max_slots);

// victims[s * num_kv_heads + h]: the slot to evict for sequence s and KV
// head h, or -1 when it has slots but no candidate; left as it was when
// num_slots[s] <= 0. q: the rings, bf16; ring row r of sequence s is
// [num_heads][head_dim] at q + s * q_seq_stride + r * q_row_stride. scores,
// when not null: f32 [num_seqs][num_kv_heads][scores_stride], the fused
// score of every slot below num_slots[s] (0 for a non-candidate, as on the
// CPU), for the first selection's ranking and for tests. scratch:
// MorphKvScoringScratchBytes() bytes of device memory, 16-byte aligned.
absl::Status MorphKvSelectVictims(const MorphKvScoringArgs& args, const __nv_bfloat16* q,
                                  int64_t q_seq_stride, int64_t q_row_stride, int32_t* victims,
                                  float* scores, int64_t scores_stride, void* scratch,
                                  cudaStream_t stream);

// Cache slots per partition of the statistics PagedAttention gathers: its
// own partition size (kPartitionSize in paged_attention.h).
inline constexpr int64_t kFusedStatsPartitionSize = 512;

// Pass a run by PagedAttention for some of the sequences it attends to, all
// under the same scoring settings; their scoring indices s (0 <=
// s < num_scored) index recent_from, positions, the rings and the
// statistics. A scored sequence's attention context must be exactly the
// slots it scores: MorphKvSelectVictimsFromStats's num_slots[s].
struct MorphKvFusedStats {
  // int32 [attention num_seqs]: the scoring index of each attended
  // sequence, or -1 for one not scored.
  const int32_t* scored_as = nullptr;
  // int32 [num_scored] and the positions, as in MorphKvScoringArgs.
  const int32_t* recent_from = nullptr;
  const int32_t* positions = nullptr;
  int64_t positions_stride = 0;
  int64_t sinks = 0;
  // The rings, as for MorphKvSelectVictims: ring row r of index s at q +
  // s * q_seq_stride + r * q_row_stride.
  const __nv_bfloat16* q = nullptr;
  int64_t q_seq_stride = 0;
  int64_t q_row_stride = 0;
  int64_t window = 0;
  bool group_max_prob = false;
  int64_t num_scored = 0;
  // Bound on a scored sequence's context (its slots past it are not
  // scored), as MorphKvSelectVictimsFromStats's max_slots.
  int64_t max_slots = 0;
  // MorphKvFusedStatsBytes() bytes of device memory, 16-byte aligned.
  float* stats = nullptr;
};

size_t MorphKvFusedStatsBytes(int64_t num_scored, int64_t num_heads, int64_t num_kv_heads,
                              int64_t window, int64_t max_slots, bool group_max_prob);

// The argument checks PagedAttention runs on `stats` before its launch.
absl::Status CheckFusedStats(const MorphKvFusedStats& stats, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim);

// MorphKvSelectVictims with pass a taken from PagedAttention's `stats`
// (same stream, queued before): args and the rings as for
// MorphKvSelectVictims, with num_seqs, max_slots, window, aggregation and
// sinks as in the MorphKvFusedStats the attention ran with. scratch:
// MorphKvScoringScratchBytes() bytes, 16-byte aligned.
absl::Status MorphKvSelectVictimsFromStats(const MorphKvScoringArgs& args, const __nv_bfloat16* q,
                                           int64_t q_seq_stride, int64_t q_row_stride,
                                           const float* stats, int32_t* victims, float* scores,
                                           int64_t scores_stride, void* scratch,
                                           cudaStream_t stream);

}  // namespace morphserve::kernels::cuda

#endif  // MORPHSERVE_KERNELS_CUDA_KV_SCORING_H_
