// The attention sums of kernels/cuda/kv_policy.h: H2O's running scores
// (H2oAccumulate) and SnapKV's pooled prompt scores (SnapKvScores).
// kv_selection.cu holds the selection, the compaction and the query ring.
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
using internal::Clamp;
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

}  // namespace morphserve::kernels::cuda
