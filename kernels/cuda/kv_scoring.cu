#include "kernels/cuda/kv_scoring.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/kv_scoring_internal.cuh"
#include "kernels/cuda/paged_cache_internal.cuh"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda {
namespace {

using internal::Aligned16;
using internal::Choice;
using internal::kVec;
using internal::Lower;
using internal::NoChoice;
using internal::Require;
using internal::Rescaled;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / internal::kWarpSize;
constexpr int kPartition = static_cast<int>(kScoringPartitionSize);
// Score rows per pass over a partition's keys (their queries sit in shared
// memory); more rows take several passes.
constexpr int kRowChunk = internal::kScoringRowChunk;
// The most score rows per (sequence, KV head) for group-max-prob.
constexpr int64_t kMaxScoreRows = int64_t{1} << 20;

struct Params {
  const __nv_bfloat16* k_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* num_slots;
  const int32_t* recent_from;
  const int32_t* positions;
  int64_t positions_stride;
  int sinks;
  int max_slots;
  int max_partitions;  // partitions per (sequence, KV head) in the scratch
  // The row statistics' partitions (pass a's, or PagedAttention's when it
  // ran pass a): slots per partition, and partitions per (sequence, KV
  // head) in part_max and part_sum.
  int stats_partition;
  int stats_partitions;
  int block_size;
  int num_kv_heads;
  int group;  // query heads per KV head
  int window;
  // Group-max-prob: score row i * group + g is query head g of the ring
  // row of position t-W+1+i, i < window - 1. Else score row r is ring row r.
  bool per_head;
  int score_rows;  // per (sequence, KV head): window, or (window - 1) * group
  bool max_fusion;
  float scale;
  const __nv_bfloat16* q;
  int64_t q_seq_stride;
  int64_t q_row_stride;
  int32_t* victims;
  float* scores;
  int64_t scores_stride;
  // Indexed by (seq * num_kv_heads + kv_head) * stats_partitions +
  // partition, per score row (times score_rows, plus the row): the
  // partition's largest candidate logit and its sum of exp(logit - that
  // maximum). Then in the scratch, indexed the same with max_partitions: the
  // partition's lowest candidate.
  float* part_max;
  float* part_sum;
  float* best_score;
  int32_t* best_pos;
  int32_t* best_slot;
};

__host__ __device__ __forceinline__ int NumPartitions(int slots, int size = kPartition) {
  return slots <= size ? 1 : (slots + size - 1) / size;
}

__device__ __forceinline__ int NumSlots(const Params& p, int seq) {
  return min(max(p.num_slots[seq], 0), p.max_slots);
}

__device__ __forceinline__ int64_t Unit(const Params& p, int seq, int kv_head) {
  return static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
}

// pos[i]: the position of slot start + i if it is a candidate, else -1.
__device__ __forceinline__ void MarkCandidates(const Params& p, int seq, int kv_head, int start,
                                               int n, int* pos) {
  const int32_t* positions =
      p.positions == nullptr ? nullptr : p.positions + Unit(p, seq, kv_head) * p.positions_stride;
  internal::MarkCandidates<kThreads>(positions, p.recent_from[seq], p.sinks, start, n, pos);
}

__device__ __forceinline__ internal::ScoreRowSource Source(const Params& p, int seq) {
  return internal::MakeScoreRowSource(p.q, p.q_seq_stride, p.q_row_stride, seq, p.group, p.window,
                                      p.per_head, p.recent_from[seq], p.scale);
}

// Rows of the pass-b chunk from score row r0. Group-max-prob takes whole
// ring rows (all G heads), so that their maximum is complete within the
// chunk; a group over kRowChunk heads goes in chunks of one ring row's
// heads instead.
__device__ __forceinline__ int FuseChunkRows(const Params& p, int r0) {
  if (!p.per_head) return min(kRowChunk, p.score_rows - r0);
  if (p.group <= kRowChunk) return min(kRowChunk / p.group * p.group, p.score_rows - r0);
  return min(kRowChunk, p.group - r0 % p.group);
}

__device__ __forceinline__ float Fuse(const Params& p, float a, float b) {
  return p.max_fusion ? fmaxf(a, b) : a + b;
}

// Thread mapping of both scoring kernels. Grid: (partition, KV head,
// sequence). Threads work in rows of kRowThreads consecutive lanes, each
// lane holding 8 of the head_dim values, so one row of threads reads one
// cache row (coalesced) and kRowsAtOnce slots are in flight per block. For
// its slot, a thread row computes the logit of every window row of the
// chunk, reduced by shuffles within the row, so all its lanes end with all
// of them; the per-row work after that is spread over the lanes, lane l
// taking the rows r with r % kRowThreads == l.
template <int kHeadDim>
__device__ __forceinline__ void SlotLogits(const Params& p, const int32_t* table, int kv_head,
                                           int slot, bool valid, int dim0, int rows,
                                           const float (*q)[kHeadDim], float (&logits)[kRowChunk]) {
  const __nv_bfloat16* row = valid ? internal::PagedRow<kHeadDim>(p.k_cache, table, p.block_size,
                                                                  p.num_kv_heads, kv_head, slot)
                                   : nullptr;
  internal::ChunkLogits<kHeadDim>(row, dim0, rows, q, logits);
}

// Pass a: each row's largest logit and exp sum over the partition's
// candidates, kept online per thread row and then combined.
template <int kHeadDim>
__global__ void __launch_bounds__(kThreads) RowStatsKernel(const Params p) {
  constexpr int kRowThreads = kHeadDim / kVec;
  constexpr int kRowsAtOnce = kThreads / kRowThreads;
  static_assert(kRowThreads <= internal::kWarpSize && kThreads % kRowThreads == 0);

  const int partition = static_cast<int>(blockIdx.x);
  const int kv_head = static_cast<int>(blockIdx.y);
  const int seq = static_cast<int>(blockIdx.z);
  const int slots = NumSlots(p, seq);
  // The same for the whole block, so no thread is left waiting at a barrier.
  if (partition >= NumPartitions(slots)) return;
  const int start = partition * kPartition;
  const int n = min(kPartition, slots - start);  // 0 only when there are no slots

  __shared__ __align__(16) float q[kRowChunk][kHeadDim];
  __shared__ int pos[kPartition];
  __shared__ internal::RowStats<kRowsAtOnce> run_max;
  __shared__ internal::RowStats<kRowsAtOnce> run_sum;

  MarkCandidates(p, seq, kv_head, start, n, pos);
  const int64_t stats_at =
      (Unit(p, seq, kv_head) * p.stats_partitions + partition) * static_cast<int64_t>(p.score_rows);
  internal::PartitionRowStats<kHeadDim, kThreads>(
      p.k_cache, p.block_tables + seq * p.block_table_stride, p.block_size, p.num_kv_heads, kv_head,
      start, n, pos, Source(p, seq), p.score_rows, q, run_max, run_sum, p.part_max + stats_at,
      p.part_sum + stats_at);
}

// Pass b: the probabilities under the global per-row softmax, for
// group-max-prob (kPerHead) reduced by max over each ring row's heads,
// fused over the rows; the partition's scores and its lowest candidate.
template <int kHeadDim, bool kPerHead>
__global__ void __launch_bounds__(kThreads) FuseKernel(const Params p) {
  constexpr int kRowThreads = kHeadDim / kVec;
  constexpr int kRowsAtOnce = kThreads / kRowThreads;

  const int partition = static_cast<int>(blockIdx.x);
  const int kv_head = static_cast<int>(blockIdx.y);
  const int seq = static_cast<int>(blockIdx.z);
  const int slots = NumSlots(p, seq);
  if (partition >= NumPartitions(slots)) return;
  const int start = partition * kPartition;
  const int n = min(kPartition, slots - start);
  const int stats_parts = NumPartitions(slots, p.stats_partition);

  __shared__ __align__(16) float q[kRowChunk][kHeadDim];
  __shared__ int pos[kPartition];
  __shared__ float fused[kPartition];
  __shared__ float row_max[kRowChunk];
  __shared__ float row_inv[kRowChunk];
  __shared__ Choice warp_best[kWarps];
  // Group-max-prob: the ring row (counted from the chunk's first) of each
  // chunk row; and per slot the maximum so far of a ring row whose heads
  // span several chunks (groups over kRowChunk).
  __shared__ int ring_row[kPerHead ? kRowChunk : 1];
  __shared__ float carry[kPerHead ? kPartition : 1];

  MarkCandidates(p, seq, kv_head, start, n, pos);
  // Probabilities are >= 0, so 0 is the identity of sum and max alike.
  for (int i = static_cast<int>(threadIdx.x); i < kPartition; i += kThreads) {
    fused[i] = 0.0f;
    if constexpr (kPerHead) carry[i] = 0.0f;
  }
  const int lane_in_row = static_cast<int>(threadIdx.x) % kRowThreads;
  const int row = static_cast<int>(threadIdx.x) / kRowThreads;
  const int dim0 = lane_in_row * kVec;
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int64_t unit = Unit(p, seq, kv_head);
  const int64_t stats_base = unit * p.stats_partitions * p.score_rows;
  const internal::ScoreRowSource source = Source(p, seq);

  for (int r0 = 0; r0 < p.score_rows;) {
    const int rows = FuseChunkRows(p, r0);
    // Group-max-prob with a group over kRowChunk: the chunk is part of one
    // ring row, whose maximum is complete at the chunk that ends it.
    [[maybe_unused]] const bool split = kPerHead && p.group > kRowChunk;
    [[maybe_unused]] const bool ends_ring_row = (r0 + rows) % p.group == 0;
    internal::LoadScoreQueries<kHeadDim, kThreads>(source, kv_head, r0, rows, q);
    for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) {
      const float* maxes = p.part_max + stats_base + r0 + r;
      const float* sums = p.part_sum + stats_base + r0 + r;
      float m = -INFINITY;
      for (int i = 0; i < stats_parts; ++i) m = fmaxf(m, maxes[i * p.score_rows]);
      float z = 0.0f;
      for (int i = 0; i < stats_parts; ++i) {
        z += Rescaled(sums[i * p.score_rows], maxes[i * p.score_rows], m);
      }
      row_max[r] = m;
      row_inv[r] = z > 0.0f ? 1.0f / z : 0.0f;
      // A split chunk spreads its rows over the lanes like the default.
      if constexpr (kPerHead) ring_row[r] = split ? r : r / p.group;
    }
    __syncthreads();
    for (int j0 = 0; j0 < n; j0 += kRowsAtOnce) {
      const int j = j0 + row;
      const bool candidate = j < n && pos[j] >= 0;
      float logits[kRowChunk] = {};
      SlotLogits<kHeadDim>(p, table, kv_head, start + j, j < n, dim0, rows, q, logits);
      // Slot j always falls to the same thread row, so no other thread
      // touches fused[j] or carry[j] until the barrier below.
      if constexpr (!kPerHead) {
        float part = 0.0f;  // this lane's rows
#pragma unroll
        for (int r = 0; r < kRowChunk; ++r) {
          if (candidate && r < rows && r % kRowThreads == lane_in_row) {
            const float prob = internal::Probability(logits[r], row_max[r], row_inv[r]);
            part = p.max_fusion ? fmaxf(part, prob) : part + prob;
          }
        }
        part = p.max_fusion ? internal::WarpMax<kRowThreads>(part)
                            : internal::WarpSum<kRowThreads>(part);
        if (candidate && lane_in_row == 0) {
          fused[j] = p.max_fusion ? fmaxf(fused[j], part) : fused[j] + part;
        }
      } else {
        // Lane l takes the ring rows i with i % kRowThreads == l, all heads
        // of each (consecutive score rows): head_max is the current ring
        // row's maximum, part the fusion of the lane's finished ones.
        float part = 0.0f;
        float head_max = 0.0f;
        int current = 0;
#pragma unroll
        for (int r = 0; r < kRowChunk; ++r) {
          if (candidate && r < rows && ring_row[r] % kRowThreads == lane_in_row) {
            const float prob = internal::Probability(logits[r], row_max[r], row_inv[r]);
            if (!split && ring_row[r] != current) {
              part = Fuse(p, part, head_max);
              head_max = 0.0f;
              current = ring_row[r];
            }
            head_max = fmaxf(head_max, prob);
          }
        }
        if (split) {
          head_max = internal::WarpMax<kRowThreads>(head_max);
          if (candidate && lane_in_row == 0) {
            const float m = fmaxf(carry[j], head_max);
            carry[j] = ends_ring_row ? 0.0f : m;
            if (ends_ring_row) fused[j] = Fuse(p, fused[j], m);
          }
        } else {
          part = Fuse(p, part, head_max);
          part = p.max_fusion ? internal::WarpMax<kRowThreads>(part)
                              : internal::WarpSum<kRowThreads>(part);
          if (candidate && lane_in_row == 0) fused[j] = Fuse(p, fused[j], part);
        }
      }
    }
    __syncthreads();  // q and the row statistics are refilled next chunk
    r0 += rows;
  }

  float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride + start;
  Choice best = NoChoice();
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    const float score = pos[i] >= 0 ? fused[i] : 0.0f;
    if (scores != nullptr) scores[i] = score;
    if (pos[i] >= 0) best = Lower(best, Choice{score, pos[i], start + i});
  }
  best = internal::BlockLowest<kThreads>(best, warp_best);
  if (threadIdx.x == 0) {
    const int64_t at = unit * p.max_partitions + partition;
    p.best_score[at] = best.score;
    p.best_pos[at] = best.pos;
    p.best_slot[at] = best.slot;
  }
}

// Pass c. Grid: (KV head, sequence), one warp: the lowest of the
// partitions' candidates. A sequence without slots is left alone.
__global__ void __launch_bounds__(internal::kWarpSize) VictimKernel(const Params p) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  if (p.num_slots[seq] <= 0) return;
  const int partitions = NumPartitions(NumSlots(p, seq));
  const int64_t unit = Unit(p, seq, kv_head);
  const int64_t base = unit * p.max_partitions;
  Choice best = NoChoice();
  for (int i = static_cast<int>(threadIdx.x); i < partitions; i += internal::kWarpSize) {
    best = Lower(best, Choice{p.best_score[base + i], p.best_pos[base + i], p.best_slot[base + i]});
  }
  best = internal::WarpLowest(best);
  if (threadIdx.x == 0) p.victims[unit] = best.slot;
}

// Passes a (unless PagedAttention ran it), b and c.
template <int kHeadDim>
absl::Status Launch(const Params& p, int64_t num_seqs, bool row_stats, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.max_partitions), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(num_seqs));
  if (row_stats) {
    RowStatsKernel<kHeadDim><<<grid, kThreads, 0, stream>>>(p);
    RETURN_IF_ERROR(LaunchStatus("MorphKvRowStatsKernel"));
  }
  if (p.per_head) {
    FuseKernel<kHeadDim, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    FuseKernel<kHeadDim, false><<<grid, kThreads, 0, stream>>>(p);
  }
  RETURN_IF_ERROR(LaunchStatus("MorphKvFuseKernel"));
  const dim3 victim_grid(static_cast<unsigned>(p.num_kv_heads), static_cast<unsigned>(num_seqs));
  VictimKernel<<<victim_grid, internal::kWarpSize, 0, stream>>>(p);
  return LaunchStatus("MorphKvVictimKernel");
}

absl::Status Dispatch(const Params& p, int64_t head_dim, int64_t num_seqs, bool row_stats,
                      cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return Launch<64>(p, num_seqs, row_stats, stream);
    case 128:
      return Launch<128>(p, num_seqs, row_stats, stream);
    default:
      return Launch<256>(p, num_seqs, row_stats, stream);
  }
}

int64_t Partitions(int64_t slots, int64_t size) {
  return slots <= size ? 1 : (slots + size - 1) / size;
}

// The checks of a window's score rows, shared by both entry points and by
// PagedAttention's pass a.
absl::Status CheckWindow(const char* name, int64_t num_heads, int64_t num_kv_heads, int64_t window,
                         bool group_max_prob) {
  RETURN_IF_ERROR(Require(window > 0 && window <= (1 << 20), name, "0 < window <= 2^20"));
  return Require(!group_max_prob ||
                     num_heads / num_kv_heads <= kMaxScoreRows / std::max<int64_t>(window - 1, 1),
                 name, "(window - 1) * (num_heads / num_kv_heads) <= 2^20 for group-max-prob");
}

// The launch parameters of either entry point, checked, with the best
// candidates in `scratch`; the caller points part_max and part_sum at the
// statistics.
absl::StatusOr<Params> MakeParams(const char* name, const MorphKvScoringArgs& a,
                                  const __nv_bfloat16* q, int64_t q_seq_stride,
                                  int64_t q_row_stride, int32_t* victims, float* scores,
                                  int64_t scores_stride, void* scratch) {
  // Grid dimensions y and z stop at 65535.
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, name, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(Require(a.num_kv_heads > 0 && a.num_kv_heads <= 65535 && a.num_heads > 0 &&
                              a.num_heads % a.num_kv_heads == 0,
                          name, "0 < num_kv_heads <= 65535 dividing num_heads"));
  RETURN_IF_ERROR(Require(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256, name,
                          "head_dim 64, 128 or 256"));
  RETURN_IF_ERROR(
      Require(a.block_size > 0 && a.block_size <= (1 << 20) && a.block_table_stride >= 0, name,
              "0 < block_size <= 2^20 and block_table_stride >= 0"));
  RETURN_IF_ERROR(Require(a.max_slots >= 0 && a.max_slots <= (int64_t{1} << 30), name,
                          "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(CheckWindow(name, a.num_heads, a.num_kv_heads, a.window, a.group_max_prob));
  RETURN_IF_ERROR(Require(a.sinks >= 0 && a.sinks <= INT_MAX, name, "0 <= sinks < 2^31"));
  RETURN_IF_ERROR(Require(a.positions == nullptr || a.positions_stride >= a.max_slots, name,
                          "positions_stride >= max_slots"));
  RETURN_IF_ERROR(Require(q_row_stride >= a.num_heads * a.head_dim && q_seq_stride >= 0, name,
                          "q_row_stride >= num_heads * head_dim and q_seq_stride >= 0"));
  RETURN_IF_ERROR(Require(scores == nullptr || scores_stride >= a.max_slots, name,
                          "scores_stride >= max_slots"));
  RETURN_IF_ERROR(Require(Aligned16(a.k_cache), name, "a 16-byte aligned key cache"));
  RETURN_IF_ERROR(Require(scratch != nullptr && Aligned16(scratch), name,
                          "16-byte aligned scratch of MorphKvScoringScratchBytes()"));
  Params p;
  p.k_cache = a.k_cache;
  p.block_tables = a.block_tables;
  p.block_table_stride = a.block_table_stride;
  p.num_slots = a.num_slots;
  p.recent_from = a.recent_from;
  p.positions = a.positions;
  p.positions_stride = a.positions_stride;
  p.sinks = static_cast<int>(a.sinks);
  p.max_slots = static_cast<int>(a.max_slots);
  p.max_partitions = NumPartitions(p.max_slots);
  p.stats_partition = kPartition;
  p.stats_partitions = p.max_partitions;
  p.block_size = static_cast<int>(a.block_size);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.window = static_cast<int>(a.window);
  p.per_head = a.group_max_prob;
  p.score_rows =
      static_cast<int>(MorphKvScoreRows(a.num_heads, a.num_kv_heads, a.window, a.group_max_prob));
  p.max_fusion = a.max_fusion;
  p.scale = a.scale;
  p.q = q;
  p.q_seq_stride = q_seq_stride;
  p.q_row_stride = q_row_stride;
  p.victims = victims;
  p.scores = scores;
  p.scores_stride = scores_stride;
  p.part_max = nullptr;
  p.part_sum = nullptr;
  // The scratch's layout is MorphKvScoringScratchBytes()'s: the statistics
  // of pass a, then the best candidates.
  const int64_t units = a.num_seqs * a.num_kv_heads * p.max_partitions;
  p.best_score = static_cast<float*>(scratch) + 2 * units * p.score_rows;
  p.best_pos = reinterpret_cast<int32_t*>(p.best_score + units);
  p.best_slot = p.best_pos + units;
  return p;
}

}  // namespace

int64_t MorphKvScoreRows(int64_t num_heads, int64_t num_kv_heads, int64_t window,
                         bool group_max_prob) {
  const int64_t group = num_kv_heads > 0 ? num_heads / num_kv_heads : 0;
  return group_max_prob ? std::max<int64_t>(window - 1, 0) * group : window;
}

size_t MorphKvScoringScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t window, int64_t max_slots, bool group_max_prob) {
  const int64_t units =
      std::max<int64_t>(num_seqs * num_kv_heads * Partitions(max_slots, kScoringPartitionSize), 1);
  const int64_t rows = MorphKvScoreRows(num_heads, num_kv_heads, window, group_max_prob);
  // Row maxima and exp sums, then the best scores, positions and slots.
  return static_cast<size_t>(units * (2 * rows + 3)) * sizeof(float);
}

size_t MorphKvScoringScratchBytes(int64_t num_seqs, int64_t num_kv_heads, int64_t window,
                                  int64_t max_slots) {
  return MorphKvScoringScratchBytes(num_seqs, num_kv_heads, num_kv_heads, window, max_slots,
                                    /*group_max_prob=*/false);
}

size_t MorphKvFusedStatsBytes(int64_t num_scored, int64_t num_heads, int64_t num_kv_heads,
                              int64_t window, int64_t max_slots, bool group_max_prob) {
  const int64_t units = std::max<int64_t>(
      num_scored * num_kv_heads * Partitions(max_slots, kFusedStatsPartitionSize), 1);
  // Never 0, so that the buffer exists even without score rows (W = 1).
  const int64_t rows =
      std::max<int64_t>(MorphKvScoreRows(num_heads, num_kv_heads, window, group_max_prob), 1);
  return static_cast<size_t>(2 * units * rows) * sizeof(float);
}

absl::Status CheckFusedStats(const MorphKvFusedStats& s, int64_t num_heads, int64_t num_kv_heads,
                             int64_t head_dim) {
  constexpr const char* kName = "PagedAttention's MorphKV statistics";
  RETURN_IF_ERROR(
      Require(s.num_scored >= 0 && s.max_slots >= 0 && s.max_slots <= (int64_t{1} << 30), kName,
              "num_scored >= 0 and 0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(CheckWindow(kName, num_heads, num_kv_heads, s.window, s.group_max_prob));
  RETURN_IF_ERROR(Require(s.sinks >= 0 && s.sinks <= INT_MAX, kName, "0 <= sinks < 2^31"));
  RETURN_IF_ERROR(Require(s.positions == nullptr || s.positions_stride >= s.max_slots, kName,
                          "positions_stride >= max_slots"));
  RETURN_IF_ERROR(Require(s.q_row_stride >= num_heads * head_dim && s.q_seq_stride >= 0, kName,
                          "q_row_stride >= num_heads * head_dim and q_seq_stride >= 0"));
  return Require(s.scored_as != nullptr && s.recent_from != nullptr && s.q != nullptr &&
                     s.stats != nullptr && Aligned16(s.stats),
                 kName, "scored_as, recent_from, rings and 16-byte aligned statistics");
}

absl::Status MorphKvSelectVictims(const MorphKvScoringArgs& a, const __nv_bfloat16* q,
                                  int64_t q_seq_stride, int64_t q_row_stride, int32_t* victims,
                                  float* scores, int64_t scores_stride, void* scratch,
                                  cudaStream_t stream) {
  ASSIGN_OR_RETURN(Params p, MakeParams("MorphKvSelectVictims", a, q, q_seq_stride, q_row_stride,
                                        victims, scores, scores_stride, scratch));
  if (a.num_seqs == 0) return absl::OkStatus();
  const int64_t stats = a.num_seqs * a.num_kv_heads * p.stats_partitions * p.score_rows;
  p.part_max = static_cast<float*>(scratch);
  p.part_sum = p.part_max + stats;
  return Dispatch(p, a.head_dim, a.num_seqs, /*row_stats=*/true, stream);
}

absl::Status MorphKvSelectVictimsFromStats(const MorphKvScoringArgs& a, const __nv_bfloat16* q,
                                           int64_t q_seq_stride, int64_t q_row_stride,
                                           const float* stats, int32_t* victims, float* scores,
                                           int64_t scores_stride, void* scratch,
                                           cudaStream_t stream) {
  constexpr const char* kName = "MorphKvSelectVictimsFromStats";
  ASSIGN_OR_RETURN(Params p, MakeParams(kName, a, q, q_seq_stride, q_row_stride, victims, scores,
                                        scores_stride, scratch));
  RETURN_IF_ERROR(Require(stats != nullptr && Aligned16(stats), kName,
                          "16-byte aligned statistics of MorphKvFusedStatsBytes()"));
  if (a.num_seqs == 0) return absl::OkStatus();
  p.stats_partition = static_cast<int>(kFusedStatsPartitionSize);
  p.stats_partitions = NumPartitions(p.max_slots, p.stats_partition);
  const int64_t units = a.num_seqs * a.num_kv_heads * p.stats_partitions * p.score_rows;
  // Read only: the kernels that write part_max and part_sum do not run.
  p.part_max = const_cast<float*>(stats);
  p.part_sum = p.part_max + units;
  return Dispatch(p, a.head_dim, a.num_seqs, /*row_stats=*/false, stream);
}

}  // namespace morphserve::kernels::cuda
