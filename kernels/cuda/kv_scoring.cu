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
  // Scratch, indexed by (seq * num_kv_heads + kv_head) * max_partitions +
  // partition: per score row (times score_rows, plus the row), the partition's
  // largest candidate logit and its sum of exp(logit - that maximum); and
  // the partition's lowest candidate.
  float* part_max;
  float* part_sum;
  float* best_score;
  int32_t* best_pos;
  int32_t* best_slot;
};

__host__ __device__ __forceinline__ int NumPartitions(int slots) {
  return slots <= kPartition ? 1 : (slots + kPartition - 1) / kPartition;
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
  const int recent_from = p.recent_from[seq];
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    const int slot = start + i;
    const int position = positions == nullptr ? slot : positions[slot];
    pos[i] = position >= p.sinks && position < recent_from ? position : -1;
  }
}

// q[r] = scale * the query of score row r0 + r: the sum of the group's
// query heads in ring row r0 + r, or for group-max-prob one head's query.
template <int kHeadDim>
__device__ __forceinline__ void LoadQueries(const Params& p, int seq, int kv_head, int r0, int rows,
                                            float (*q)[kHeadDim]) {
  const __nv_bfloat16* base =
      p.q + seq * p.q_seq_stride + static_cast<int64_t>(kv_head) * p.group * kHeadDim;
  if (p.per_head) {
    // recent_from = t - W names the ring row left out; the rows after it
    // hold t-W+1 .. t-1.
    const int skipped = (p.recent_from[seq] % p.window + p.window) % p.window;
    for (int i = static_cast<int>(threadIdx.x); i < rows * kHeadDim; i += kThreads) {
      const int r = i / kHeadDim;
      const int d = i % kHeadDim;
      const int row = r0 + r;
      const int ring = (skipped + 1 + row / p.group) % p.window;
      const __nv_bfloat16* head = base + ring * p.q_row_stride + (row % p.group) * kHeadDim + d;
      q[r][d] = __bfloat162float(*head) * p.scale;
    }
    return;
  }
  for (int i = static_cast<int>(threadIdx.x); i < rows * kHeadDim; i += kThreads) {
    const int r = i / kHeadDim;
    const int d = i % kHeadDim;
    const __nv_bfloat16* head = base + (r0 + r) * p.q_row_stride + d;
    float sum = 0.0f;
    for (int g = 0; g < p.group; ++g) sum += __bfloat162float(head[g * kHeadDim]);
    q[r][d] = sum * p.scale;
  }
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
  const int lane_in_row = static_cast<int>(threadIdx.x) % kRowThreads;
  const int row = static_cast<int>(threadIdx.x) / kRowThreads;
  const int dim0 = lane_in_row * kVec;
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int64_t stats_at =
      (Unit(p, seq, kv_head) * p.max_partitions + partition) * static_cast<int64_t>(p.score_rows);

  for (int r0 = 0; r0 < p.score_rows; r0 += kRowChunk) {
    const int rows = min(kRowChunk, p.score_rows - r0);
    LoadQueries<kHeadDim>(p, seq, kv_head, r0, rows, q);
    internal::ResetRowStats<kThreads, kRowsAtOnce>(run_max, run_sum);
    __syncthreads();
    // Every thread runs the same number of iterations: the shuffles need
    // their whole warp.
    for (int j0 = 0; j0 < n; j0 += kRowsAtOnce) {
      const int j = j0 + row;
      const bool candidate = j < n && pos[j] >= 0;
      float logits[kRowChunk] = {};
      SlotLogits<kHeadDim>(p, table, kv_head, start + j, j < n, dim0, rows, q, logits);
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        if (candidate && r < rows && r % kRowThreads == lane_in_row) {
          internal::FoldLogit(logits[r], run_max[row][r], run_sum[row][r]);
        }
      }
    }
    __syncthreads();
    internal::MergeRowStats<kThreads, kRowsAtOnce>(
        run_max, run_sum, rows, p.part_max + stats_at + r0, p.part_sum + stats_at + r0);
    __syncthreads();  // q and the running statistics are refilled next chunk
  }
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
  const int partitions = NumPartitions(slots);
  if (partition >= partitions) return;
  const int start = partition * kPartition;
  const int n = min(kPartition, slots - start);

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
  const int64_t stats_base = unit * p.max_partitions * p.score_rows;

  for (int r0 = 0; r0 < p.score_rows;) {
    const int rows = FuseChunkRows(p, r0);
    // Group-max-prob with a group over kRowChunk: the chunk is part of one
    // ring row, whose maximum is complete at the chunk that ends it.
    [[maybe_unused]] const bool split = kPerHead && p.group > kRowChunk;
    [[maybe_unused]] const bool ends_ring_row = (r0 + rows) % p.group == 0;
    LoadQueries<kHeadDim>(p, seq, kv_head, r0, rows, q);
    for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) {
      const float* maxes = p.part_max + stats_base + r0 + r;
      const float* sums = p.part_sum + stats_base + r0 + r;
      float m = -INFINITY;
      for (int i = 0; i < partitions; ++i) m = fmaxf(m, maxes[i * p.score_rows]);
      float z = 0.0f;
      for (int i = 0; i < partitions; ++i) {
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

template <int kHeadDim>
absl::Status Launch(const Params& p, int64_t num_seqs, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.max_partitions), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(num_seqs));
  RowStatsKernel<kHeadDim><<<grid, kThreads, 0, stream>>>(p);
  RETURN_IF_ERROR(LaunchStatus("MorphKvRowStatsKernel"));
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

}  // namespace

size_t MorphKvScoringScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                  int64_t window, int64_t max_slots, bool group_max_prob) {
  const int64_t partitions = max_slots <= kScoringPartitionSize
                                 ? 1
                                 : (max_slots + kScoringPartitionSize - 1) / kScoringPartitionSize;
  const int64_t units = std::max<int64_t>(num_seqs * num_kv_heads * partitions, 1);
  const int64_t group = num_kv_heads > 0 ? num_heads / num_kv_heads : 0;
  const int64_t rows = group_max_prob ? std::max<int64_t>(window - 1, 0) * group : window;
  // Row maxima and exp sums, then the best scores, positions and slots.
  return static_cast<size_t>(units * (2 * rows + 3)) * sizeof(float);
}

size_t MorphKvScoringScratchBytes(int64_t num_seqs, int64_t num_kv_heads, int64_t window,
                                  int64_t max_slots) {
  return MorphKvScoringScratchBytes(num_seqs, num_kv_heads, num_kv_heads, window, max_slots,
                                    /*group_max_prob=*/false);
}

absl::Status MorphKvSelectVictims(const MorphKvScoringArgs& a, const __nv_bfloat16* q,
                                  int64_t q_seq_stride, int64_t q_row_stride, int32_t* victims,
                                  float* scores, int64_t scores_stride, void* scratch,
                                  cudaStream_t stream) {
  constexpr const char* kName = "MorphKvSelectVictims";
  // Grid dimensions y and z stop at 65535.
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, kName, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(Require(a.num_kv_heads > 0 && a.num_kv_heads <= 65535 && a.num_heads > 0 &&
                              a.num_heads % a.num_kv_heads == 0,
                          kName, "0 < num_kv_heads <= 65535 dividing num_heads"));
  RETURN_IF_ERROR(Require(a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256, kName,
                          "head_dim 64, 128 or 256"));
  RETURN_IF_ERROR(
      Require(a.block_size > 0 && a.block_size <= (1 << 20) && a.block_table_stride >= 0, kName,
              "0 < block_size <= 2^20 and block_table_stride >= 0"));
  RETURN_IF_ERROR(Require(a.max_slots >= 0 && a.max_slots <= (int64_t{1} << 30), kName,
                          "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(Require(a.window > 0 && a.window <= (1 << 20), kName, "0 < window <= 2^20"));
  RETURN_IF_ERROR(Require(
      !a.group_max_prob ||
          a.num_heads / a.num_kv_heads <= kMaxScoreRows / std::max<int64_t>(a.window - 1, 1),
      kName, "(window - 1) * (num_heads / num_kv_heads) <= 2^20 for group-max-prob"));
  RETURN_IF_ERROR(Require(a.sinks >= 0 && a.sinks <= INT_MAX, kName, "0 <= sinks < 2^31"));
  RETURN_IF_ERROR(Require(a.positions == nullptr || a.positions_stride >= a.max_slots, kName,
                          "positions_stride >= max_slots"));
  RETURN_IF_ERROR(Require(q_row_stride >= a.num_heads * a.head_dim && q_seq_stride >= 0, kName,
                          "q_row_stride >= num_heads * head_dim and q_seq_stride >= 0"));
  RETURN_IF_ERROR(Require(scores == nullptr || scores_stride >= a.max_slots, kName,
                          "scores_stride >= max_slots"));
  RETURN_IF_ERROR(Require(Aligned16(a.k_cache), kName, "a 16-byte aligned key cache"));
  RETURN_IF_ERROR(Require(scratch != nullptr && Aligned16(scratch), kName,
                          "16-byte aligned scratch of MorphKvScoringScratchBytes()"));
  if (a.num_seqs == 0) return absl::OkStatus();

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
  p.block_size = static_cast<int>(a.block_size);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.window = static_cast<int>(a.window);
  p.per_head = a.group_max_prob;
  p.score_rows = static_cast<int>(a.group_max_prob ? (a.window - 1) * p.group : a.window);
  p.max_fusion = a.max_fusion;
  p.scale = a.scale;
  p.q = q;
  p.q_seq_stride = q_seq_stride;
  p.q_row_stride = q_row_stride;
  p.victims = victims;
  p.scores = scores;
  p.scores_stride = scores_stride;
  const int64_t units = a.num_seqs * a.num_kv_heads * p.max_partitions;
  p.part_max = static_cast<float*>(scratch);
  p.part_sum = p.part_max + units * p.score_rows;
  p.best_score = p.part_sum + units * p.score_rows;
  p.best_pos = reinterpret_cast<int32_t*>(p.best_score + units);
  p.best_slot = p.best_pos + units;
  switch (a.head_dim) {
    case 64:
      return Launch<64>(p, a.num_seqs, stream);
    case 128:
      return Launch<128>(p, a.num_seqs, stream);
    default:
      return Launch<256>(p, a.num_seqs, stream);
  }
}

}  // namespace morphserve::kernels::cuda
