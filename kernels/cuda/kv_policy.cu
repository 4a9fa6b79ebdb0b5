#include "kernels/cuda/kv_policy.h"

#include <algorithm>
#include <climits>
#include <cstdint>

#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/kv_scoring_internal.cuh"
#include "kernels/cuda/launch_internal.h"
#include "kernels/cuda/paged_cache_internal.cuh"
#include "kernels/cuda/reduce_internal.cuh"

namespace morphserve::kernels::cuda {
namespace {

using internal::Aligned16;
using internal::Choice;
using internal::kFullMask;
using internal::kVec;
using internal::kWarpSize;
using internal::Lower;
using internal::NoChoice;
using internal::Require;
using internal::Rescaled;

constexpr int kThreads = 128;
constexpr int kPartition = static_cast<int>(kPolicyPartitionSize);
constexpr int kRowChunk = internal::kScoringRowChunk;

__host__ __device__ __forceinline__ int NumPartitions(int slots) {
  return slots <= kPartition ? 1 : (slots + kPartition - 1) / kPartition;
}

__host__ __device__ __forceinline__ int64_t PartitionsFor(int64_t slots) {
  return slots <= kPolicyPartitionSize ? 1
                                       : (slots + kPolicyPartitionSize - 1) / kPolicyPartitionSize;
}

__device__ __forceinline__ int Clamp(int v, int hi) { return min(max(v, 0), hi); }

// ---------------------------------------------------------------------------
// Softmax rows summed per slot, for H2O and SnapKV.
//
// Both score a sequence's keys with rows of queries: token i of a run of
// `tokens` consecutive tokens, every query head g of the KV head's group
// (row i * group + g), attends to slots [0, first_len + i + 1). H2O's
// tokens are the step's, in q; SnapKV's are the observation window's, in
// the query ring. The softmax of a row needs every partition's statistics,
// so as in kv_scoring.cu there are two passes: a, each partition's largest
// logit and exp sum per row; b, the probabilities under the merged
// statistics, summed over the rows per slot.

struct SumParams {
  const __nv_bfloat16* k_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  int max_slots;
  int max_partitions;
  int max_rows;  // rows per (sequence, KV head) in the scratch
  int block_size;
  int num_kv_heads;
  int group;
  float scale;
  bool snap;
  // H2O: slots held, the step's tokens in q, the slots to reset.
  const int32_t* num_slots;
  const int32_t* query_start;
  const int32_t* reset_slots;
  int max_tokens;
  // SnapKV: prompt lengths and the window's queries in the ring.
  const int32_t* num_tokens;
  int window;
  int ring_size;
  const __nv_bfloat16* q;
  int64_t q_seq_stride;  // SnapKV's ring
  int64_t q_row_stride;
  // H2O adds into `out` (its running scores); SnapKV writes its sums there
  // (scratch) and pools them into `pooled`.
  float* out;
  int64_t out_stride;
  float* pooled;
  int64_t pooled_stride;
  // Scratch, [(seq * num_kv_heads + kv_head) * max_partitions + partition]
  // [max_rows].
  float* part_max;
  float* part_sum;
};

// One (sequence)'s rows: slots [0, slots) are scored (none when 0).
struct Rows {
  int slots;
  int tokens;
  int first_len;
  const __nv_bfloat16* q;  // H2O: token 0's row
};

__device__ __forceinline__ Rows SequenceRows(const SumParams& p, int seq) {
  Rows r;
  if (p.snap) {
    const int len = Clamp(p.num_tokens[seq], p.max_slots);
    r.slots = len > p.window ? len : 0;
    r.tokens = p.window;
    r.first_len = len - p.window;
    r.q = nullptr;
  } else {
    r.slots = Clamp(p.num_slots[seq], p.max_slots);
    r.tokens = Clamp(p.query_start[seq + 1] - p.query_start[seq], p.max_tokens);
    r.first_len = r.slots - r.tokens;
    r.q = p.q + static_cast<int64_t>(p.query_start[seq]) * p.q_row_stride;
  }
  return r;
}

// Slots that token i attends to.
__device__ __forceinline__ int RowLen(const Rows& r, int i) {
  return Clamp(r.first_len + i + 1, r.slots);
}

// Token i's [num_heads][head_dim] query row.
__device__ __forceinline__ const __nv_bfloat16* TokenQuery(const SumParams& p, const Rows& r,
                                                           int seq, int i) {
  if (!p.snap) return r.q + i * p.q_row_stride;
  const int position = r.first_len + i;
  return p.q + seq * p.q_seq_stride + static_cast<int64_t>(position % p.ring_size) * p.q_row_stride;
}

// q[r] = scale * query row r0 + r; len[r] = its slot count.
template <int kHeadDim>
__device__ __forceinline__ void LoadRows(const SumParams& p, const Rows& rows_of, int seq,
                                         int kv_head, int r0, int rows, float (*q)[kHeadDim],
                                         int* len) {
  for (int i = static_cast<int>(threadIdx.x); i < rows * kHeadDim; i += kThreads) {
    const int r = i / kHeadDim;
    const int d = i % kHeadDim;
    const int row = r0 + r;
    const int head = kv_head * p.group + row % p.group;
    const __nv_bfloat16* src = TokenQuery(p, rows_of, seq, row / p.group);
    q[r][d] = __bfloat162float(src[head * kHeadDim + d]) * p.scale;
  }
  for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) {
    len[r] = RowLen(rows_of, (r0 + r) / p.group);
  }
}

// The slots of a chunk of rows within the partition from `start`: rows are
// causal, so the chunk's last row reaches furthest.
__device__ __forceinline__ int ChunkSlots(const SumParams& p, const Rows& rows_of, int r0, int rows,
                                          int start, int n) {
  return Clamp(RowLen(rows_of, (r0 + rows - 1) / p.group) - start, n);
}

// Thread mapping as in kv_scoring.cu: grid (partition, KV head, sequence);
// threads in rows of kRowThreads lanes, one slot per thread row at a time;
// per-row work spread over the lanes, lane l taking rows r % kRowThreads ==
// l.
template <int kHeadDim>
__global__ void __launch_bounds__(kThreads) RowStatsKernel(const SumParams p) {
  constexpr int kRowThreads = kHeadDim / kVec;
  constexpr int kRowsAtOnce = kThreads / kRowThreads;
  static_assert(kRowThreads <= kWarpSize && kThreads % kRowThreads == 0);

  const int partition = static_cast<int>(blockIdx.x);
  const int kv_head = static_cast<int>(blockIdx.y);
  const int seq = static_cast<int>(blockIdx.z);
  const Rows rows_of = SequenceRows(p, seq);
  // The same for the whole block, so no thread is left waiting at a barrier.
  if (rows_of.slots == 0 || partition >= NumPartitions(rows_of.slots)) return;
  const int start = partition * kPartition;
  const int n = min(kPartition, rows_of.slots - start);
  const int num_rows = rows_of.tokens * p.group;

  __shared__ __align__(16) float q[kRowChunk][kHeadDim];
  __shared__ int len[kRowChunk];
  __shared__ internal::RowStats<kRowsAtOnce> run_max;
  __shared__ internal::RowStats<kRowsAtOnce> run_sum;

  const int lane_in_row = static_cast<int>(threadIdx.x) % kRowThreads;
  const int row = static_cast<int>(threadIdx.x) / kRowThreads;
  const int dim0 = lane_in_row * kVec;
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int64_t stats_at = (unit * p.max_partitions + partition) * p.max_rows;

  for (int r0 = 0; r0 < num_rows; r0 += kRowChunk) {
    const int rows = min(kRowChunk, num_rows - r0);
    const int chunk_n = ChunkSlots(p, rows_of, r0, rows, start, n);
    // No row of the chunk reaches this partition: pass b reads none of its
    // statistics.
    if (chunk_n == 0) continue;
    LoadRows<kHeadDim>(p, rows_of, seq, kv_head, r0, rows, q, len);
    internal::ResetRowStats<kThreads, kRowsAtOnce>(run_max, run_sum);
    __syncthreads();
    for (int j0 = 0; j0 < chunk_n; j0 += kRowsAtOnce) {
      const int j = j0 + row;
      const bool valid = j < chunk_n;
      const __nv_bfloat16* key =
          valid ? internal::PagedRow<kHeadDim>(p.k_cache, table, p.block_size, p.num_kv_heads,
                                               kv_head, start + j)
                : nullptr;
      float logits[kRowChunk] = {};
      internal::ChunkLogits<kHeadDim>(key, dim0, rows, q, logits);
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        if (valid && r < rows && r % kRowThreads == lane_in_row && start + j < len[r]) {
          internal::FoldLogit(logits[r], run_max[row][r], run_sum[row][r]);
        }
      }
    }
    __syncthreads();
    internal::MergeRowStats<kThreads, kRowsAtOnce>(
        run_max, run_sum, rows, p.part_max + stats_at + r0, p.part_sum + stats_at + r0);
    __syncthreads();  // q, len and the running statistics are refilled next chunk
  }
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads) RowSumKernel(const SumParams p) {
  constexpr int kRowThreads = kHeadDim / kVec;
  constexpr int kRowsAtOnce = kThreads / kRowThreads;

  const int partition = static_cast<int>(blockIdx.x);
  const int kv_head = static_cast<int>(blockIdx.y);
  const int seq = static_cast<int>(blockIdx.z);
  const Rows rows_of = SequenceRows(p, seq);
  if (rows_of.slots == 0 || partition >= NumPartitions(rows_of.slots)) return;
  const int start = partition * kPartition;
  const int n = min(kPartition, rows_of.slots - start);
  const int num_rows = rows_of.tokens * p.group;

  __shared__ __align__(16) float q[kRowChunk][kHeadDim];
  __shared__ int len[kRowChunk];
  __shared__ float row_max[kRowChunk];
  __shared__ float row_inv[kRowChunk];
  __shared__ float acc[kPartition];

  for (int i = static_cast<int>(threadIdx.x); i < kPartition; i += kThreads) acc[i] = 0.0f;
  const int lane_in_row = static_cast<int>(threadIdx.x) % kRowThreads;
  const int row = static_cast<int>(threadIdx.x) / kRowThreads;
  const int dim0 = lane_in_row * kVec;
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int64_t stats_base = unit * p.max_partitions * p.max_rows;

  for (int r0 = 0; r0 < num_rows; r0 += kRowChunk) {
    const int rows = min(kRowChunk, num_rows - r0);
    const int chunk_n = ChunkSlots(p, rows_of, r0, rows, start, n);
    if (chunk_n == 0) continue;
    LoadRows<kHeadDim>(p, rows_of, seq, kv_head, r0, rows, q, len);
    __syncthreads();  // len
    for (int r = static_cast<int>(threadIdx.x); r < rows; r += kThreads) {
      // The partitions this row reaches, each of which pass a scored.
      const int parts = (len[r] + kPartition - 1) / kPartition;
      const float* maxes = p.part_max + stats_base + r0 + r;
      const float* sums = p.part_sum + stats_base + r0 + r;
      float m = -INFINITY;
      for (int i = 0; i < parts; ++i) m = fmaxf(m, maxes[i * p.max_rows]);
      float z = 0.0f;
      for (int i = 0; i < parts; ++i) z += Rescaled(sums[i * p.max_rows], maxes[i * p.max_rows], m);
      row_max[r] = m;
      row_inv[r] = z > 0.0f ? 1.0f / z : 0.0f;
    }
    __syncthreads();
    for (int j0 = 0; j0 < chunk_n; j0 += kRowsAtOnce) {
      const int j = j0 + row;
      const bool valid = j < chunk_n;
      const __nv_bfloat16* key =
          valid ? internal::PagedRow<kHeadDim>(p.k_cache, table, p.block_size, p.num_kv_heads,
                                               kv_head, start + j)
                : nullptr;
      float logits[kRowChunk] = {};
      internal::ChunkLogits<kHeadDim>(key, dim0, rows, q, logits);
      float part = 0.0f;  // this lane's rows
#pragma unroll
      for (int r = 0; r < kRowChunk; ++r) {
        if (valid && r < rows && r % kRowThreads == lane_in_row && start + j < len[r]) {
          part += internal::Probability(logits[r], row_max[r], row_inv[r]);
        }
      }
      part = internal::WarpSum<kRowThreads>(part);
      // Slot j always falls to the same thread row, so no other thread
      // touches acc[j] until the barrier below.
      if (valid && lane_in_row == 0) acc[j] += part;
    }
    __syncthreads();  // q, len and the row statistics are refilled next chunk
  }

  float* out = p.out + unit * p.out_stride + start;
  if (p.snap) {
    for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) out[i] = acc[i];
    return;
  }
  const int reset = p.reset_slots == nullptr ? -1 : p.reset_slots[unit] - start;
  for (int i = static_cast<int>(threadIdx.x); i < n; i += kThreads) {
    out[i] = (i == reset ? 0.0f : out[i]) + acc[i];
  }
}

// SnapKV's pooling over the prefix, in the CPU's order of summation. Grid:
// (slot chunk, KV head, sequence).
__global__ void __launch_bounds__(kThreads) PoolKernel(const SumParams p) {
  const int kv_head = static_cast<int>(blockIdx.y);
  const int seq = static_cast<int>(blockIdx.z);
  const Rows rows_of = SequenceRows(p, seq);
  if (rows_of.slots == 0) return;
  const int prefix = rows_of.first_len;
  const int j = static_cast<int>(blockIdx.x) * kThreads + static_cast<int>(threadIdx.x);
  if (j >= prefix) return;
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const float* sums = p.out + unit * p.out_stride;
  constexpr int kHalf = static_cast<int>(kSnapKvPoolKernel / 2);
  float sum = 0.0f;
  for (int k = max(0, j - kHalf); k <= min(prefix - 1, j + kHalf); ++k) sum += sums[k];
  p.pooled[unit * p.pooled_stride + j] = sum / static_cast<float>(kSnapKvPoolKernel);
}

template <int kHeadDim>
absl::Status LaunchSums(const SumParams& p, int64_t num_seqs, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(p.max_partitions), static_cast<unsigned>(p.num_kv_heads),
                  static_cast<unsigned>(num_seqs));
  RowStatsKernel<kHeadDim><<<grid, kThreads, 0, stream>>>(p);
  RETURN_IF_ERROR(LaunchStatus(p.snap ? "SnapKvRowStatsKernel" : "H2oRowStatsKernel"));
  RowSumKernel<kHeadDim><<<grid, kThreads, 0, stream>>>(p);
  return LaunchStatus(p.snap ? "SnapKvRowSumKernel" : "H2oRowSumKernel");
}

// The fields both policies' sums share, from their arguments (H2O's or
// SnapKV's): the cache and its geometry, `rows_per_head` query rows per
// query head, and the scratch's leading part_max and part_sum arrays, one
// entry per (sequence, KV head, partition, row) each.
template <typename Args>
SumParams CommonSumParams(const Args& a, int64_t rows_per_head, void* scratch) {
  SumParams p{};
  p.k_cache = a.k_cache;
  p.block_tables = a.block_tables;
  p.block_table_stride = a.block_table_stride;
  p.max_slots = static_cast<int>(a.max_slots);
  p.max_partitions = NumPartitions(p.max_slots);
  p.group = static_cast<int>(a.num_heads / a.num_kv_heads);
  p.max_rows = static_cast<int>(rows_per_head) * p.group;
  p.block_size = static_cast<int>(a.block_size);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.scale = a.scale;
  const int64_t stats = a.num_seqs * a.num_kv_heads * p.max_partitions * p.max_rows;
  p.part_max = static_cast<float*>(scratch);
  p.part_sum = p.part_max + stats;
  return p;
}

absl::Status LaunchSums(const SumParams& p, int64_t head_dim, int64_t num_seqs,
                        cudaStream_t stream) {
  switch (head_dim) {
    case 64:
      return LaunchSums<64>(p, num_seqs, stream);
    case 128:
      return LaunchSums<128>(p, num_seqs, stream);
    default:
      return LaunchSums<256>(p, num_seqs, stream);
  }
}

// Checks shared by H2oAccumulate and SnapKvScores.
absl::Status CheckScoring(const char* name, int64_t num_seqs, int64_t num_heads,
                          int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                          int64_t block_table_stride, int64_t max_slots, const void* k_cache,
                          const void* scratch) {
  // Grid dimensions y and z stop at 65535.
  RETURN_IF_ERROR(Require(num_seqs >= 0 && num_seqs <= 65535, name, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(Require(
      num_kv_heads > 0 && num_kv_heads <= 65535 && num_heads > 0 && num_heads % num_kv_heads == 0,
      name, "0 < num_kv_heads <= 65535 dividing num_heads"));
  RETURN_IF_ERROR(Require(head_dim == 64 || head_dim == 128 || head_dim == 256, name,
                          "head_dim 64, 128 or 256"));
  RETURN_IF_ERROR(Require(block_size > 0 && block_size <= (1 << 20) && block_table_stride >= 0,
                          name, "0 < block_size <= 2^20 and block_table_stride >= 0"));
  RETURN_IF_ERROR(
      Require(max_slots >= 0 && max_slots <= (int64_t{1} << 30), name, "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(Require(Aligned16(k_cache), name, "a 16-byte aligned key cache"));
  return Require(scratch != nullptr && Aligned16(scratch), name,
                 "16-byte aligned scratch of the size its ScratchBytes() gives");
}

// ---------------------------------------------------------------------------
// Candidates.

constexpr int kSelectThreads = 256;
constexpr int kSelectWarps = kSelectThreads / kWarpSize;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

struct CandidateParams {
  const int32_t* num_slots;
  const int32_t* recent_from;
  const int32_t* positions;
  int64_t positions_stride;
  int sinks;
  int max_slots;
  int num_kv_heads;
  const float* scores;
  int64_t scores_stride;
};

CandidateParams MakeCandidateParams(const CandidateArgs& a, const float* scores,
                                    int64_t scores_stride) {
  CandidateParams p;
  p.num_slots = a.num_slots;
  p.recent_from = a.recent_from;
  p.positions = a.positions;
  p.positions_stride = a.positions_stride;
  p.sinks = static_cast<int>(a.sinks);
  p.max_slots = static_cast<int>(a.max_slots);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.scores = scores;
  p.scores_stride = scores_stride;
  return p;
}

// Slot j's position if it is a candidate, else -1.
__device__ __forceinline__ int CandidatePosition(const CandidateParams& p, const int32_t* positions,
                                                 int recent_from, int j) {
  const int position = positions == nullptr ? j : positions[j];
  return position >= p.sinks && position < recent_from ? position : -1;
}

// Grid: (KV head, sequence).
__global__ void __launch_bounds__(kSelectThreads)
    LowestCandidateKernel(const CandidateParams p, int32_t* victims) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  if (p.num_slots[seq] <= 0) return;  // left alone
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int slots = Clamp(p.num_slots[seq], p.max_slots);
  const int recent_from = p.recent_from[seq];
  const int32_t* positions =
      p.positions == nullptr ? nullptr : p.positions + unit * p.positions_stride;
  const float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride;
  __shared__ Choice warp_best[kSelectWarps];
  Choice best = NoChoice();
  for (int j = static_cast<int>(threadIdx.x); j < slots; j += kSelectThreads) {
    const int position = CandidatePosition(p, positions, recent_from, j);
    if (position >= 0) {
      best = Lower(best, Choice{scores == nullptr ? 0.0f : scores[j], position, j});
    }
  }
  best = internal::BlockLowest<kSelectThreads>(best, warp_best);
  if (threadIdx.x == 0) victims[unit] = best.slot;
}

// A candidate's rank key: larger is kept first. The score's bits made to
// order as unsigned integers (0 and -0 alike), then the position (unique
// within a KV head, so keys never tie).
__device__ __forceinline__ uint64_t RankKey(float score, int position) {
  const unsigned bits = __float_as_uint(score == 0.0f ? 0.0f : score);
  const unsigned ordered = (bits & 0x80000000u) != 0 ? ~bits : bits | 0x80000000u;
  return (static_cast<uint64_t>(ordered) << 32) | static_cast<unsigned>(position);
}

// Grid: (KV head, sequence). The key of the keep-th best candidate by a
// most-significant-digit-first radix select (one histogram of kRadixBits
// per pass over the candidates), then the kept slots in ascending order by
// a block-wide scan.
__global__ void __launch_bounds__(kSelectThreads)
    KeepListKernel(const CandidateParams p, const int32_t* keep, int32_t* keep_lists,
                   int64_t keep_stride, int32_t* keep_counts, int32_t* victims) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
  // Left alone but for the count, which tells CompactKv to skip it.
  if (p.num_slots[seq] <= 0) {
    if (tid == 0) keep_counts[unit] = -1;
    return;
  }
  const int slots = min(p.num_slots[seq], p.max_slots);
  const int recent_from = p.recent_from[seq];
  const int32_t* positions =
      p.positions == nullptr ? nullptr : p.positions + unit * p.positions_stride;
  const float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride;
  // The key of slot j, or false when j is no candidate.
  const auto key_of = [&](int j, uint64_t* key) {
    const int position = CandidatePosition(p, positions, recent_from, j);
    if (position < 0) return false;
    *key = RankKey(scores == nullptr ? 0.0f : scores[j], position);
    return true;
  };

  __shared__ unsigned hist[kRadixBins];
  __shared__ uint64_t prefix;     // the digits of the wanted key found so far
  __shared__ unsigned remaining;  // its rank among the keys sharing them (1 = largest)
  __shared__ bool keep_none;
  __shared__ int warp_count[kSelectWarps];

  for (int pass = 0; pass < 64 / kRadixBits; ++pass) {
    const int shift = 64 - kRadixBits * (pass + 1);
    const uint64_t mask = pass == 0 ? 0 : ~uint64_t{0} << (shift + kRadixBits);
    for (int i = tid; i < kRadixBins; i += kSelectThreads) hist[i] = 0;
    __syncthreads();
    const uint64_t want = pass == 0 ? 0 : prefix;
    for (int j = tid; j < slots; j += kSelectThreads) {
      uint64_t key;
      if (key_of(j, &key) && (key & mask) == want) {
        atomicAdd(&hist[(key >> shift) & (kRadixBins - 1)], 1u);
      }
    }
    __syncthreads();
    if (tid == 0) {
      if (pass == 0) {
        unsigned candidates = 0;
        for (int i = 0; i < kRadixBins; ++i) candidates += hist[i];
        const unsigned wanted = static_cast<unsigned>(max(keep[seq], 0));
        remaining = min(wanted, candidates);
        keep_none = remaining == 0;
        prefix = 0;
      }
      if (!keep_none) {
        unsigned above = 0;
        int digit = kRadixBins - 1;
        while (above + hist[digit] < remaining) above += hist[digit--];
        remaining -= above;
        prefix |= static_cast<uint64_t>(digit) << shift;
      }
    }
    __syncthreads();
    if (keep_none) break;
  }
  const uint64_t threshold = prefix;
  const bool none = keep_none;

  int base = 0;
  for (int j0 = 0; j0 < slots; j0 += kSelectThreads) {
    const int j = j0 + tid;
    uint64_t key = 0;
    const bool candidate = j < slots && key_of(j, &key);
    const bool kept = j < slots && (!candidate || (!none && key >= threshold));
    const unsigned ballot = __ballot_sync(kFullMask, kept);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int at = base + __popc(ballot & ((1u << lane) - 1u));
    int total = 0;
    for (int w = 0; w < kSelectWarps; ++w) {
      if (w < warp) at += warp_count[w];
      total += warp_count[w];
    }
    if (kept) keep_lists[unit * keep_stride + at] = j;
    if (candidate && !none && key == threshold && victims != nullptr) victims[unit] = at;
    base += total;
    __syncthreads();  // warp_count is refilled next tile
  }
  if (tid == 0) {
    keep_counts[unit] = base;
    if (none && victims != nullptr) victims[unit] = -1;
  }
}

absl::Status CheckCandidates(const char* name, const CandidateArgs& a, const float* scores,
                             int64_t scores_stride) {
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, name, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(a.num_kv_heads > 0 && a.num_kv_heads <= 65535, name, "0 < num_kv_heads <= 65535"));
  RETURN_IF_ERROR(Require(a.max_slots >= 0 && a.max_slots <= (int64_t{1} << 30), name,
                          "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(Require(a.sinks >= 0 && a.sinks <= INT_MAX, name, "0 <= sinks < 2^31"));
  RETURN_IF_ERROR(Require(a.positions == nullptr || a.positions_stride >= a.max_slots, name,
                          "positions_stride >= max_slots"));
  return Require(scores == nullptr || scores_stride >= a.max_slots, name,
                 "scores_stride >= max_slots");
}

// ---------------------------------------------------------------------------
// Compaction and the query ring.

constexpr int kCompactThreads = 256;
// 16-byte vectors of K (and of V) each thread holds per round.
constexpr int kCompactVecs = 4;

struct CompactParams {
  __nv_bfloat16* k_cache;
  __nv_bfloat16* v_cache;
  const int32_t* block_tables;
  int64_t block_table_stride;
  int max_slots;
  int block_size;
  int num_kv_heads;
  int vecs_per_row;  // head_dim / 8
  const int32_t* keep_lists;
  int64_t keep_stride;
  const int32_t* keep_counts;
  const int32_t* positions_in;
  int32_t* positions_out;
  int64_t positions_stride;
  float* scores;
  int64_t scores_stride;
};

__device__ __forceinline__ uint4* CacheVec(__nv_bfloat16* cache, const CompactParams& p,
                                           const int32_t* table, int kv_head, int slot, int vec) {
  const int64_t block = table[slot / p.block_size];
  const int64_t row = (block * p.num_kv_heads + kv_head) * p.block_size + slot % p.block_size;
  return reinterpret_cast<uint4*>(cache + (row * p.vecs_per_row + vec) * kVec);
}

// Grid: (KV head, sequence). Each round moves the rows of a run of keep
// list entries: every thread reads its part of them, then after a barrier
// writes it. A destination i never lies above its source keep[i], so within
// a round the barrier orders every read before any write that could reach
// it, and every later round reads only slots above this round's
// destinations.
__global__ void __launch_bounds__(kCompactThreads) CompactKernel(const CompactParams p) {
  const int kv_head = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int64_t unit = static_cast<int64_t>(seq) * p.num_kv_heads + kv_head;
  const int count = p.keep_counts[unit];
  if (count < 0) return;
  const int n = min(count, p.max_slots);
  const int tid = static_cast<int>(threadIdx.x);
  const int32_t* table = p.block_tables + seq * p.block_table_stride;
  const int32_t* keep = p.keep_lists + unit * p.keep_stride;
  const int32_t* positions_in =
      p.positions_in == nullptr ? nullptr : p.positions_in + unit * p.positions_stride;
  int32_t* positions_out = p.positions_out + unit * p.positions_stride;
  float* scores = p.scores == nullptr ? nullptr : p.scores + unit * p.scores_stride;
  // At most one row per thread, which carries its position and score.
  const int rows_per_round =
      max(1, min(kCompactThreads, kCompactThreads * kCompactVecs / p.vecs_per_row));

  for (int i0 = 0; i0 < n; i0 += rows_per_round) {
    const int rows = min(rows_per_round, n - i0);
    const int items = rows * p.vecs_per_row;
    uint4 k[kCompactVecs] = {};
    uint4 v[kCompactVecs] = {};
#pragma unroll
    for (int u = 0; u < kCompactVecs; ++u) {
      const int item = tid + u * kCompactThreads;
      if (item < items) {
        const int i = i0 + item / p.vecs_per_row;
        const int from = keep[i];
        if (from != i) {
          const int vec = item % p.vecs_per_row;
          k[u] = *CacheVec(p.k_cache, p, table, kv_head, from, vec);
          v[u] = *CacheVec(p.v_cache, p, table, kv_head, from, vec);
        }
      }
    }
    int position = -1;
    float score = 0.0f;
    const bool carrier = tid < rows;
    if (carrier) {
      const int from = keep[i0 + tid];
      position = positions_in == nullptr ? from : positions_in[from];
      if (scores != nullptr) score = scores[from];
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kCompactVecs; ++u) {
      const int item = tid + u * kCompactThreads;
      if (item < items) {
        const int i = i0 + item / p.vecs_per_row;
        if (keep[i] != i) {
          const int vec = item % p.vecs_per_row;
          *CacheVec(p.k_cache, p, table, kv_head, i, vec) = k[u];
          *CacheVec(p.v_cache, p, table, kv_head, i, vec) = v[u];
        }
      }
    }
    if (carrier) {
      positions_out[i0 + tid] = position;
      if (scores != nullptr) scores[i0 + tid] = score;
    }
  }
  // Every read happened before the last round's barrier.
  for (int i = n + tid; i < p.max_slots; i += kCompactThreads) {
    positions_out[i] = -1;
    if (scores != nullptr) scores[i] = 0.0f;
  }
}

// Grid: (token of the ring's share, sequence).
__global__ void __launch_bounds__(kThreads)
    PushQueryRingKernel(const __nv_bfloat16* q, int64_t q_stride, const int32_t* query_start,
                        const int32_t* num_tokens, int max_tokens, int vecs_per_row,
                        __nv_bfloat16* ring, int64_t ring_seq_stride, int64_t ring_row_stride,
                        int ring_size) {
  const int t = static_cast<int>(blockIdx.x);
  const int seq = static_cast<int>(blockIdx.y);
  const int n = Clamp(query_start[seq + 1] - query_start[seq], max_tokens);
  const int copied = min(n, ring_size);
  if (t >= copied) return;
  const int i = n - copied + t;
  const int64_t position = static_cast<int64_t>(num_tokens[seq]) + i;
  const uint4* src =
      reinterpret_cast<const uint4*>(q + (static_cast<int64_t>(query_start[seq]) + i) * q_stride);
  uint4* dst = reinterpret_cast<uint4*>(ring + seq * ring_seq_stride +
                                        (position % ring_size) * ring_row_stride);
  for (int v = static_cast<int>(threadIdx.x); v < vecs_per_row; v += kThreads) dst[v] = src[v];
}

}  // namespace

size_t H2oAccumulateScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t max_tokens,
                                 int64_t max_slots) {
  // Per (sequence, KV head, partition), a largest logit and an exp sum for
  // each of the max_tokens * G rows: num_heads rows per token over the KV
  // heads.
  const int64_t floats = 2 * num_seqs * PartitionsFor(max_slots) * max_tokens * num_heads;
  return static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float);
}

absl::Status H2oAccumulate(const H2oAccumulateArgs& a, const __nv_bfloat16* q, int64_t q_stride,
                           float* scores, int64_t scores_stride, void* scratch,
                           cudaStream_t stream) {
  constexpr const char* kName = "H2oAccumulate";
  RETURN_IF_ERROR(CheckScoring(kName, a.num_seqs, a.num_heads, a.num_kv_heads, a.head_dim,
                               a.block_size, a.block_table_stride, a.max_slots, a.k_cache,
                               scratch));
  RETURN_IF_ERROR(
      Require(a.max_tokens >= 0 && a.max_tokens <= (1 << 20), kName, "0 <= max_tokens <= 2^20"));
  RETURN_IF_ERROR(Require(a.max_tokens * (a.num_heads / a.num_kv_heads) <= INT_MAX, kName,
                          "max_tokens * num_heads / num_kv_heads < 2^31"));
  RETURN_IF_ERROR(
      Require(q_stride >= a.num_heads * a.head_dim, kName, "q_stride >= num_heads * head_dim"));
  RETURN_IF_ERROR(Require(scores_stride >= a.max_slots, kName, "scores_stride >= max_slots"));
  if (a.num_seqs == 0) return absl::OkStatus();

  SumParams p = CommonSumParams(a, a.max_tokens, scratch);
  p.snap = false;
  p.num_slots = a.num_slots;
  p.query_start = a.query_start;
  p.reset_slots = a.reset_slots;
  p.max_tokens = static_cast<int>(a.max_tokens);
  p.q = q;
  p.q_row_stride = q_stride;
  p.out = scores;
  p.out_stride = scores_stride;
  return LaunchSums(p, a.head_dim, a.num_seqs, stream);
}

absl::Status SelectLowestCandidates(const CandidateArgs& a, const float* scores,
                                    int64_t scores_stride, int32_t* victims, cudaStream_t stream) {
  constexpr const char* kName = "SelectLowestCandidates";
  RETURN_IF_ERROR(CheckCandidates(kName, a, scores, scores_stride));
  if (a.num_seqs == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  LowestCandidateKernel<<<grid, kSelectThreads, 0, stream>>>(
      MakeCandidateParams(a, scores, scores_stride), victims);
  return LaunchStatus("LowestCandidateKernel");
}

absl::Status SelectKeepLists(const CandidateArgs& a, const int32_t* keep, const float* scores,
                             int64_t scores_stride, int32_t* keep_lists, int64_t keep_stride,
                             int32_t* keep_counts, int32_t* victims, cudaStream_t stream) {
  constexpr const char* kName = "SelectKeepLists";
  RETURN_IF_ERROR(CheckCandidates(kName, a, scores, scores_stride));
  RETURN_IF_ERROR(Require(keep_stride >= a.max_slots, kName, "keep_stride >= max_slots"));
  if (a.num_seqs == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  KeepListKernel<<<grid, kSelectThreads, 0, stream>>>(MakeCandidateParams(a, scores, scores_stride),
                                                      keep, keep_lists, keep_stride, keep_counts,
                                                      victims);
  return LaunchStatus("KeepListKernel");
}

absl::Status CompactKv(const CompactKvArgs& a, const int32_t* keep_lists, int64_t keep_stride,
                       const int32_t* keep_counts, const int32_t* positions_in,
                       int32_t* positions_out, int64_t positions_stride, float* scores,
                       int64_t scores_stride, cudaStream_t stream) {
  constexpr const char* kName = "CompactKv";
  RETURN_IF_ERROR(Require(a.num_seqs >= 0 && a.num_seqs <= 65535, kName, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(a.num_kv_heads > 0 && a.num_kv_heads <= 65535, kName, "0 < num_kv_heads <= 65535"));
  RETURN_IF_ERROR(Require(a.head_dim > 0 && a.head_dim % kVec == 0 && a.head_dim <= 4096, kName,
                          "0 < head_dim <= 4096, a multiple of 8"));
  RETURN_IF_ERROR(
      Require(a.block_size > 0 && a.block_size <= (1 << 20) && a.block_table_stride >= 0, kName,
              "0 < block_size <= 2^20 and block_table_stride >= 0"));
  RETURN_IF_ERROR(Require(a.max_slots >= 0 && a.max_slots <= (int64_t{1} << 30), kName,
                          "0 <= max_slots <= 2^30"));
  RETURN_IF_ERROR(Require(keep_stride >= a.max_slots, kName, "keep_stride >= max_slots"));
  RETURN_IF_ERROR(Require(positions_out != nullptr && positions_stride >= a.max_slots, kName,
                          "positions_out with positions_stride >= max_slots"));
  RETURN_IF_ERROR(Require(scores == nullptr || scores_stride >= a.max_slots, kName,
                          "scores_stride >= max_slots"));
  RETURN_IF_ERROR(
      Require(Aligned16(a.k_cache) && Aligned16(a.v_cache), kName, "16-byte aligned caches"));
  if (a.num_seqs == 0) return absl::OkStatus();
  CompactParams p;
  p.k_cache = a.k_cache;
  p.v_cache = a.v_cache;
  p.block_tables = a.block_tables;
  p.block_table_stride = a.block_table_stride;
  p.max_slots = static_cast<int>(a.max_slots);
  p.block_size = static_cast<int>(a.block_size);
  p.num_kv_heads = static_cast<int>(a.num_kv_heads);
  p.vecs_per_row = static_cast<int>(a.head_dim / kVec);
  p.keep_lists = keep_lists;
  p.keep_stride = keep_stride;
  p.keep_counts = keep_counts;
  p.positions_in = positions_in;
  p.positions_out = positions_out;
  p.positions_stride = positions_stride;
  p.scores = scores;
  p.scores_stride = scores_stride;
  const dim3 grid(static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  CompactKernel<<<grid, kCompactThreads, 0, stream>>>(p);
  return LaunchStatus("CompactKernel");
}

size_t SnapKvScoresScratchBytes(int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                                int64_t window, int64_t max_slots) {
  // Row statistics as for H2O (window rows per token), then each (sequence,
  // KV head)'s unpooled sums.
  const int64_t floats = 2 * num_seqs * PartitionsFor(max_slots) * window * num_heads +
                         num_seqs * num_kv_heads * max_slots;
  return static_cast<size_t>(std::max<int64_t>(floats, 1)) * sizeof(float);
}

absl::Status SnapKvScores(const SnapKvScoresArgs& a, const __nv_bfloat16* ring,
                          int64_t ring_seq_stride, int64_t ring_row_stride, float* pooled,
                          int64_t pooled_stride, void* scratch, cudaStream_t stream) {
  constexpr const char* kName = "SnapKvScores";
  RETURN_IF_ERROR(CheckScoring(kName, a.num_seqs, a.num_heads, a.num_kv_heads, a.head_dim,
                               a.block_size, a.block_table_stride, a.max_slots, a.k_cache,
                               scratch));
  RETURN_IF_ERROR(Require(a.window > 0 && a.window <= a.ring_size && a.ring_size <= (1 << 20),
                          kName, "0 < window <= ring_size <= 2^20"));
  RETURN_IF_ERROR(Require(ring_row_stride >= a.num_heads * a.head_dim && ring_seq_stride >= 0,
                          kName, "ring_row_stride >= num_heads * head_dim, ring_seq_stride >= 0"));
  RETURN_IF_ERROR(Require(pooled_stride >= a.max_slots, kName, "pooled_stride >= max_slots"));
  if (a.num_seqs == 0) return absl::OkStatus();

  SumParams p = CommonSumParams(a, a.window, scratch);
  p.snap = true;
  p.num_tokens = a.num_tokens;
  p.window = static_cast<int>(a.window);
  p.ring_size = static_cast<int>(a.ring_size);
  p.q = ring;
  p.q_seq_stride = ring_seq_stride;
  p.q_row_stride = ring_row_stride;
  p.out = p.part_sum + (p.part_sum - p.part_max);  // after the two statistics arrays
  p.out_stride = a.max_slots;
  p.pooled = pooled;
  p.pooled_stride = pooled_stride;
  RETURN_IF_ERROR(LaunchSums(p, a.head_dim, a.num_seqs, stream));
  if (a.max_slots == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>((a.max_slots + kThreads - 1) / kThreads),
                  static_cast<unsigned>(a.num_kv_heads), static_cast<unsigned>(a.num_seqs));
  PoolKernel<<<grid, kThreads, 0, stream>>>(p);
  return LaunchStatus("SnapKvPoolKernel");
}

absl::Status PushQueryRing(const __nv_bfloat16* q, int64_t q_stride, const int32_t* query_start,
                           const int32_t* num_tokens, int64_t num_seqs, int64_t max_tokens,
                           int64_t row_elems, __nv_bfloat16* ring, int64_t ring_seq_stride,
                           int64_t ring_row_stride, int64_t ring_size, cudaStream_t stream) {
  constexpr const char* kName = "PushQueryRing";
  RETURN_IF_ERROR(Require(num_seqs >= 0 && num_seqs <= 65535, kName, "0 <= num_seqs <= 65535"));
  RETURN_IF_ERROR(
      Require(max_tokens >= 0 && max_tokens <= INT_MAX, kName, "0 <= max_tokens < 2^31"));
  RETURN_IF_ERROR(Require(ring_size > 0 && ring_size <= (1 << 20), kName, "0 < ring_size <= 2^20"));
  RETURN_IF_ERROR(Require(row_elems > 0 && row_elems % kVec == 0 && q_stride >= row_elems &&
                              ring_row_stride >= row_elems,
                          kName, "row_elems a positive multiple of 8 within both strides"));
  RETURN_IF_ERROR(Require(q_stride % kVec == 0 && ring_row_stride % kVec == 0 &&
                              ring_seq_stride % kVec == 0 && ring_seq_stride >= 0,
                          kName, "strides multiples of 8"));
  RETURN_IF_ERROR(Require(Aligned16(q) && Aligned16(ring), kName, "16-byte aligned q and ring"));
  const int64_t rows = std::min(max_tokens, ring_size);
  if (num_seqs == 0 || rows == 0) return absl::OkStatus();
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(num_seqs));
  PushQueryRingKernel<<<grid, kThreads, 0, stream>>>(
      q, q_stride, query_start, num_tokens, static_cast<int>(max_tokens),
      static_cast<int>(row_elems / kVec), ring, ring_seq_stride, ring_row_stride,
      static_cast<int>(ring_size));
  return LaunchStatus("PushQueryRingKernel");
}

}  // namespace morphserve::kernels::cuda
